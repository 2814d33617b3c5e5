"""Block-by-block reconstruction: the one engine behind every learned rounding.

For each block ``i`` (in order):

1. ``targets = fp_block_i(x_fp)``: the float block on the float model's inputs;
2. its linears become :class:`QuantWrapper` (a rounding module, optionally an LSQ activation
   quantizer), activation grids start from statistics of the block's inputs;
3. the rounding parameters minimize ``mean((block_i(x_q) - targets)^2)`` where ``x_q`` are the
   outputs of the already-quantized blocks ``0..i-1`` (QDrop optionally mixes in ``x_fp``);
4. the learned layers are exported to format v1 codes and the block's linears are replaced by
   :class:`fxkernels.QuantLinear`; ``x_q`` advances through the block *as exported* (a frozen
   fake-quant layer that is bit-identical to the export's dequantization), ``x_fp`` becomes
   ``targets``; with ``resume_dir`` the block is saved atomically.

Caches (``x_fp``, ``x_q``, targets; ``[nsamples, seqlen, hidden]`` fp32) live on the CPU and
stream through the block in mini-batches. Block 0's inputs and the keyword arguments the block
needs (attention mask, position ids/embeddings of HF decoders) are captured by a pre-hook on
block 0 that stops the forward pass there, one window at a time so that every captured tensor
has batch size 1 and broadcasts over any mini-batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fxkernels.format import QuantSpec
from fxkernels.nn import QuantLinear, set_submodule
from fxkernels.rotation import hadamard_transform

from .act_quant import ActQuantizer, QMAX as AQMAX, QMIN as AQMIN
from .blocks import BlockLayout, block_linears, find_blocks, matches, unknown_layers
from .config import QuantizeConfig
from .rounding import WeightQuantizer, make_quantizer

RESUME_FORMAT = "flexround-resume"
RESUME_VERSION = 1
ENGINE_OPTIONS = ("reg_weight",)


class QuantizationError(RuntimeError):
    """Learning could not finish a block (non-finite loss); finished blocks are kept."""


# -- layers used while learning ------------------------------------------------------------
class QuantWrapper(nn.Module):
    """A linear layer during learning: ``F.linear(aq(x), wq(), bias)``; with ``input_rotation``
    the input is first rotated (``x H^T``) and ``wq`` rounds the rotated weight ``W H^T``."""

    def __init__(self, wq: WeightQuantizer, bias: Optional[torch.Tensor], aq: Optional[ActQuantizer],
                 input_rotation: int = 0):
        super().__init__()
        self.wq, self.aq, self.input_rotation = wq, aq, input_rotation
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.record: Optional[List[torch.Tensor]] = None  # inputs collected for activation init

    def forward(self, x):
        if self.input_rotation:
            x = hadamard_transform(x, self.input_rotation)
        if self.record is not None:
            self.record.append(x.detach().reshape(-1, x.shape[-1]))
        if self.aq is not None:
            x = self.aq(x)
        return F.linear(x, self.wq(), self.bias)


class FrozenLinear(nn.Module):
    """An exported layer simulated in fp32: ``F.linear(fq(x), dequant(codes), bias)``.

    Its weight is ``fxkernels.format.dequantize`` of the exported codes, hence equal bit for bit
    to the rounding's last hard forward; the activation grid is the exported one. Used to push
    ``x_q`` through finished blocks both in a fresh run and after resuming, so both give the same
    numbers."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.register_buffer("weight", layer.dequantized_weight())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        static = layer.act_scale is not None
        self.register_buffer("act_scale", layer.act_scale.clone() if static else None)
        self.register_buffer("act_zero", layer.act_zero.float().clone() if static else None)
        self.input_rotation = layer.input_rotation

    def forward(self, x):
        if self.input_rotation:
            x = hadamard_transform(x, self.input_rotation)
        if self.act_scale is not None:
            inv = 1.0 / self.act_scale
            x = (torch.clamp(torch.round(x * inv) + self.act_zero, AQMIN, AQMAX) - self.act_zero) * self.act_scale
        return F.linear(x, self.weight, self.bias)


