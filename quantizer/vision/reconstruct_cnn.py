"""Block-wise reconstruction of a batch-norm-folded MobileNetV2 (BRECQ/FlexRound style).

The network is cut into 18 units (``MobileNetV2.units()``: stem conv + block 1, blocks 2..17,
last conv + classifier). For each unit in order:

1. ``targets = unit_fp(x_fp)``: the float unit on the float network's inputs;
2. every Conv2d/Linear of the unit becomes a :class:`LayerWrapper` holding a rounding module of
   :mod:`quantizer.rounding` (RTN, AdaRound, FlexRound with ``s4`` for convolutions, SignRound)
   and, for WxAy runs, an LSQ activation quantizer on the layer's input;
3. the rounding (and activation) parameters minimize ``mean((unit(x_q) - targets)^2)`` where
   ``x_q`` is the output of the already quantized units (QDrop optionally mixes in ``x_fp``);
4. the unit is exported (:class:`fxkernels.conv.QuantConv2d` / :class:`fxkernels.QuantLinear`)
   and ``x_q`` advances through it *as exported* (the frozen dequantized weights, bit-identical to
   the last fake-quant forward).

The first conv and the classifier use ``first_last_bits`` (8 in the paper) for weights and
activations. The project's kernels run int8 activations only; lower activation widths (W4A4)
are simulated with fake quantization (:class:`ActFakeQuant`), which is what the W4A4 figures measure.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fxkernels.conv import QuantConv2d
from fxkernels.format import QuantSpec
from fxkernels.nn import QuantLinear, set_submodule

from ..config import method_learning_rate
from ..reconstruct import optimizer_step
from ..rounding import make_quantizer
from ..rounding.base import round_ste
from .bias_correction import correct_unit_biases

METHODS = ("rtn", "adaround", "flexround", "signround")


@dataclasses.dataclass
class CNNQuantConfig:
    """One MobileNetV2 quantization run.

    method: one of METHODS. bits/granularity/symmetric: the weight format of every conv except
    the first one and the classifier, which get ``first_last_bits``. act_bits: None (weight-only)
    or the activation width of every layer input except the image and the classifier input
    (``first_last_bits``). iters, batch_size, lr, act_lr: per-unit optimization (lr None: the
    method's default). qdrop: probability of feeding a float input element instead of the
    quantized one while learning (QDrop). bias_correction: after each unit is learned, shift
    every layer's bias so its output-channel means on the calibration images match the float
    layer's (:mod:`quantizer.vision.bias_correction`; on MobileNetV2 W8 RTN 80 -> 93 % top-1
    agreement, W4 FlexRound 66.5 -> 73 %). init: FlexRound/AdaRound initial grid ("mse"/"minmax").
    equalize: cross-layer equalization before quantizing (``quantizer.vision.equalize``; the float
    function is unchanged, ReLU6 becomes a per-channel clip; with ``act_bits`` every factor is
    bounded so that no activation channel outgrows its tensor's measured range).
    """

    method: str = "flexround"
    bits: int = 4
    granularity: str = "tensor"
    symmetric: bool = False
    act_bits: Optional[int] = None
    first_last_bits: int = 8
    iters: int = 200
    batch_size: int = 16
    lr: Optional[float] = None
    act_lr: float = 4e-3
    qdrop: float = 0.0
    bias_correction: bool = True
    init: str = "mse"
    seed: int = 0
    equalize: bool = True
    eval_samples: int = 32
    options: Dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"CNNQuantConfig: {name}={getattr(self, name)!r}; expected {expected}")

        if self.method not in METHODS:
            bad("method", f"one of {METHODS}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            bad("bits", "an integer in 2..8")
        if self.act_bits is not None and (not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8):
            bad("act_bits", "None or an integer in 2..8")
        if not isinstance(self.first_last_bits, int) or not 2 <= self.first_last_bits <= 8:
            bad("first_last_bits", "an integer in 2..8")
        for name in ("iters",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "a non-negative integer")
        for name in ("batch_size", "eval_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "a positive integer")
        if not 0 <= self.qdrop <= 1:
            bad("qdrop", "a probability in [0, 1]")
        if self.lr is not None and not self.lr > 0:
            bad("lr", "None or a positive number")
        if self.init not in ("mse", "minmax"):
            bad("init", "'mse' or 'minmax'")
        if not isinstance(self.equalize, bool):
            bad("equalize", "True or False")
        if not isinstance(self.bias_correction, bool):
            bad("bias_correction", "True or False")

    def weight_spec(self, first_or_last: bool) -> QuantSpec:
        return QuantSpec(bits=self.first_last_bits if first_or_last else self.bits, granularity=self.granularity,
                         symmetric=self.symmetric)

    def act_width(self, first_or_last: bool) -> Optional[int]:
        if self.act_bits is None:
            return None
        return self.first_last_bits if first_or_last else self.act_bits

    @property
    def learning_rate(self) -> float:
        return method_learning_rate(self.method, self.lr, self.iters)


# -- activations ----------------------------------------------------------------------------
def act_range(bits: int) -> Tuple[int, int]:
    """Signed code range, as the int8 kernels use it (``[-128, 127]`` at 8 bits)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid ``(scale, zero)`` covering ``[lo, hi]`` (always containing 0), signed domain."""
    qmin, qmax = act_range(bits)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x * (1/s)) + z) - z) * s``: at 8 bits the rule of ``fxkernels.ops.quantize_act``."""
    qmin, qmax = act_range(bits)
    inv = 1.0 / scale
    return (torch.clamp(torch.round(x * inv) + zero, qmin, qmax) - zero) * scale


class LSQActQuantizer(nn.Module):
    """Per-tensor static activation quantizer with learned log step size and zero point (LSQ+),
    any width 2..8. Initialized by the clipping range minimizing the squared error on the
    calibration inputs (min-max wastes the few levels of 4 bits on rare large activations)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.zero = nn.Parameter(torch.zeros(1))
        self.enabled = True

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, grid: int = 100, max_shrink: float = 0.9) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() > 2_000_000:  # a strided subsample keeps the search fast and unbiased enough
            x = x[:: x.numel() // 2_000_000 + 1]
        lo, hi = x.min(), x.max()
        best, best_err = act_grid(lo, hi, self.bits), float("inf")
        for i in range(int(max_shrink * grid) + 1):
            f = 1 - i / grid
            s, z = act_grid(lo * f, hi * f, self.bits)
            err = float((fake_quant_act(x, s, z, self.bits) - x).pow(2).mean())
            if err < best_err:
                best, best_err = (s, z), err
        self.log_scale.copy_(best[0].log().reshape(1))
        self.zero.copy_(best[1].reshape(1))

    def scale_zero(self):
        qmin, qmax = act_range(self.bits)
        return self.log_scale.exp(), torch.clamp(round_ste(self.zero), qmin, qmax)

    def forward(self, x):
        if not self.enabled:
            return x
        qmin, qmax = act_range(self.bits)
        scale, zero = self.scale_zero()
        inv = 1.0 / scale
        return (torch.clamp(round_ste(x * inv) + zero, qmin, qmax) - zero) * scale

    @torch.no_grad()
    def export(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scale, zero = self.scale_zero()
        return scale.detach().float().clone().reshape(1), zero.detach().to(torch.int32).clone().reshape(1)


class ActFakeQuant(nn.Module):
    """A frozen exported activation grid of any width, simulated in fp32 (for widths the
    kernels cannot run, i.e. below 8 bits)."""

    def __init__(self, bits: int, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", scale.detach().float().reshape(1).clone())
        self.register_buffer("zero", zero.detach().float().reshape(1).clone())

    def forward(self, x):
        return fake_quant_act(x, self.scale, self.zero, self.bits)

    def extra_repr(self):
        return f"bits={self.bits}"


# -- layers while learning -----------------------------------------------------------------
class LayerWrapper(nn.Module):
    """A Conv2d or Linear during learning: ``conv(aq(x), wq(), bias)``.

    3x3 depthwise weights have K = 9 columns, which nibble storage cannot pack and
    ``quantize_rtn`` refuses; such weights are learned as ``[O, 10]`` with a zero pad column
    (its code is the zero point, dequantizing to exactly 0, and its scale factors are inert).
    For a depthwise conv FlexRound's ``s4`` would be a single scalar (one input channel per
    group) duplicating ``s1``, so nothing is lost by learning it as a 2-D weight."""

    def __init__(self, layer: nn.Module, method: str, spec: QuantSpec, options: dict, act_bits: Optional[int]):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"LayerWrapper: got {type(layer).__name__}; expected nn.Conv2d or nn.Linear")
        self.is_conv = isinstance(layer, nn.Conv2d)
        w = layer.weight.detach().float()
        self.weight_shape = tuple(w.shape)
        self.k = w[0].numel()
        self.pad = spec.packed and self.k % 2 == 1
        w_in = torch.cat([w.reshape(w.shape[0], -1), w.new_zeros(w.shape[0], 1)], 1) if self.pad else w
        self.wq = make_quantizer(method, w_in, spec, options)
        self.spec = spec
        self.aq = LSQActQuantizer(act_bits) if act_bits else None
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        if self.is_conv:
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups)
            self.in_channels = layer.in_channels
        self.record: Optional[List[torch.Tensor]] = None

    def weight(self) -> torch.Tensor:
        w = self.wq()
        if self.pad:
            w = w[:, :self.k]
        return w.reshape(self.weight_shape)

    def forward(self, x):
        if self.record is not None:
            self.record.append(x.detach()[:8])
        if self.aq is not None:
            x = self.aq(x)
        if self.is_conv:
            return F.conv2d(x, self.weight(), self.bias, **self.conv_args)
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def export(self) -> nn.Module:
        """The deployable layer: QuantConv2d / QuantLinear from the rounding's codes, preceded by
        an :class:`ActFakeQuant` when activations are quantized below 8 bits."""
        codes, scale, zero = self.wq.export()
        if self.pad:
            codes = codes[:, :self.k]
        spec, act_scale, act_zero, pre = self.spec, None, None, None
        if self.aq is not None:
            s, z = self.aq.export()
            if self.aq.bits == 8:
                spec = dataclasses.replace(spec, act_bits=8, act_mode="static")
                act_scale, act_zero = s, z
            else:
                pre = ActFakeQuant(self.aq.bits, s, z)
        if self.is_conv:
            a = self.conv_args
            layer = QuantConv2d.from_codes(codes, scale, zero, spec, self.in_channels, self.weight_shape[2:],
                                           a["stride"], a["padding"], a["dilation"], a["groups"], self.bias,
                                           act_scale, act_zero)
        else:
            layer = QuantLinear.from_codes(codes, scale, zero, spec, self.bias, act_scale, act_zero)
        return layer if pre is None else nn.Sequential(pre, layer)


class FrozenLayer(nn.Module):
    """An exported layer simulated in fp32: the dequantized codes (bit-identical to the rounding's
    last hard forward) with ``F.conv2d``/``F.linear``, and the exported activation grid. Used to
    advance ``x_q`` (the kernels would give the same numbers up to summation order, slower)."""

    def __init__(self, exported: nn.Module):
        super().__init__()
        pre, layer = (exported[0], exported[1]) if isinstance(exported, nn.Sequential) else (None, exported)
        self.pre = pre
        w = layer.dequantized_weight()
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            w = w.reshape(layer.weight_shape)
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups)
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        self.act = None
        if layer.act_scale is not None:
            self.act = (layer.act_scale.clone(), layer.act_zero.float().clone())

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        if self.act is not None:
            x = fake_quant_act(x, self.act[0], self.act[1], 8)
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.linear(x, self.weight, self.bias)


# -- the engine -----------------------------------------------------------------------------
def unit_prefixes(nunits: int = 18) -> List[Tuple[str, ...]]:
    """Module-name prefixes of each MobileNetV2 unit (see ``MobileNetV2.units``)."""
    return [("features.0.", "features.1.")] + [(f"features.{i}.",) for i in range(2, 18)] + \
        [("features.18.", "classifier.")]


FIRST_LAST = ("features.0.0", "classifier.1")


def unit_layers(model: nn.Module, prefixes: Tuple[str, ...]) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n.startswith(prefixes)]


@torch.no_grad()
def run_unit(unit: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    outs = [unit(x[s:s + batch]) for s in range(0, x.shape[0], batch)]
    return torch.cat(outs)


@torch.no_grad()
def _mse(unit, x, t, batch) -> float:
    total = 0.0
    for s in range(0, x.shape[0], batch):
        total += float((unit(x[s:s + batch]) - t[s:s + batch]).pow(2).sum())
    return total / t.numel()


def _set_hard(wrappers: Dict[str, LayerWrapper], hard: bool) -> None:
    for w in wrappers.values():
        w.wq.hard = hard if w.wq.method == "adaround" else True


def _learn_unit(i: int, unit: nn.Module, wrappers: Dict[str, LayerWrapper], xq: torch.Tensor, xfp: torch.Tensor,
                targets: torch.Tensor, check: Tuple[torch.Tensor, torch.Tensor], cfg: CNNQuantConfig,
                log) -> Tuple[float, float]:
    """Learn one unit; returns its loss on ``check`` (inputs, float targets) before and after.
    The learned rounding is kept only if it lowers that loss (else the initial grid stays)."""
    n = xq.shape[0]
    if cfg.act_bits:
        for w in wrappers.values():
            w.aq.enabled, w.record = False, []
        run_unit(unit, xq[:min(n, 64)], 8)
        for w in wrappers.values():
            w.aq.init_from(torch.cat(w.record))
            w.aq.enabled, w.record = True, None
    _set_hard(wrappers, True)
    before = _mse(unit, *check, 32)
    if cfg.iters == 0 or cfg.method == "rtn":
        return before, before
    init_state = copy.deepcopy({k: w.state_dict() for k, w in wrappers.items()})
    _set_hard(wrappers, False)
    lr = cfg.learning_rate
    wgroups = [g for w in wrappers.values() for g in w.wq.param_groups(lr)]
    aparams = [p for w in wrappers.values() if w.aq is not None for p in w.aq.parameters()]
    if cfg.method == "signround":
        from ..reconstruct import SignSGD
        opts = [SignSGD([p for g in wgroups for p in g["params"]], lr, cfg.iters)]
        scheds = []
    else:
        opts = [torch.optim.Adam(wgroups, lr=lr)]
        scheds = [torch.optim.lr_scheduler.LambdaLR(opts[0], lambda t: 1 - t / cfg.iters)]
    if aparams and cfg.act_lr > 0:
        opts.append(torch.optim.Adam(aparams, lr=cfg.act_lr))
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[-1], lambda t: 1 - t / cfg.iters))
    # AdaRound's rounding regularizer, scaled by the unit's initial loss so one weight suits all units.
    reg_weight = float(cfg.options.get("reg_weight", 0.1)) * before if cfg.method == "adaround" else 0.0
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
    bs = min(cfg.batch_size, n)
    for step in range(cfg.iters):
        idx = torch.randint(0, n, (bs,), generator=gen)
        xin = xq[idx]
        if cfg.qdrop > 0:
            xin = torch.where(torch.rand(xin.shape, generator=gen) < cfg.qdrop, xfp[idx], xin)
        loss = (unit(xin) - targets[idx]).pow(2).mean()
        if reg_weight:
            regs = [r for r in (w.wq.regularizer(step / cfg.iters) for w in wrappers.values()) if r is not None]
            if regs:
                loss = loss + reg_weight * torch.stack(regs).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"unit {i}: loss became {float(loss)} at iteration {step}; try a smaller lr (now {lr:g})")
        optimizer_step(opts, scheds, wrappers, loss)
    _set_hard(wrappers, True)
    after = _mse(unit, *check, 32)
    if not after <= before:
        for k, w in wrappers.items():
            w.load_state_dict(init_state[k])
        log(f"unit {i}: learned loss {after:.4e} not below initial {before:.4e}; keeping the initial grid")
        after = before
    return before, after


def equalized(model: nn.Module, calib: torch.Tensor, cfg: CNNQuantConfig, range_images: int = 64) -> nn.Module:
    """The float network the run quantizes: ``model`` itself, or an equalized copy when
    ``cfg.equalize``. With quantized activations the equalization keeps every activation tensor's
    range (measured on the first ``range_images`` calibration images) where it was."""
    if not cfg.equalize:
        return model
    from .equalize import activation_ranges, equalize_mobilenet
    ranges = activation_ranges(model, calib[:range_images].float()) if cfg.act_bits else None
    return equalize_mobilenet(copy.deepcopy(model), act_ranges=ranges)


def quantize_mobilenet(model: nn.Module, calib: torch.Tensor, cfg: CNNQuantConfig,
                       log: Callable[[str], None] = print, holdout: Optional[torch.Tensor] = None
                       ) -> Tuple[nn.Module, Dict[str, nn.Module], List[dict]]:
    """Quantize a folded MobileNetV2 unit by unit.

    holdout: images never learned on (best: crops of other photographs), carried through the float
    and the quantized network like ``calib``; each unit keeps its learned rounding only if that
    lowers the unit's loss on them, so learning cannot end worse than the initial grid on images
    it did not fit. None: the first ``cfg.eval_samples`` calibration images decide (seen in learning).

    Returns ``(deployed, frozen_layers, stats)``: ``deployed`` is a deep copy of ``model`` whose
    convs/linears are QuantConv2d/QuantLinear (with ActFakeQuant in front below 8-bit
    activations); ``frozen_layers`` maps names to the fp32 simulation used during learning;
    ``stats`` has per-unit losses and seconds. ``model`` itself is not modified."""
    if calib.dim() != 4 or calib.shape[1] != 3:
        raise ValueError(f"quantize_mobilenet: calib shape {tuple(calib.shape)}; expected [n, 3, H, W] images")
    if holdout is not None and (holdout.dim() != 4 or holdout.shape[1:] != calib.shape[1:] or holdout.shape[0] == 0):
        raise ValueError(f"quantize_mobilenet: holdout shape {tuple(holdout.shape)}; expected [m, "
                         f"{', '.join(map(str, calib.shape[1:]))}] images like calib, m >= 1")
    model = equalized(model, calib, cfg)
    fp = copy.deepcopy(model).eval()
    work = copy.deepcopy(model).eval()
    deployed = copy.deepcopy(model).eval()
    for m in (fp, work, deployed):
        for p in m.parameters():
            p.requires_grad_(False)
    fp_units, units = fp.units(), work.units()
    options = dict(cfg.options)
    options.pop("reg_weight", None)
    if cfg.method in ("flexround", "adaround", "rtn"):
        options.setdefault("init", cfg.init)
    xfp, xq = calib.float(), calib.float().clone()
    ne = min(cfg.eval_samples, xq.shape[0])
    hfp, hq = (holdout.float(), holdout.float().clone()) if holdout is not None else (None, None)
    stats, frozen = [], {}
    t0 = time.time()
    for i, (prefixes, fp_unit, unit) in enumerate(zip(unit_prefixes(), fp_units, units)):
        tu = time.time()
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        targets = run_unit(fp_unit, xfp)
        htargets = run_unit(fp_unit, hfp) if hfp is not None else None
        check = (hq, htargets) if hq is not None else (xq[:ne], targets[:ne])
        wrappers = {}
        for name, layer in unit_layers(work, prefixes):
            first_last = name in FIRST_LAST
            w = LayerWrapper(layer, cfg.method, cfg.weight_spec(first_last), options, cfg.act_width(first_last))
            set_submodule(work, name, w)
            wrappers[name] = w
        before, after = _learn_unit(i, unit, wrappers, xq, xfp, targets, check, cfg, log)
        if cfg.bias_correction:
            correct_unit_biases(fp_unit, {n: fp.get_submodule(n) for n in wrappers}, unit, wrappers, xfp, xq)
            after = _mse(unit, *check, 32)
        for name, w in wrappers.items():
            exported = w.export()
            set_submodule(deployed, name, exported)
            frozen[name] = FrozenLayer(exported)
            set_submodule(work, name, frozen[name])
        xq = run_unit(unit, xq)
        xfp = targets
        if hq is not None:
            hq, hfp = run_unit(unit, hq), htargets
        stats.append({"unit": i, "loss_before": before, "loss_after": after, "seconds": time.time() - tu})
        log(f"unit {i + 1}/18 ({', '.join(wrappers)}): loss {before:.4e} -> {after:.4e} ({time.time() - tu:.1f} s)")
    log(f"quantized 18 units with {cfg.method} in {time.time() - t0:.1f} s")
    return deployed, work, stats
