"""``Generator``: prefill, then a compiled fixed-shape decode step over a static KV cache."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import time
import types
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..fusion import fuse_projections
from ..nn import QuantLinear
from .layout import check_supported, layer_runners
from .sampling import Sampling, next_tokens
from . import fused_layer
from .step import decoder_forward

CACHE_ROUNDING = 128  # cache lengths are rounded up to this, so nearby lengths share a compiled step
# Per-token costs of a compiled step that buy nothing here (SmolLM2-135M, 2 threads):
# * the wrapper checks every extern kernel's output shape, stride and alignment on each call; the
#   shapes are static and the kernels' fake implementations are tested (107 -> 117 tok/s without);
# * dynamo re-checks its guards on every module attribute the step reads, over a thousand tensors
#   (1.6 ms a token; 94 -> 110 tok/s without). The step's own inputs (tokens, slot, positions,
#   the [B, L] validity mask) stay guarded, so a new batch size or cache length still recompiles;
#   the model's modules are read once: a Generator does not follow later changes to its model.
# inductor's C++ wrapper was faster still but took minutes to compile on 2 cores.
STEP_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


class Decoder(nn.Module):
    """The engine's view of a causal LM: the model's own modules (shared, not copied), the static
    KV cache and the rotary tables; ``forward`` is :func:`fxkernels.generation.step.decoder_forward`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.kind = check_supported(model)
        cfg = model.config
        self.embed, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
        self.layers = nn.ModuleList(layer_runners(model, self.kind))
        self.rotary = model.model.rotary_emb
        softcap = getattr(cfg, "final_logit_softcapping", None)
        self.final_softcap = float(softcap) if softcap else None
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        self.hidden = int(cfg.hidden_size)
        self.rope_tables: dict = {}
        self.batch, self.length = 0, 0

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def fuse(self, model: nn.Module) -> None:
        """Run each layer's q/k/v and gate/up as one kernel call where they are compatible
        QuantLinears (bit-identical outputs, see :func:`fxkernels.fuse_projections`)."""
        fuse_projections(model)
        for layer in self.layers:
            layer.qkv = _fused((layer.q_proj, layer.k_proj, layer.v_proj))
            layer.gate_up = _fused((layer.gate_proj, layer.up_proj))

    def prepare(self) -> None:
        """Pin every quantized layer's kernels for compiled graphs (QuantLinear.prepare).

        Preparing a layer allocates short-lived unpacked copies of its codes between long-lived
        repacked weights, and glibc keeps the freed pages: without handing them back after each
        layer, SmolLM2-135M's decode process peaked at 2.5 GB instead of 1.2 GB. Layers the
        whole-layer CPU operator runs get its arguments (:mod:`fxkernels.generation.fused_layer`)."""
        for m in self.modules():
            if isinstance(m, QuantLinear):
                m.prepare(self.weight_dtype)
                release_free_heap()
        cpu_fp32 = self.device.type == "cpu" and self.weight_dtype == torch.float32
        for layer in self.layers:
            layer.fused_args = fused_layer.layer_args(layer, self.hidden) if cpu_fp32 else None

    @torch.no_grad()
    def allocate(self, batch: int, length: int) -> bool:
        """A zeroed ``[batch, kv_heads, length, head_dim]`` cache per layer and rotary tables for
        positions ``< length``; returns whether the shapes changed (a new compiled step)."""
        dt, dev = self.weight_dtype, self.device
        changed = (batch, length) != (self.batch, self.length)
        for layer in self.layers:
            if changed or layer.k_cache is None:
                shape = (batch, layer.kv_heads, length, layer.head_dim)
                layer.k_cache = torch.zeros(shape, dtype=dt, device=dev)
                layer.v_cache = torch.zeros(shape, dtype=dt, device=dev)
            else:
                layer.k_cache.zero_()
                layer.v_cache.zero_()
        if changed or not self.rope_tables:
            pos = torch.arange(length, device=dev)[None]
            probe = torch.zeros(1, dtype=dt, device=dev)
            self.rope_tables = {}
            for kind in {layer.rope_kind for layer in self.layers}:
                cos, sin = (self.rotary(probe, pos) if kind == "default" else self.rotary(probe, pos, kind))
                self.rope_tables[kind] = (cos[0].contiguous(), sin[0].contiguous())
        self.batch, self.length = batch, length
        return changed

    def forward(self, ids: Tensor, slots: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        return decoder_forward(self, ids, slots, positions, valid)


def cpu_activation_digits(n: Union[int, str]):
    """The CPU backend's activation digits set to ``n`` for a ``with`` block (nothing to set
    without the CPU extension)."""
    try:
        from ..backends import cpu
    except ImportError:
        return contextlib.nullcontext()
    return cpu.activation_digits(n)


_STEP_COPIES = itertools.count(1)


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object, and
    with the module guards skipped (STEP_OPTIONS) it would hand a second engine, whose model has
    the same shapes, the first engine's graph with the first model's constants baked in (norm eps,
    attention scaling, windows); each engine's step gets its own code object, hence its own graphs."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_STEP_COPIES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _fused(members) -> Optional[nn.Module]:
    group = getattr(members[0], "_fusion", None)
    if group is None or list(group.members) != list(members):
        return None
    return group.layer


@dataclasses.dataclass
class GenerationOutput:
    """``tokens [B, n]``: the new tokens (rows that stopped early are padded with ``pad_token``);
    ``sequences [B, P + n]``: prompt and new tokens; seconds spent in prefill, in the decode
    steps (the first, compiling step excluded), and compiling (0 when the step was reused)."""

    tokens: Tensor
    sequences: Tensor
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode rate of the batch: new tokens (all rows) after the first, per decode second."""
        b, n = self.tokens.shape
        return b * (n - 1) / self.decode_seconds if n > 1 and self.decode_seconds > 0 else float("nan")


class Generator:
    """Token generation for a Hugging Face causal LM (LLaMA/SmolLM, Mistral, Qwen2/3, Gemma 1/2/3)
    holding :class:`~fxkernels.QuantLinear` layers (or plain float ones).

    The prompt runs once through the model's modules (prefill); each new token then runs one
    fixed-shape decode step over a static KV cache, traced by ``torch.compile`` into one graph
    (``compile=True``: inductor on the CPU, CUDA graphs on a GPU), so no Python runs per layer.
    Compiled steps are kept per (batch, cache length): cache lengths are rounded up to a multiple
    of 128, and inductor's on-disk cache makes later processes compile faster. The model's modules
    are read when the Generator is built: after changing the model (new weights, ``.to()``),
    build a new Generator.

    ``max_length``: a fixed cache length (prompt plus new tokens must fit); None sizes the cache
    per call, up to the model's ``max_position_embeddings``. ``fuse``: run q/k/v and gate/up as
    one kernel call each (see :func:`fxkernels.fuse_projections`; outputs are bit-identical).
    ``activation_digits``: the CPU weight-only layers' int8 digits per fp32 activation while the
    Generator prepares and runs (:func:`fxkernels.backends.cpu.set_activation_digits`): ``"auto"``
    (2 per row, 4 for a row that 2 would round coarser than bf16 would; batch 8 decodes ~1.5x
    faster than with 4 on a 2-core Zen 5, docs/BENCHMARKS.md), or 4 for fp32-grade products. It
    changes nothing on GPUs or CPUs without AVX-512 VNNI.
    """

    def __init__(self, model: nn.Module, compile: bool = True, max_length: Optional[int] = None, fuse: bool = True,
                 activation_digits: Union[int, str] = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Generator: model is {type(model).__name__}; expected a transformers causal LM")
        if not (activation_digits == "auto" if isinstance(activation_digits, str)
                else type(activation_digits) is int and activation_digits in (2, 4)):
            raise ValueError(f"Generator: activation_digits={activation_digits!r}; expected 2, 4 or 'auto'")
        self.activation_digits = activation_digits
        self.decoder = Decoder(model)
        self.model = model.eval()
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"Generator: max_length={max_length!r}; expected an integer >= 2 (tokens in the cache)")
        if max_length and self.decoder.max_positions and max_length > self.decoder.max_positions:
            raise ValueError(f"Generator: max_length={max_length} exceeds the model's max_position_embeddings="
                             f"{self.decoder.max_positions}")
        self.max_length = max_length
        if fuse:
            self.decoder.fuse(model)
        self.compile = bool(compile)
        self._step: Optional[Callable] = None
        self._warm = False  # the step has run for the current cache shapes
        self.pad_token = _pad_token(model.config)

    # -- the decode step -----------------------------------------------------------------------
    def _decode_step(self) -> Callable:
        """``step(decoder, ids, slots, positions, valid)``: decoder_forward, compiled unless compile=False."""
        if not self.compile:
            return decoder_forward
        if self._step is None:
            self.decoder.prepare()
            mode = "reduce-overhead" if self.decoder.device.type == "cuda" else None  # CUDA graphs
            self._step = torch.compile(_own_copy(decoder_forward), fullgraph=True, dynamic=False, mode=mode,
                                       options=STEP_OPTIONS)
        return self._step

    def _warm_up(self, step: Callable, batch: int) -> float:
        """Compile the step for the current cache shapes; returns the seconds it took. The dummy
        call writes only the last cache slot, which a real step overwrites before reading. Its
        token ids and positions are separate tensors, as in a real step: dynamo guards on
        aliasing, and one tensor for both compiled a graph the first real step could not use."""
        d, dev = self.decoder, self.decoder.device
        t = time.perf_counter()
        last = torch.full((1,), d.length - 1, dtype=torch.long, device=dev)
        token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        position = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        step(d, token, last, position, torch.ones(batch, d.length, dtype=torch.bool, device=dev))
        return time.perf_counter() - t

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, *, attention_mask: Optional[Tensor] = None,
                 sampling: Sampling = Sampling(), stop_tokens: Iterable[int] = (),
                 streamer: Optional[Callable[[Tensor], None]] = None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` for ``input_ids [B, P]`` (left-padded when
        ``attention_mask [B, P]`` has zeros). Stops when every row has produced one of
        ``stop_tokens``; ``streamer(tokens [B])`` is called with each new step's tokens."""
        with cpu_activation_digits(self.activation_digits):
            return self._generate(input_ids, max_new_tokens, attention_mask, sampling, stop_tokens, streamer)

    def _generate(self, input_ids, max_new_tokens, attention_mask, sampling, stop_tokens, streamer):
        ids, mask = self._check_inputs(input_ids, attention_mask, max_new_tokens, sampling)
        batch, plen = ids.shape
        dev = self.decoder.device
        length = self._cache_length(plen + max_new_tokens)
        changed = self.decoder.allocate(batch, length)
        step = self._decode_step()
        compile_s = self._warm_up(step, batch) if self.compile and (changed or not self._warm) else 0.0
        self._warm = True
        generator = None
        if not sampling.greedy and sampling.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(sampling.seed)
        stops = torch.tensor(sorted(set(int(s) for s in stop_tokens)), dtype=torch.long, device=dev)

        valid = torch.ones(batch, length, dtype=torch.bool, device=dev)
        valid[:, :plen] = mask.bool()
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        t0 = time.perf_counter()
        tok = next_tokens(*self.decoder(ids, torch.arange(plen, device=dev), positions, valid), sampling, generator)
        prefill_s = time.perf_counter() - t0

        out = [tok]
        finished = torch.isin(tok, stops)
        if streamer is not None:
            streamer(tok)
        pos = positions[:, -1:] + 1
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            if stops.numel() and bool(finished.all()):
                break
            slot = torch.full((1,), plen + i - 1, dtype=torch.long, device=dev)
            tok = next_tokens(*step(self.decoder, tok[:, None], slot, pos, valid), sampling, generator)
            if stops.numel():
                tok = torch.where(finished, torch.full_like(tok, self.pad_token), tok)
                finished = finished | torch.isin(tok, stops)
            out.append(tok)
            if streamer is not None:
                streamer(tok)
            pos = pos + 1
        decode_s = time.perf_counter() - t1
        tokens = torch.stack(out, dim=1)
        return GenerationOutput(tokens, torch.cat([ids, tokens], dim=1), prefill_s, decode_s, compile_s)

    def _cache_length(self, needed: int) -> int:
        if self.max_length is not None:
            if needed > self.max_length:
                raise ValueError(f"generate: prompt plus max_new_tokens = {needed} tokens; the cache holds "
                                 f"max_length={self.max_length}")
            return self.max_length
        limit = self.decoder.max_positions
        if limit and needed > limit:
            raise ValueError(f"generate: prompt plus max_new_tokens = {needed} tokens; the model's "
                             f"max_position_embeddings is {limit}")
        length = -(-needed // CACHE_ROUNDING) * CACHE_ROUNDING
        return min(length, limit) if limit else length

    def _check_inputs(self, input_ids, attention_mask, max_new_tokens, sampling):
        dev = self.decoder.device
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"generate: input_ids is {got}; expected an int64 tensor [batch, prompt_length]")
        if input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
            raise ValueError(f"generate: input_ids shape {tuple(input_ids.shape)}; expected at least one token per row")
        if input_ids.device != dev:
            raise ValueError(f"generate: input_ids on {input_ids.device}; the model is on {dev}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
                or attention_mask.device != dev):
            got = (f"{tuple(attention_mask.shape)} on {attention_mask.device}" if isinstance(attention_mask, Tensor)
                   else type(attention_mask).__name__)
            raise ValueError(f"generate: attention_mask is {got}; expected a tensor {tuple(input_ids.shape)} on {dev} "
                             "like input_ids")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise ValueError("generate: attention_mask has padding at the end of a row; expected left padding "
                             "(tokenizer.padding_side = 'left')")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}; expected an integer >= 1")
        if not isinstance(sampling, Sampling):
            raise TypeError(f"generate: sampling is {type(sampling).__name__}; expected fxkernels.Sampling")
        return input_ids, attention_mask


def _pad_token(config) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(config, name, None)
        if isinstance(v, Sequence) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0