def export_layer(wrapper: QuantWrapper, spec: QuantSpec) -> QuantLinear:
    codes, scale, zero = wrapper.wq.export()
    act_scale = act_zero = None
    if wrapper.aq is not None:
        act_scale, act_zero = wrapper.aq.export()
    return QuantLinear.from_codes(codes, scale, zero, spec, bias=wrapper.bias,
                                  act_scale=act_scale, act_zero=act_zero, input_rotation=wrapper.input_rotation)


class SignSGD:
    """``p -= lr_t * sign(grad)`` with ``lr_t`` decaying linearly to 0 (SignRound's optimizer)."""

    def __init__(self, params, lr: float, total_steps: int):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.total, self.t = lr, max(total_steps, 1), 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        lr = self.lr * (1 - self.t / self.total)
        for p in self.params:
            if p.grad is not None:
                p.add_(torch.sign(p.grad), alpha=-lr)
        self.t += 1


# -- capturing block 0's inputs -----------------------------------------------------------
class _Stop(Exception):
    pass


_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_position")


def _clean_kwargs(kwargs: dict) -> dict:
    kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
    if "use_cache" in kw:
        kw["use_cache"] = False
    if "output_attentions" in kw:
        kw["output_attentions"] = False
    return kw


@torch.no_grad()
def capture_inputs(model: nn.Module, layout: BlockLayout, ids: torch.Tensor) -> Tuple[torch.Tensor, dict]:
    """``(x [n, L, H] fp32 on CPU, kwargs)`` that block 0 receives for each calibration window."""
    store: Dict[str, object] = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        store["x"] = x.detach().float().cpu()
        if "kw" not in store:
            store["kw"] = _clean_kwargs(kwargs)
        raise _Stop

    handle = layout.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    xs = []
    try:
        for row in ids:
            try:
                try:
                    model(row[None], use_cache=False)
                except TypeError:  # models whose forward has no use_cache argument
                    model(row[None])
            except _Stop:
                pass
            if "x" not in store:
                raise ValueError(f"{type(model).__name__}: block 0 at {layout.path}.0 was never called by the "
                                 "model's forward; cannot capture its inputs")
            xs.append(store.pop("x")[0])
    finally:
        handle.remove()
    return torch.stack(xs), store["kw"]


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kw: dict, batch: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], batch):
        out[s:s + batch] = _block_out(block(x[s:s + batch], **kw))
    return out


