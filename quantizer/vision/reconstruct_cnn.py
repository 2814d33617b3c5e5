"""MobileNetV2, unit by unit: the vision family of the reconstruction engine (BRECQ/FlexRound style).

The batch-norm-folded network is cut into 18 units (``MobileNetV2.units()``: stem conv + block 1,
blocks 2..17, last conv + classifier); every Conv2d/Linear of a unit is quantized by
:mod:`quantizer.engine` with a rounding of :mod:`quantizer.rounding` (FlexRound learns ``s4``
for convolutions) and, for WxAy runs, an LSQ activation quantizer on the layer's input. The
first conv and the classifier use ``first_last_bits`` (8 in the paper) for weights and
activations. The project's kernels run int8 activations only; lower activation widths (W4A4)
are simulated with fake quantization (:class:`quantizer.act_quant.ActFakeQuant`), which is what
the W4A4 figures measure. Before quantizing, the network may be equalized
(:mod:`quantizer.vision.equalize`); after each unit is learned, its biases may be corrected
(:mod:`quantizer.vision.bias_correction`).

:class:`CNNQuantConfig` is the vision front end of :class:`quantizer.config.QuantizeConfig`:
its flat fields build the shared configuration (:meth:`CNNQuantConfig.shared`), plus the two
vision-only switches ``equalize`` and ``bias_correction``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fxkernels.format import QuantSpec
from fxkernels.nn import set_submodule

from ..act_quant import ActQuantizer, RangeSearch
from ..config import QuantizeConfig
from ..engine import Family, Unit, reconstruct_units
from ..layers import QuantLayer, quant_layer
from .bias_correction import correct_unit_biases

FIRST_LAST = ("features.0.0", "classifier.1")
# Activation grids of 2-4 bits have few levels to spend: the search goes finer and clips deeper
# than the int8 default, on a subsample of the (large, early) feature maps.
CNN_RANGE_SEARCH = RangeSearch(grid=100, max_shrink=0.9, max_samples=2_000_000)
ACT_INIT_IMAGES = 64


@dataclasses.dataclass
class CNNQuantConfig:
    """One MobileNetV2 quantization run.

    method: a registered rounding method. bits/granularity/symmetric: the weight format of every
    conv except the first one and the classifier, which get ``first_last_bits``. act_bits: None
    (weight-only) or the activation width of every layer input except the image and the
    classifier input (``first_last_bits``). iters, batch_size, lr, act_lr: per-unit optimization
    (lr None: the method's default). qdrop: probability of feeding a float input element instead
    of the quantized one while learning (QDrop). bias_correction: after each unit is learned,
    shift every layer's bias so its output-channel means on the calibration images match the
    float layer's (on MobileNetV2 W8 RTN 80 -> 93 % top-1 agreement, W4 FlexRound 66.5 -> 73 %).
    init: FlexRound/AdaRound initial grid ("mse"/"minmax"). equalize: cross-layer equalization
    before quantizing (the float function is unchanged, ReLU6 becomes a per-channel clip; with
    ``act_bits`` every factor is bounded so that no activation channel outgrows its tensor's
    measured range).
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

        for name in ("bits", "first_last_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
                bad(name, "an integer in 2..8")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            bad("batch_size", "a positive integer")
        for name in ("equalize", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        self.shared()  # validates the other fields

    def shared(self, images: Optional[int] = None) -> QuantizeConfig:
        """The engine's configuration for a run on ``images`` calibration images (None: one
        batch's worth; a batch never holds more images than there are)."""
        n = self.batch_size if images is None else images

        def spec(bits):
            return QuantSpec(bits=bits, granularity=self.granularity, symmetric=self.symmetric)

        try:
            return QuantizeConfig(
                method=self.method, weight=spec(self.bits), first_last=spec(self.first_last_bits),
                act_bits=self.act_bits, iters=self.iters, lr=self.lr, act_lr=self.act_lr, nsamples=n,
                batch_size=min(self.batch_size, n), seed=self.seed, init=self.init, qdrop=self.qdrop,
                eval_samples=self.eval_samples, loss="mse", smooth=None, rotate=(), skip=(), progress=False,
                options=dict(self.options))
        except ValueError as e:
            raise ValueError(str(e).replace("QuantizeConfig:", "CNNQuantConfig:")) from None

    @property
    def learning_rate(self) -> float:
        return self.shared().learning_rate


def unit_prefixes(nunits: int = 18) -> List[Tuple[str, ...]]:
    """Module-name prefixes of each MobileNetV2 unit (see ``MobileNetV2.units``)."""
    return [("features.0.", "features.1.")] + [(f"features.{i}.",) for i in range(2, nunits)] + \
        [("features.18.", "classifier.")]


def unit_layers(model: nn.Module, prefixes: Tuple[str, ...]) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n.startswith(prefixes)]


class MobileNetV2Family(Family):
    """Units of a folded MobileNetV2. Layers are wrapped in ``work`` (a copy that ends as the fp32
    simulation of the result), float targets come from ``fp`` (another copy), exported layers go
    into ``deployed`` (a third copy)."""

    stream_batch = 32
    act_init_rows = ACT_INIT_IMAGES

    def __init__(self, fp: nn.Module, work: nn.Module, deployed: nn.Module, cfg: QuantizeConfig,
                 bias_correction: bool):
        self.fp, self.work, self.deployed, self.cfg = fp, work, deployed, cfg
        self.bias_correction = bias_correction

    def units(self):
        n = len(unit_prefixes())
        for i, (prefixes, fp_unit, unit) in enumerate(zip(unit_prefixes(), self.fp.units(), self.work.units())):
            layers = unit_layers(self.work, prefixes)
            yield Unit(label=f"unit {i + 1}/{n} ({', '.join(name for name, _ in layers)})", root=self.work,
                       layers=layers, forward=unit, run_float=fp_unit)

    def wrap(self, unit: Unit, name: str, layer: nn.Module) -> QuantLayer:
        cfg = self.cfg
        first_last = name in FIRST_LAST and cfg.first_last is not None
        spec = cfg.first_last if first_last else cfg.weight
        aq = None
        if cfg.act_bits:
            aq = ActQuantizer(spec.bits if first_last else cfg.act_bits, search=CNN_RANGE_SEARCH)
        return quant_layer(layer, cfg.method, spec, cfg.rounding_options(), aq)

    def after_learning(self, unit: Unit, wrappers: Dict[str, QuantLayer], xfp: torch.Tensor,
                       xq: torch.Tensor) -> bool:
        if not self.bias_correction:
            return False
        correct_unit_biases(unit.run_float, {n: self.fp.get_submodule(n) for n in wrappers}, unit.forward,
                            wrappers, xfp, xq)
        return True

    def deploy(self, unit: Unit, name: str, exported: nn.Module) -> None:
        # ``work`` keeps the frozen fp32 layer (the simulation); the copy that ships gets the export.
        set_submodule(self.deployed, name, exported)


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
                       ) -> Tuple[nn.Module, nn.Module, List[dict]]:
    """Quantize a folded MobileNetV2 unit by unit.

    holdout: images never learned on (best: crops of other photographs), carried through the float
    and the quantized network like ``calib``; each unit keeps its learned rounding only if that
    lowers the unit's loss on them, so learning cannot end worse than the initial grid on images
    it did not fit. None: the first ``cfg.eval_samples`` calibration images decide (seen in learning).

    Returns ``(deployed, simulated, stats)``: ``deployed`` is a deep copy of ``model`` whose
    convs/linears are QuantConv2d/QuantLinear (with ActFakeQuant in front below 8-bit
    activations); ``simulated`` is another copy holding the fp32 simulation used during learning;
    ``stats`` has per-unit losses and seconds. ``model`` itself is not modified."""
    if calib.dim() != 4 or calib.shape[1] != 3:
        raise ValueError(f"quantize_mobilenet: calib shape {tuple(calib.shape)}; expected [n, 3, H, W] images")
    if holdout is not None and (holdout.dim() != 4 or holdout.shape[1:] != calib.shape[1:] or holdout.shape[0] == 0):
        raise ValueError(f"quantize_mobilenet: holdout shape {tuple(holdout.shape)}; expected [m, "
                         f"{', '.join(map(str, calib.shape[1:]))}] images like calib, m >= 1")
    shared = cfg.shared(images=calib.shape[0])
    model = equalized(model, calib, cfg)
    fp, work, deployed = (copy.deepcopy(model).eval() for _ in range(3))
    for m in (fp, work, deployed):
        for p in m.parameters():
            p.requires_grad_(False)
    family = MobileNetV2Family(fp, work, deployed, shared, cfg.bias_correction)
    t0 = time.time()
    stats = reconstruct_units(family, calib.float(), shared, log,
                              holdout=holdout.float() if holdout is not None else None)
    log(f"quantized {len(stats)} units with {cfg.method} in {time.time() - t0:.1f} s")
    return deployed, work, stats
