"""Language models, block by block: the decoder/encoder family of the reconstruction engine.

The units are the model's repeated blocks (:func:`quantizer.blocks.find_blocks`); every
``nn.Linear`` inside a block (except ``config.skip``) is quantized by :mod:`quantizer.engine`.
Block 0's inputs and the keyword arguments each block needs (attention mask, position
ids/embeddings of HF decoders; per layer type where sliding-window and global layers alternate) are
captured by pre-hooks on the blocks, one window at a time so that every captured tensor has batch
size 1 and broadcasts over any mini-batch. With int8 activations a block's linears may first be
smoothed (SmoothQuant) and their inputs Hadamard-rotated. ``resume_dir`` keeps finished blocks
(:mod:`quantizer.resume`).
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .act_quant import ActQuantizer
from .blocks import BlockLayout, block_linears, find_blocks, matches, norm_gain, output_readers, unknown_layers
from .config import QuantizeConfig
from .engine import NORM_WEIGHTED_LOSSES, Family, QuantizationError, Unit, reconstruct_units, run_stream, unit_output
from .layers import LinearQuant, quant_layer
from .placement import Placement, check_device
from .resume import ResumeDir, model_fingerprint, tensor_fingerprint

__all__ = ["reconstruct", "capture_inputs", "block_kwargs", "BlockKwargs", "run_block", "BlockFamily",
           "QuantizationError"]


# -- capturing block 0's inputs -----------------------------------------------------------
class _Stop(Exception):
    pass


_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_position")


def _clean_kwargs(kwargs: dict) -> dict:
    kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
    if "use_cache" in kw:
        kw["use_cache"] = False
    if "output_attentions" in kw:
        kw["output_attentions"] = False
    return kw


def _same_arg(a, b) -> bool:
    """Whether two captured arguments are interchangeable: the same object, or equal tensors."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_arg(u, v) for u, v in zip(a, b))
    if isinstance(a, (bool, int, float, str, type(None))) and isinstance(b, (bool, int, float, str, type(None))):
        return type(a) is type(b) and a == b
    return False


class BlockKwargs(list):
    """The keyword arguments of every block (``self[i]`` is block ``i``'s dict), as the model's own
    forward passes them. Models with several layer types (Gemma 2/3, Qwen2 with sliding windows:
    sliding-window or global mask, local or global rotary embeddings) give each block those of its
    type; blocks whose arguments are the same objects or equal tensors share one dict, so memory
    holds one set per layer type, not one per block."""

    def distinct(self) -> int:
        return len({id(k) for k in self})


def block_kwargs(kw, i: int) -> dict:
    """Block ``i``'s keyword arguments from :func:`capture_inputs`' ``kw`` (also accepts a single
    dict, which then holds for every block)."""
    return kw[i] if isinstance(kw, list) else kw


@torch.no_grad()
def capture_inputs(model: nn.Module, layout: BlockLayout, ids: torch.Tensor) -> Tuple[torch.Tensor, BlockKwargs]:
    """``(x [n, L, H] fp32 on CPU, kwargs)``: block 0's input for each calibration window and
    every block's keyword arguments (:class:`BlockKwargs`). The first window runs through every
    block to record each one's arguments (the same for every window of one length: masks, position
    embeddings); the others stop at block 0."""
    store: Dict[str, object] = {}
    nblocks = len(layout.blocks)
    kws: List[object] = [None] * nblocks

    def hook(i):
        def f(module, args, kwargs):
            if i == 0:
                x = args[0] if args else kwargs["hidden_states"]
                store["x"] = x.detach().float().cpu()
            if "kw" not in store:   # the first window: record, and run on up to the last block
                kws[i] = _clean_kwargs(kwargs)
                if all(k is not None for k in kws):
                    store["kw"] = True
                    raise _Stop
                return None
            raise _Stop
        return f

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(layout.blocks)]
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
            store["kw"] = True   # blocks the forward never called keep block 0's arguments
    finally:
        for h in handles:
            h.remove()
    out = BlockKwargs()
    for kw in kws:
        kw = kws[0] if kw is None else kw
        twin = next((k for k in out if k.keys() == kw.keys() and all(_same_arg(k[n], kw[n]) for n in kw)), None)
        out.append(kw if twin is None else twin)
    return torch.stack(xs), out


def run_block(block: nn.Module, x: torch.Tensor, kw: dict, batch: int) -> torch.Tensor:
    """The block's hidden-state output for every row of ``x`` (mini-batches of ``batch``)."""
    return run_stream(lambda xb: unit_output(block(xb, **kw)), x, batch)


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

    x = x.to(next(block.parameters()).device)  # the block's device (the rows may be in pinned CPU memory)
    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in names]
    try:
        run_block(block, x, kw, batch)
    finally:
        for h in handles:
            h.remove()
    return smooth_block(block, absmax, alpha)