# -- resume directory ---------------------------------------------------------------------
def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def model_fingerprint(model: nn.Module) -> str:
    """Class, parameter names/shapes and float64 sums of every parameter (cheap, order-aware)."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.17g}".encode())
    return h.hexdigest()[:32]


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:32]


class ResumeDir:
    """``manifest.json`` + ``block_NNN.safetensors`` (QuantLinear buffers, layer specs in the
    metadata). The manifest is rewritten after each block file lands, both atomically."""

    def __init__(self, path: str, identity: dict, nblocks: int):
        self.path, self.identity, self.nblocks = path, identity, nblocks
        os.makedirs(path, exist_ok=True)
        self.manifest_path = os.path.join(path, "manifest.json")
        self.finished = 0
        if os.path.exists(self.manifest_path):
            with open(self.manifest_path) as f:
                man = json.load(f)
            if man.get("format") != RESUME_FORMAT or man.get("version") != RESUME_VERSION:
                raise ValueError(f"resume_dir={path!r}: manifest format {man.get('format')!r} v{man.get('version')}; "
                                 f"expected {RESUME_FORMAT!r} v{RESUME_VERSION}")
            for key in ("model", "calibration", "config"):
                if man["identity"].get(key) != identity[key]:
                    what = {"model": "another model (weights or architecture differ)",
                            "calibration": "other calibration data",
                            "config": "another configuration"}[key]
                    detail = ""
                    if key == "config":
                        old, new = man["identity"]["config"], identity["config"]
                        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                        detail = f" (differing fields: {', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)})"
                    raise ValueError(f"resume_dir={path!r} was written for {what}{detail}; use a fresh "
                                     "resume_dir or the original model/config")
            self.finished = int(man["finished"])
        self._write_manifest()

    def _write_manifest(self):
        man = {"format": RESUME_FORMAT, "version": RESUME_VERSION, "identity": self.identity,
               "nblocks": self.nblocks, "finished": self.finished}

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(man, f, indent=1, sort_keys=True)
        _atomic_write(self.manifest_path, write)

    def block_path(self, i: int) -> str:
        return os.path.join(self.path, f"block_{i:03d}.safetensors")

    def save_block(self, i: int, layers: Dict[str, QuantLinear]) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, layer in layers.items():
            for b, t in layer.named_buffers():
                if t is not None:
                    tensors[f"{name}.{b}"] = t.detach().contiguous().cpu()
            meta[name] = layer.entry()
        _atomic_write(self.block_path(i), lambda tmp: save_file(tensors, tmp, metadata={"layers": json.dumps(meta)}))
        self.finished = i + 1
        self._write_manifest()

    def load_block(self, i: int) -> Dict[str, QuantLinear]:
        from safetensors import safe_open

        path = self.block_path(i)
        if not os.path.exists(path):
            raise ValueError(f"resume_dir={self.path!r}: manifest says {self.finished} blocks are finished "
                             f"but {os.path.basename(path)} is missing; use a fresh resume_dir")
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["layers"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        layers = {}
        for name, m in meta.items():
            layer = QuantLinear.from_entry(m)
            state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            layer.load_state_dict(state)
            layers[name] = layer
        return layers


# -- the engine -----------------------------------------------------------------------------
def _log_default(msg: str) -> None:
    print(msg, flush=True)


def _wrap_block(block: nn.Module, names: List[Tuple[str, nn.Linear]], cfg: QuantizeConfig) -> Dict[str, QuantWrapper]:
    wrappers = {}
    # "reg_weight" belongs to the engine (AdaRound's regularizer weight), the rest to the rounding.
    options = {k: v for k, v in cfg.options.items() if k not in ENGINE_OPTIONS}
    if cfg.method in ("flexround", "adaround", "rtn"):
        options.setdefault("init", cfg.init)
    rotations = cfg.rotation_blocks(names)
    for name, lin in names:
        weight = lin.weight.detach()
        rot = rotations.get(name, 0)
        if rot:
            weight = hadamard_transform(weight.float(), rot)  # rows w -> w H^T (H is symmetric)
        wq = make_quantizer(cfg.method, weight, cfg.weight, options)
        aq = ActQuantizer() if cfg.act_bits else None
        w = QuantWrapper(wq, lin.bias, aq, input_rotation=rot)
        set_submodule(block, name, w)
        wrappers[name] = w
    return wrappers


def _set_hard(wrappers, hard: bool):
    for w in wrappers.values():
        w.wq.hard = hard if w.wq.method == "adaround" else True


def optimizer_step(opts, scheds, wrappers: Dict[str, nn.Module], loss: torch.Tensor) -> None:
    """One learning step: gradients of ``loss``, every optimizer and schedule, then the roundings'
    projections (SignRound keeps its offsets inside their box)."""
    for o in opts:
        o.zero_grad()
    loss.backward()
    for o in opts:
        o.step()
    for sch in scheds:
        sch.step()
    for w in wrappers.values():
        if hasattr(w.wq, "project"):
            w.wq.project()


def reconstruction_loss(y: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Block-output error. ``"mse"``: plain mean squared error. ``"token"``: each token's squared
    error divided by its target's mean square. LLM residual streams carry "massive activation"
    tokens (the attention sink) whose few channels are 100-1000x larger than the rest; under a
    plain MSE they own the gradient and the ordinary tokens, which decide perplexity, get none."""
    err = (y - t).pow(2)
    if kind == "token":
        err = err / t.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-8)
    return err.mean()


@torch.no_grad()
def _eval_loss(block, x, t, kw, batch, kind: str = "mse") -> float:
    total = 0.0
    for s in range(0, x.shape[0], batch):
        y = _block_out(block(x[s:s + batch], **kw))
        total += float(reconstruction_loss(y, t[s:s + batch], kind)) * y.numel()
    return total / t.numel()


