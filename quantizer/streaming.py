"""Quantize a model larger than memory: one block at a time from its safetensors files.

:func:`quantize_pretrained` never holds the whole fp32 model. The model is built on the meta
device (parameters without storage; buffers such as rotary tables are real), then

1. the modules outside the blocks that the forward pass reaches before block 0 (the embeddings)
   are read from the files when first called, block 0's inputs are captured, and they go back
   to meta (the blocks pass their input through unchanged meanwhile: nothing runs on meta);
2. for each block: its tensors are read (fp32), it learns and is exported by the shared engine
   (:func:`quantizer.engine.reconstruct_units`, on ``config.device``), its state goes to the
   output's current shard, and its parameters go back to meta, with the C heap trimmed;
3. the tensors outside the blocks (embeddings, final norm, lm_head) are copied one at a time.

The output is what :func:`fxkernels.save_quantized` writes for the same quantized model
(``quant_config.json`` with the same layers and ``tied`` map, ``config.json``, sharded
safetensors with an index when ``max_shard_size`` is exceeded), so ``load_quantized`` and
``from_pretrained`` read it. Peak memory: one block's float weights and learning state, the
streams (``3 x nsamples x seqlen x hidden x 4`` bytes) and the largest tensor outside the blocks
while it is copied; the writer puts each tensor on disk as it comes (no shard is held in memory,
whatever ``max_shard_size``). Allocations of
4 MiB or more are mmapped for the rest of the process (:func:`~quantizer.placement.map_large_allocations`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fxkernels.checkpoint import ShardedWriter, check_weight_files, parameters_on_meta, weight_files
from fxkernels.layers import CheckpointError, layer_entries

from .blocks import find_blocks, output_readers
from .config import QuantizeConfig
from .engine import NORM_WEIGHTED_LOSSES, reconstruct_units
from .placement import Placement, check_device, map_large_allocations, release_free_heap, rss_peak_bytes
from .reconstruct import BlockFamily, _log_default, capture_inputs, check_language_model_config
from .resume import ResumeDir, tensor_fingerprint

__all__ = ["quantize_pretrained", "SafetensorsSource", "StreamResult"]

WHO = "quantize_pretrained"
# Shard size of the written checkpoint (the writer holds no shard in memory, so it does not add to
# the peak): a 1B model's packed blocks are ~26 MB each; a 7B model gets ~40 files.
DEFAULT_SHARD_SIZE = "100MB"


class SafetensorsSource:
    """The tensors of a Hugging Face model directory (``model.safetensors`` or shards with
    ``model.safetensors.index.json``), read on request. Every file is checked up front (present,
    header intact and covering its data, the index's names inside it): a missing or truncated
    shard raises :class:`~fxkernels.layers.CheckpointError` naming the file before any work.
    Files are opened per read and closed after, so their pages do not stay mapped (and counted
    in the process's resident size) after a block is done."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        check_weight_files(directory, WHO)
        self.where: Dict[str, str] = {}
        for path, names in weight_files(directory, WHO):
            if names is None:
                with safe_open(path, "pt") as f:
                    names = list(f.keys())
            for n in names:
                self.where[n] = path

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``names``, each shard opened once."""
        from safetensors import SafetensorError, safe_open

        by_file: Dict[str, List[str]] = {}
        for n in names:
            if n not in self.where:
                raise CheckpointError(f"{WHO}: tensor {n!r} is in none of the weight files of {self.directory}; "
                                      "expected a checkpoint of the architecture its config.json names")
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(path, "pt") as f:
                    for n in group:
                        # get_tensor's tensors keep the file's whole mapping alive: a copy the process
                        # owns, or one norm weight held by the writer keeps a shard's pages resident.
                        out[n] = f.get_tensor(n).clone()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{WHO}: {path} is corrupt or truncated ({e})") from e
        return out


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # Learning runs in fp32 whatever the files store (bf16/fp16 checkpoints), as the in-memory path does.
    return t.float() if t.is_floating_point() else t


class MetaParameters:
    """The model's parameters by name, each either on meta or read from ``source``.

    A tied parameter (lm_head sharing the embedding) is one object held by several modules; it
    is replaced in every holder, so ties survive materializing and releasing."""

    def __init__(self, model: nn.Module, source: SafetensorsSource):
        self.source = source
        self.holders: Dict[str, List[Tuple[nn.Module, str]]] = {}   # name -> every (module, attribute)
        self.aliases: Dict[str, List[str]] = {}                       # name -> every dotted name, first = name
        self.slot: Dict[Tuple[int, str], str] = {}                   # (id(module), attribute) -> name
        first: Dict[int, str] = {}
        # state-dict order, so that the first name of a tied parameter is the one save_quantized keeps
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is None or (id(module), pname) in self.slot:
                    continue
                full = f"{mname}.{pname}" if mname else pname
                name = first.setdefault(id(p), full)
                self.holders.setdefault(name, []).append((module, pname))
                self.aliases.setdefault(name, []).append(full)
                self.slot[(id(module), pname)] = name
        self.names: List[str] = list(self.holders)
        self.live: set = set()

    def _set(self, name: str, param: nn.Parameter) -> None:
        for module, pname in self.holders[name]:
            module._parameters[pname] = param

    def materialize(self, names: Sequence[str]) -> None:
        todo = [n for n in names if n not in self.live]
        for name, t in self.source.read(todo).items():
            self._set(name, nn.Parameter(_fp32(t), requires_grad=False))
            self.live.add(name)

    def release(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self.live:
                module, pname = self.holders[name][0]
                p = module._parameters[pname]
                self._set(name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
                self.live.discard(name)

    def under(self, prefix: str) -> List[str]:
        return [n for n in self.names if n.startswith(prefix)]


def _skeleton(directory: str) -> nn.Module:
    """The model of ``directory``'s config.json with every parameter on meta, in fp32."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(directory)
    archs = getattr(cfg, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    with parameters_on_meta():
        if cls is not None:
            model = cls._from_config(cfg, dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def _passthrough(hidden_states=None, *args, **kwargs):
    return hidden_states if hidden_states is not None else kwargs["hidden_states"]


@torch.no_grad()
def _capture(model: nn.Module, layout, params: MetaParameters, ids: torch.Tensor, block_paths: List[str]):
    """Block 0's inputs and the blocks' keyword arguments, with only the modules the forward
    reaches before block 0 read from the files (on their first call) and released after."""
    outside = [(name, m) for name, m in model.named_modules()
               if not any(name == p or name.startswith(p + ".") for p in block_paths)
               and any(p is not None for p in m._parameters.values())]
    read: List[str] = []

    def reader(module, args):
        names = [params.slot[(id(module), n)] for n, p in module._parameters.items() if p is not None]
        params.materialize(names)
        read.extend(names)

    handles = [m.register_forward_pre_hook(reader) for _, m in outside]
    # Blocks pass their input through while capturing: capture may run the first window through
    # every block to record each one's arguments, and their weights are still on meta.
    for block in layout.blocks:
        block.forward = _passthrough
    try:
        x, kw = capture_inputs(model, layout, ids)
    finally:
        for h in handles:
            h.remove()
        for block in layout.blocks:
            del block.forward
        params.release(read)
        release_free_heap()
    return x, kw


class StreamingBlockFamily(BlockFamily):
    """:class:`~quantizer.reconstruct.BlockFamily` whose blocks are read from the files when their
    turn comes and written to ``writer``, then released, when they are done."""

    def __init__(self, layout, kw, cfg: QuantizeConfig, log, params: MetaParameters, writer: ShardedWriter,
                 max_blocks: Optional[int] = None, readers=None):
        super().__init__(layout, kw, cfg, log, readers)
        self.params, self.writer, self.max_blocks = params, writer, max_blocks
        self.layers: Dict[str, dict] = {}
        self.cpu_seconds: List[float] = []  # process CPU time (all threads) of each finished block
        self._cpu_start = 0.0

    def output_gains(self, i: int):
        # The readers whose gains are not taken yet (the later blocks' residual norms, the final
        # norm) are read from the files for that moment, and go back to meta unless already live.
        if self.cfg.loss not in NORM_WEIGHTED_LOSSES or not self.readers[i]:
            return ()
        names = [self.params.slot[(id(r), n)] for r in self.readers[i] if id(r) not in self.gains
                 for n, p in r._parameters.items() if p is not None]
        fresh = [n for n in dict.fromkeys(names) if n not in self.params.live]
        self.params.materialize(fresh)
        try:
            return super().output_gains(i)
        finally:
            self.params.release(fresh)

    def units(self):
        for i, unit in enumerate(super().units()):
            if self.max_blocks is not None and i >= self.max_blocks:
                return
            self._cpu_start = time.process_time()
            self.params.materialize(self.params.under(f"{self.layout.path}.{i}."))
            yield unit

    def wrap(self, unit, name: str, layer: nn.Module):
        wrapper = super().wrap(unit, name, layer)
        # What each layer's forward saves for the backward (its fake-quantized weight and the
        # rounding's masks: ~0.25 GB per block of a 1B model) is recomputed instead: the peak of a
        # large model's run is in a block's backward pass.
        wrapper.recompute = True
        # The rounding holds its own fp32 copy of the weight: the float one goes back to meta (the
        # files still have it), one block-sized copy less while the block learns. A failing block
        # is not restored in float here: the run stops and nothing is written.
        self.params.release([self.params.slot[(id(layer), "weight")]])
        return wrapper

    def unit_done(self, unit, index: int, exported) -> None:
        prefix = f"{self.layout.path}.{index}."
        for name, t in unit.root.state_dict().items():
            self.writer.add(prefix + name, t.detach().contiguous())
        self.layers.update({prefix + n: e for n, e in layer_entries(unit.root).items()})
        # The float parameters (norms, and the float linears the exported layers replaced) go back
        # to meta; the exported layers' buffers now belong to the writer's shard.
        self.params.release(self.params.under(prefix))
        unit.root.to("meta")
        self.cpu_seconds.append(time.process_time() - self._cpu_start)


@dataclasses.dataclass
class StreamResult:
    """What :func:`quantize_pretrained` did: ``directory`` written (None when ``max_blocks`` stopped
    it early), per-block ``stats`` (the engine's dicts: seconds, rss_bytes, rss_peak_bytes,
    rss_peak_delta_bytes, need_bytes, device, device_peak_bytes, losses; plus ``cpu_seconds``, the
    process CPU time of the block over all threads), total ``seconds``, the process's
    ``rss_peak_bytes`` (VmHWM) and ``blocks`` (how many the model has; ``len(stats)`` were done)."""

    directory: Optional[str]
    stats: List[dict]
    seconds: float
    rss_peak_bytes: int
    blocks: int = 0

    @property
    def complete(self) -> bool:
        return self.directory is not None and len(self.stats) == self.blocks


def source_directory(source: str, log: Callable[[str], None] = print) -> str:
    """The Hugging Face directory of ``source``: an HF directory itself, or a GGUF file (or the
    bundled ``smollm2``) converted once to an fp32 directory in the cache, one tensor at a time
    (:mod:`quantizer.gguf_convert`: memory about one fp32 tensor, not the model)."""
    from . import models

    if source in ("smollm2", "SmolLM2-135M", "smollm2-135m"):
        out = os.path.join(models.cache_root(), "smollm2-135m-instruct-fp32")
        return out if models._is_hf_dir(out) else models._gguf_to_hf_dir(models.smollm2_gguf_path(), out, log=log)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ValueError(f"source={source!r}: no such GGUF file")
        # the same cache key as models.load_model, so both paths share one conversion
        key = os.path.splitext(os.path.basename(source))[0] + f"-{os.path.getsize(source)}-fp32"
        out = os.path.join(models.cache_root(), key)
        return out if models._is_hf_dir(out) else models._gguf_to_hf_dir(source, out, log=log)
    if not os.path.isdir(source) or not os.path.exists(os.path.join(source, "config.json")):
        raise ValueError(f"source={source!r}: expected a Hugging Face model directory (config.json + safetensors "
                         "weights) or a .gguf file")
    return source


def streamed_fingerprint(model: nn.Module, params: MetaParameters) -> str:
    """:func:`quantizer.resume.model_fingerprint` of the model the files hold, computed one
    tensor at a time (equal to the in-memory fingerprint, so a resume directory serves both paths)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        t = _fp32(params.source.read([name])[name])
        h.update(f"{name}{tuple(p.shape)}{float(t.double().sum()):.17g}".encode())
        del t
    release_free_heap()
    return h.hexdigest()[:32]


def quantize_pretrained(source: str, out_dir: str, calibration: Union[torch.Tensor, Sequence[torch.Tensor]],
                        config: Optional[QuantizeConfig] = None, *, tokenizer=None,
                        max_shard_size: Union[int, str, None] = DEFAULT_SHARD_SIZE, extra: Optional[dict] = None,
                        log: Optional[Callable[[str], None]] = None, max_blocks: Optional[int] = None,
                        **overrides) -> StreamResult:
    """Quantize the model in ``source`` block by block from its files and write the checkpoint
    to ``out_dir`` shard by shard, never holding the whole fp32 model (see the module docstring).

    source: a Hugging Face model directory with safetensors weights (single file or sharded), a
        ``.gguf`` file or ``"smollm2"`` (converted once to an fp32 directory in the cache).
    calibration: token ids as for :func:`quantizer.quantize`.
    config / overrides: the run (:class:`QuantizeConfig`; ``device="cuda"`` learns each block on
        the GPU, ``memory_budget`` bounds one block's need, ``resume_dir`` keeps finished blocks).
    tokenizer: saved with the checkpoint when given.
    max_shard_size: int bytes or "2GB"-style string (default 100MB; tensors go to disk as they come
        whatever the size); None writes one ``model.safetensors``.
    extra: free-form metadata stored in ``quant_config.json`` under ``"extra"``.
    max_blocks: learn only the first ``max_blocks`` blocks and stop, writing nothing (a measurement
        of per-block time and memory on models whose whole run takes too long); the result's
        ``directory`` is None and ``complete`` False unless the model has no more blocks.

    Returns a :class:`StreamResult` (stable interface: the scale bench reads it). Raises
    ``ValueError`` for a bad source, calibration or config,
    :class:`~fxkernels.layers.CheckpointError` naming a missing or truncated weight file,
    :class:`~quantizer.engine.MemoryBudgetError` when one block needs more than ``memory_budget``,
    and :class:`~quantizer.engine.QuantizationError` when learning diverges (with ``resume_dir``,
    finished blocks are kept for a rerun).
    """
    from .api import prepare_calibration, resolve_config

    t0 = time.time()
    log = log or _log_default
    cfg = resolve_config(config, overrides)
    check_language_model_config(cfg)
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise ValueError(f"max_blocks={max_blocks!r}; expected None or a positive int")
    place = Placement(check_device(cfg.device))
    map_large_allocations()  # freed weight-sized temporaries go back to the OS at once
    directory = source_directory(source, log=log)
    src = SafetensorsSource(directory)
    model = _skeleton(directory)
    for p in model.parameters():
        p.requires_grad_(False)
    params = MetaParameters(model, src)
    ids = prepare_calibration(calibration, cfg.nsamples, cfg.seqlen)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"calibration: token id {int(ids.max())} >= the model's vocab_size={vocab}")
    layout = find_blocks(model)
    nblocks = len(layout.blocks)
    block_paths = [f"{layout.path}.{i}" for i in range(nblocks)]
    missing = [n for n in params.names if n not in src]
    if missing:
        raise CheckpointError(f"{WHO}: {directory} holds no tensors {missing[:8]} of {type(model).__name__}; "
                              "expected the weights its config.json describes")

    resume = None
    if cfg.resume_dir:
        identity = {"model": streamed_fingerprint(model, params), "calibration": tensor_fingerprint(ids),
                    "config": cfg.fingerprint_dict()}
        resume = ResumeDir(cfg.resume_dir, identity, nblocks)
        if resume.finished:
            log(f"resuming from {cfg.resume_dir}: {resume.finished}/{nblocks} blocks already finished")

    x, kw = _capture(model, layout, params, ids, block_paths)
    log(f"captured {tuple(x.shape)} block inputs in {time.time() - t0:.1f} s; {nblocks} blocks at {layout.path} "
        f"streamed from {directory}, method={cfg.method}, {cfg.layer_spec}, iters={cfg.iters}, device={place.device}")
    tied = _tied(params)
    hf_config = model.config.__class__.from_dict(model.config.to_dict())
    meta = {"layers": {}, "tied": tied, "model": {"class": type(model).__name__}, "extra": extra}
    stopped = max_blocks is not None and max_blocks < nblocks
    try:
        with ShardedWriter(out_dir, max_shard_bytes=max_shard_size, metadata_config=meta, hf_config=hf_config,
                           tokenizer=tokenizer) as writer:
            family = StreamingBlockFamily(layout, kw, cfg, log, params, writer, max_blocks=max_blocks,
                                          readers=output_readers(model, layout))
            # handed over without a reference here, so the first stream dies when block 1 replaces it
            captured = [x]
            del x
            stats = reconstruct_units(family, captured.pop(), cfg, log, resume=resume, place=place)
            for st, cpu in zip(stats, family.cpu_seconds):
                st["cpu_seconds"] = cpu
            if stopped:
                raise _Stopped  # the writer deletes its temporary directory: no partial checkpoint
            _copy_outside(model, params, block_paths, tied, writer)
            writer.set_config(layers=family.layers)
    except _Stopped:
        seconds = time.time() - t0
        log(f"stopped after {len(stats)}/{nblocks} blocks (max_blocks={max_blocks}) in {seconds:.1f} s; nothing "
            f"written; peak RSS {rss_peak_bytes() / 2**30:.2f} GiB")
        return StreamResult(directory=None, stats=stats, seconds=seconds, rss_peak_bytes=rss_peak_bytes(),
                            blocks=nblocks)
    if family.left_float:
        warnings.warn(f"left in float (not inside known blocks or not nn.Linear): {', '.join(family.left_float)}",
                      stacklevel=2)
    seconds = time.time() - t0
    log(f"quantized {nblocks} blocks in {seconds:.1f} s (streamed); peak RSS {rss_peak_bytes() / 2**30:.2f} GiB "
        f"-> {writer.directory}")
    return StreamResult(directory=writer.directory, stats=stats, seconds=seconds, rss_peak_bytes=rss_peak_bytes(),
                        blocks=nblocks)


class _Stopped(Exception):
    """Raised inside the writer when ``max_blocks`` ends a run early, so that nothing is written."""


def _tied(params: MetaParameters) -> Dict[str, str]:
    """``{alias: source}`` of the state dict's aliased parameters, as ``save_quantized`` records
    them (the first name in state-dict order is the source)."""
    return {alias: name for name, names in params.aliases.items() for alias in names[1:]}


def _copy_outside(model: nn.Module, params: MetaParameters, block_paths: List[str], tied: Dict[str, str],
                  writer: ShardedWriter) -> None:
    """The state-dict entries outside the blocks, one at a time: parameters from the files (fp32),
    persistent buffers from the model."""
    def in_blocks(name):
        return any(name.startswith(p + ".") for p in block_paths)

    names = [n for n in model.state_dict(keep_vars=True) if not in_blocks(n) and n not in tied]
    state = model.state_dict(keep_vars=True)
    for name in names:
        if name in params.holders:
            t = _fp32(params.source.read([name])[name])
        else:
            t = state[name].detach()
        writer.add(name, t.contiguous())
        del t