class BlockFamily(Family):
    """A Hugging Face style stack of blocks; each block is one unit, its linears are quantized."""

    def __init__(self, layout: BlockLayout, kw: dict, cfg: QuantizeConfig, log: Callable[[str], None],
                 readers: Optional[List[List[nn.Module]]] = None):
        self.layout, self.kw, self.cfg, self.log = layout, kw, cfg, log
        # the norms reading each block's output (blocks.output_readers), for the "norm" loss; a norm
        # reads the outputs of every block before it, so its gain is taken once (by module id)
        self.readers = readers if readers is not None else [[] for _ in layout.blocks]
        self.gains: Dict[int, Optional[torch.Tensor]] = {}
        self.stream_batch = max(cfg.batch_size, 8)
        self.left_float: List[str] = [n for n in layout.outside if not matches(n, cfg.skip)]
        self.rotations: Dict[str, int] = {}

    def place(self, placement: Placement) -> None:
        # Masks and position embeddings go to the compute device once, shared by every block.
        self.kw = placement.move_tree(self.kw)

    def block_kwargs(self, i: int) -> dict:
        """The keyword arguments block ``i`` gets (its own layer type's mask and position embeddings)."""
        return block_kwargs(self.kw, i)

    def units(self):
        n = len(self.layout.blocks)
        for i, block in enumerate(self.layout.blocks):
            prefix = f"{self.layout.path}.{i}."
            self.left_float += [prefix + u for u in unknown_layers(block)]
            forward = (lambda b, kw: lambda xb: unit_output(b(xb, **kw)))(block, self.block_kwargs(i))
            yield Unit(label=f"block {i + 1}/{n}", root=block, layers=block_linears(block, prefix, self.cfg.skip),
                       forward=forward, run_float=forward, output_gains=self.output_gains(i))

    def output_gains(self, i: int) -> Tuple[torch.Tensor, ...]:
        """Per-channel gains of the norms reading block ``i``'s output (the "norm" loss only)."""
        if self.cfg.loss not in NORM_WEIGHTED_LOSSES:
            return ()
        for r in self.readers[i]:
            if id(r) not in self.gains:
                self.gains[id(r)] = norm_gain(r)
        return tuple(g for g in (self.gains[id(r)] for r in self.readers[i]) if g is not None)

    def before_wrapping(self, unit: Unit, xq: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.smooth is not None and cfg.act_bits:
            rows = xq[:min(cfg.eval_samples, xq.shape[0])]
            kw = self.block_kwargs(self.layout.blocks.index(unit.root))
            smoothed = _smooth(unit.root, unit.layers, rows, kw, self.stream_batch, cfg.smooth)
            self.log(f"{unit.label}: smoothed the inputs of {len(smoothed)} linears (alpha={cfg.smooth})")
        self.rotations = cfg.rotation_blocks(unit.layers)
        if self.rotations:
            blocks = sorted(set(self.rotations.values()))
            self.log(f"{unit.label}: Hadamard-rotated the inputs of {len(self.rotations)} linears "
                     f"(blocks {', '.join(map(str, blocks))})")

    def wrap(self, unit: Unit, name: str, layer: nn.Module) -> LinearQuant:
        cfg = self.cfg
        aq = ActQuantizer(cfg.act_bits) if cfg.act_bits else None
        return quant_layer(layer, cfg.method, cfg.weight, cfg.rounding_options(), aq,
                           input_rotation=self.rotations.get(name, 0))


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def check_language_model_config(cfg: QuantizeConfig) -> None:
    """What a language model's blocks can ship: int8 static activations (the kernels' width)
    and one weight format for every block linear."""
    if cfg.act_bits not in (None, 8):
        raise ValueError(f"QuantizeConfig: act_bits={cfg.act_bits!r}; expected None or 8 for a language model "
                         "(its kernels run int8 activations)")
    if cfg.first_last is not None:
        raise ValueError(f"QuantizeConfig: first_last={cfg.first_last}; expected None for a language model "
                         "(quantize every block linear with `weight`, keep others float with `skip`)")


def reconstruct(model: nn.Module, ids: torch.Tensor, cfg: QuantizeConfig,
                log: Callable[[str], None] = _log_default) -> nn.Module:
    """Quantize every linear of ``model``'s blocks in place (see the module docstring)."""
    check_language_model_config(cfg)
    layout = find_blocks(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    nblocks = len(layout.blocks)

    resume = None
    if cfg.resume_dir:
        identity = {"model": model_fingerprint(model), "calibration": tensor_fingerprint(ids),
                    "config": cfg.fingerprint_dict()}
        resume = ResumeDir(cfg.resume_dir, identity, nblocks)
        if resume.finished:
            log(f"resuming from {cfg.resume_dir}: {resume.finished}/{nblocks} blocks already finished")

    t0 = time.time()
    x, kw = capture_inputs(model, layout, ids)
    log(f"captured {tuple(x.shape)} block inputs in {time.time() - t0:.1f} s; {nblocks} blocks at {layout.path}, "
        f"method={cfg.method}, {cfg.layer_spec}, iters={cfg.iters}")
    family = BlockFamily(layout, kw, cfg, log, output_readers(model, layout))
    reconstruct_units(family, x, cfg, log, resume=resume, place=Placement(check_device(cfg.device)))
    if family.left_float:
        warnings.warn(f"left in float (not inside known blocks or not nn.Linear): {', '.join(family.left_float)}",
                      stacklevel=2)
    log(f"quantized {nblocks} blocks in {time.time() - t0:.1f} s")
    return model