def _learn_block(i: int, block: nn.Module, wrappers: Dict[str, QuantWrapper], xq: torch.Tensor,
                 xfp: torch.Tensor, targets: torch.Tensor, kw: dict, cfg: QuantizeConfig,
                 label: str, log) -> Tuple[float, float]:
    """Learn the block's rounding (and activation grids); returns (loss before, loss after)."""
    n = xq.shape[0]
    ne = min(cfg.eval_samples, n)
    bs = cfg.batch_size
    # Activation grids from the statistics of this block's (quantized-stream) inputs.
    if cfg.act_bits:
        for w in wrappers.values():
            w.aq.enabled, w.record = False, []
        run_block(block, xq[:ne], kw, bs)
        for w in wrappers.values():
            w.aq.init_from(torch.cat(w.record))
            w.aq.enabled, w.record = True, None

    _set_hard(wrappers, True)
    before = _eval_loss(block, xq[:ne], targets[:ne], kw, bs, cfg.loss)
    if cfg.iters == 0 or cfg.method == "rtn":
        return before, before
    init_state = copy.deepcopy({k: w.state_dict() for k, w in wrappers.items()})
    _set_hard(wrappers, False)

    lr = cfg.learning_rate
    wparams = [g for w in wrappers.values() for g in w.wq.param_groups(lr)]
    aparams = [p for w in wrappers.values() if w.aq is not None for p in w.aq.parameters()]
    opts = []
    if cfg.method == "signround":
        opts.append(SignSGD([p for g in wparams for p in g["params"]], lr, cfg.iters))
    else:
        opts.append(torch.optim.Adam(wparams, lr=lr, fused=True))
    if aparams and cfg.act_lr > 0:
        opts.append(torch.optim.Adam(aparams, lr=cfg.act_lr, fused=True))
    # Linear decay to zero: short schedules end with small steps, so the last iterate (the one
    # exported) is not a random point of a noisy walk around the optimum.
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 - t / cfg.iters)
              for o in opts if isinstance(o, torch.optim.Optimizer) and cfg.lr_decay]
    keep_best = cfg.method == "signround"
    best_loss, best_state = float("inf"), None
    reg_weight = float(cfg.options.get("reg_weight", 0.1)) * before if cfg.method == "adaround" else 0.0

    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range((cfg.iters * bs) // n + 1)])
    it = range(cfg.iters)
    if cfg.progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=label, leave=False, unit="it")
    for step in it:
        idx = order[step * bs:(step + 1) * bs]
        xin = xq[idx]
        if cfg.qdrop > 0:
            keep_fp = torch.rand(xin.shape, generator=gen) < cfg.qdrop
            xin = torch.where(keep_fp, xfp[idx], xin)
        y = _block_out(block(xin, **kw))
        rec = reconstruction_loss(y, targets[idx], cfg.loss)
        loss = rec
        if reg_weight:
            progress = step / cfg.iters
            regs = [r for r in (w.wq.regularizer(progress) for w in wrappers.values()) if r is not None]
            if regs:
                loss = loss + reg_weight * torch.stack(regs).mean()
        if not torch.isfinite(loss):
            raise QuantizationError(
                f"{label}: the loss became {float(loss.detach())} at iteration {step}; learning stopped. Blocks before "
                f"this one are finished (and saved if resume_dir was given). Try a smaller lr (now {lr:g}) or "
                "check the model's activations for Inf/NaN.")
        if keep_best and float(rec.detach()) < best_loss:
            best_loss = float(rec.detach())
            best_state = copy.deepcopy({k: w.state_dict() for k, w in wrappers.items()})
        optimizer_step(opts, scheds, wrappers, loss)
        if cfg.progress and step % 10 == 0:
            it.set_postfix(loss=f"{float(rec.detach()):.3e}")
    if keep_best and best_state is not None:
        for k, w in wrappers.items():
            w.load_state_dict(best_state[k])
    _set_hard(wrappers, True)
    after = _eval_loss(block, xq[:ne], targets[:ne], kw, bs, cfg.loss)
    if not after <= before:  # also catches NaN
        # Learning made this block worse on the evaluation windows (short schedule, noisy
        # batches): ship the initial grid instead.
        for k, w in wrappers.items():
            w.load_state_dict(init_state[k])
        log(f"{label}: learned loss {after:.4e} is not below the initial {before:.4e}; keeping the initial grid")
        after = before
    return before, after


@torch.no_grad()
def _smooth(block: nn.Module, names, x: torch.Tensor, kw: dict, batch: int, alpha: float) -> List[str]:
    """Per-channel max |input| of the block's float linears on ``x``, then quantizer.smooth."""
    from .smooth import smooth_block

    absmax: Dict[str, torch.Tensor] = {}

    def hook(name):
        def f(module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
        return f

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in names]
    try:
        run_block(block, x, kw, batch)
    finally:
        for h in handles:
            h.remove()
    return smooth_block(block, absmax, alpha)


def reconstruct(model: nn.Module, ids: torch.Tensor, cfg: QuantizeConfig,
                log: Callable[[str], None] = _log_default) -> nn.Module:
    """Quantize every linear of ``model``'s blocks in place (see the module docstring)."""
    layout = find_blocks(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    nblocks = len(layout.blocks)
    spec = cfg.layer_spec

    resume = None
    if cfg.resume_dir:
        identity = {"model": model_fingerprint(model), "calibration": tensor_fingerprint(ids),
                    "config": cfg.fingerprint_dict()}
        resume = ResumeDir(cfg.resume_dir, identity, nblocks)
        if resume.finished:
            log(f"resuming from {cfg.resume_dir}: {resume.finished}/{nblocks} blocks already finished")

    t0 = time.time()
    x, kw = capture_inputs(model, layout, ids)
    xfp, xq = x, x.clone()
    bs = cfg.batch_size
    prop_batch = max(bs, 8)
    left_float: List[str] = [n for n in layout.outside if not matches(n, cfg.skip)]
    log(f"captured {tuple(x.shape)} block inputs in {time.time() - t0:.1f} s; {nblocks} blocks at {layout.path}, "
        f"method={cfg.method}, {spec}, iters={cfg.iters}")

    for i, block in enumerate(layout.blocks):
        label = f"block {i + 1}/{nblocks}"
        tb = time.time()
        prefix = f"{layout.path}.{i}."
        unknown = unknown_layers(block)
        if unknown:
            left_float += [prefix + u for u in unknown]
        names = block_linears(block, prefix, cfg.skip)
        targets = run_block(block, xfp, kw, prop_batch)
        if not names:
            xq = run_block(block, xq, kw, prop_batch)
            xfp = targets
            continue
        if resume is not None and i < resume.finished:
            layers = resume.load_block(i)
            missing = sorted(set(n for n, _ in names) ^ set(layers))
            if missing:
                raise ValueError(f"resume_dir={cfg.resume_dir!r}: block {i} holds layers {sorted(layers)}; "
                                 f"expected {sorted(n for n, _ in names)}")
            before = after = float("nan")
        else:
            torch.manual_seed(cfg.seed * 1_000_003 + i)
            if cfg.smooth is not None and cfg.act_bits:
                smoothed = _smooth(block, names, xq[:min(cfg.eval_samples, xq.shape[0])], kw, prop_batch, cfg.smooth)
                log(f"{label}: smoothed the inputs of {len(smoothed)} linears (alpha={cfg.smooth})")
            wrappers = _wrap_block(block, names, cfg)
            rotated = {w.input_rotation for w in wrappers.values() if w.input_rotation}
            if rotated:
                log(f"{label}: Hadamard-rotated the inputs of {sum(1 for w in wrappers.values() if w.input_rotation)} "
                    f"linears (blocks {', '.join(map(str, sorted(rotated)))})")
            try:
                before, after = _learn_block(i, block, wrappers, xq, xfp, targets, kw, cfg, label, log)
            except BaseException:
                # Leave the model usable: this block goes back to its float linears.
                for name, lin in names:
                    set_submodule(block, name, lin)
                raise
            layers = {name: export_layer(w, spec) for name, w in wrappers.items()}
        # Advance the quantized stream through the block exactly as exported.
        for name, layer in layers.items():
            set_submodule(block, name, FrozenLinear(layer))
        xq = run_block(block, xq, kw, prop_batch)
        for name, layer in layers.items():
            set_submodule(block, name, layer)
        xfp = targets
        if resume is not None and i >= resume.finished:
            resume.save_block(i, layers)
        if before == before:
            log(f"{label}: loss {before:.4e} -> {after:.4e} ({time.time() - tb:.1f} s)")
        else:
            log(f"{label}: loaded from resume_dir ({time.time() - tb:.1f} s)")
        if not torch.isfinite(xq).all():
            raise QuantizationError(f"{label}: the quantized model's activations became non-finite after this block")
    if left_float:
        warnings.warn(f"left in float (not inside known blocks or not nn.Linear): {', '.join(left_float)}",
                      stacklevel=2)
    log(f"quantized {nblocks} blocks in {time.time() - t0:.1f} s")
    return model
