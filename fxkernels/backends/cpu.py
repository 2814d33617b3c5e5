"""CPU backend: the AVX2/FMA kernels of ``fxkernels._C`` (scalar fallback on older CPUs).

Kernels (all for CPU tensors only):

* ``cpu_dequant_linear``: INT2..8 weights x fp32 activations (fp16/bf16 converted), rows of
  the weight in SIMD lanes, exact dequantization ``s * (q - z)`` fused into the FMA loop; with
  AVX-512 VNNI, the activations split into int8 digits of a per-row fixed point (4 by default,
  see :func:`set_activation_digits`) run on the integer kernels below instead (faster, and
  closer to the float64 product).
* ``cpu_quantize_act``: int8 activation codes, bit-exact with :func:`fxkernels.reference.quantize_act`.
* ``cpu_qact_linear``: W4A8 (``vpmaddubsw``) / W8A8 (``vpmaddwd``) integer GEMM with exact
  zero-point corrections and fused rescale + bias.

Each weight is repacked once (per weight tensor and scale/zero tensors) with
:func:`fxkernels.backends._cache.cached_repack`. The instruction set is chosen at run time from
the CPU's features; ``FXK_CPU_ISA=scalar`` (read at import) or :func:`set_isa` / :func:`isa`
force the portable scalar kernels, which is how tests cover them.

The ``run`` wrappers are deliberately thin: decoding a 135M-parameter LLM calls ~210 linears per
token, so every microsecond of Python here is visible in tokens/s.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .. import _C  # an ImportError marks the backend unavailable (fxkernels.dispatch)
from ..dispatch import Kernel, register, set_backend_status, set_setting
from ..reference import weight_sums
from ._cache import cached_repack, version_of

MAX_GROUP_COLUMNS = 32768  # int32 accumulation of (xq - za)(c - zc) is exact up to this many columns
# int8 digits per fp32 activation on the weight-only VNNI path (set_activation_digits): 4 keep ~30
# bits of each row's range, 2 keep ~14, "auto" gives each row 2 unless that rounds it coarser than
# bf16 would, else 4 (fxkernels.Generator's default)
DEFAULT_ACTIVATION_DIGITS = 4
ACTIVATION_DIGITS = (2, 4, "auto")
_digits = DEFAULT_ACTIVATION_DIGITS
_OK = (True, "ok")
_isa_pref = "auto"
ISAS = ("auto", "avx512amx", "avx512vnni", "avx2", "scalar")
# the instruction sets whose integer kernels run the weight-only layers as int8 limbs
LIMB_ISAS = ("avx512amx", "avx512vnni")


def set_isa(name: str) -> None:
    """``"auto"`` (the best the CPU has: AVX2 kernels, with AVX-512 VNNI dot products for INT4 x
    int8 when present, and AMX-INT8 tiles for INT4 with many activation rows when present),
    ``"avx512amx"``, ``"avx512vnni"`` (no AMX), ``"avx2"`` (no VNNI) or ``"scalar"`` (portable loops)."""
    global _isa_pref
    if name not in ISAS:
        raise ValueError(f"set_isa: name={name!r}; expected one of {ISAS}")
    _C.set_isa(name)
    _isa_pref = name


def set_activation_digits(n) -> None:
    """How many int8 digits each fp32 activation row is split into where weight-only layers run
    on the AVX-512 VNNI / AMX integer kernels (elsewhere nothing changes). A row becomes a fixed
    point number scaled to its largest ``|x|``, so every value is rounded to the same step:

    * ``4`` (the default): ~30 bits of that range; the product is closer to the float64 one than
      an fp32 dot product is.
    * ``2``: ~14 bits (finer than bf16 for values within ~64x of the row's largest) for half the
      integer products, which is what batched decode and long prompts are bound by on CPUs without
      AMX (docs/BENCHMARKS.md).
    * ``"auto"`` (what :class:`~fxkernels.Generator` decodes with unless told otherwise): 2 digits
      for each row whose rounding stays within the bound bf16 storage of the row has,
      ``||error||_2 <= 2^-8 ||x||_2`` (its largest ``|x|`` within ~64-128x of its RMS; always so
      for rows of <= 4096 values), 4 digits for the others, row by row: a row's result does not
      depend on the rows it is batched with. The activations' rounding then moves each output by
      at most ``||w||_2 * 2^-8 ||x||_2``, as bf16 activations could.

    Eager calls follow the setting from their next call; compiled graphs keep what
    :meth:`fxkernels.QuantLinear.prepare` pinned. :class:`~fxkernels.Generator` applies its own
    ``activation_digits`` while it prepares and runs, and restores this setting after."""
    global _digits
    if not (n == "auto" if isinstance(n, str) else type(n) is int and n in ACTIVATION_DIGITS):
        raise ValueError(f"set_activation_digits: n={n!r}; expected one of {ACTIVATION_DIGITS}")
    _digits = n
    set_setting("cpu_activation_digits", n)


def activation_digits_from_text(text: str):
    """A command line's ``--activation-digits`` value (``"2"``, ``"4"`` or ``"auto"``) as
    :func:`set_activation_digits` takes it."""
    value = text if text == "auto" else int(text) if text in ("2", "4") else None
    if value is None:
        raise ValueError(f"--activation-digits: {text!r}; expected one of 2, 4, auto")
    return value


def activation_digits_in_use():
    """The current :func:`set_activation_digits` value."""
    return _digits


@contextlib.contextmanager
def activation_digits(n):
    """Run the block with :func:`set_activation_digits` ``(n)``, then restore the previous value."""
    prev = _digits
    set_activation_digits(n)
    try:
        yield
    finally:
        set_activation_digits(prev)


def active_isa() -> str:
    """The instruction set the kernels use now: ``"avx512amx"``, ``"avx512vnni"``, ``"avx2"`` or ``"scalar"``."""
    return _C.active_isa()


@contextlib.contextmanager
def isa(name: str):
    """Run the block with the kernels forced to ``name`` (e.g. ``"scalar"``), then restore."""
    prev = _isa_pref
    set_isa(name)
    try:
        yield
    finally:
        set_isa(prev)


def _not_cpu(arg: str, t: torch.Tensor):
    return False, f"{arg} is on {t.device}; the cpu backend runs CPU tensors only"


# -- dequant_linear ----------------------------------------------------------------------------
def _dq_can(x, qweight, scale, zero, bias, bits, in_features):
    if x.device.type != "cpu":
        return _not_cpu("x", x)
    return _OK


def _limb_layout(qweight, scale, zero, bits, in_features):
    """The integer-activation layout plus the digit count: what ``_C.dequant_linear`` takes to run a
    weight-only layer as that many exact integer products (an empty list if the layout does not fit)."""
    wsum = weight_sums(qweight, bits, in_features, scale.shape[1])
    packed = _C.repack_qact(qweight, scale, zero, wsum, bits, in_features)
    return packed + [_DIGIT_TENSORS[_digits]] if packed else []


# one shared count tensor per setting: the layouts of all settings share the repacked weights;
# "auto" is 0 for the kernels (kAutoLimbs in csrc/cpu/kernels_cpu.h)
_DIGIT_TENSORS = {n: torch.tensor(0 if n == "auto" else n) for n in ACTIVATION_DIGITS}


def _dq_packed(qweight, scale, zero, bits, in_features):
    grid = (id(scale), scale.data_ptr(), version_of(scale), id(zero), zero.data_ptr(), version_of(zero))
    # With VNNI, fp32 activations split into int8 limbs beat widening every code to fp32 for an
    # FMA at every M measured (1.4-1.8x, see kernels.cpp limb_linear), and are more exact.
    if _C.active_isa() in LIMB_ISAS and in_features // scale.shape[1] <= MAX_GROUP_COLUMNS:
        packed = cached_repack(qweight, ("cpu_dq_limbs", bits, in_features) + grid,
                               lambda: _limb_layout(qweight, scale, zero, bits, in_features))
        if packed:
            digits = _DIGIT_TENSORS[_digits]  # the cached layout may carry another setting's count
            return packed if packed[5] is digits else packed[:5] + [digits]
    return cached_repack(qweight, ("cpu_dq", bits, in_features) + grid,
                         lambda: _C.repack_dequant(qweight, scale, zero, bits, in_features))


def _dq_run(x, qweight, scale, zero, bias, bits, in_features):
    packed = _dq_packed(qweight, scale, zero, bits, in_features)
    return _C.dequant_linear(x, qweight, scale, zero, packed, bias, bits, in_features)


def _dq_bind(x, qweight, scale, zero, bias, bits, in_features):
    packed, f = _dq_packed(qweight, scale, zero, bits, in_features), _C.dequant_linear
    return lambda x: f(x, qweight, scale, zero, packed, bias, bits, in_features)


def _dq_graph(x, qweight, scale, zero, bias, bits, in_features):
    packed = _dq_packed(qweight, scale, zero, bits, in_features)
    return torch.ops.fxk_cpu.dequant_linear.default, (qweight, scale, zero, packed, bias, bits, in_features)


# -- quantize_act --------------------------------------------------------------------------------
def _quant_can(x, scale, zero):
    if x.device.type != "cpu":
        return _not_cpu("x", x)
    return _OK


def _quant_run(x, scale, zero):
    return tuple(_C.quantize_act(x, scale, zero))


def _quant_bind(x, scale, zero):
    f = _C.quantize_act
    return lambda x: f(x, scale, zero)  # a [xq, scale, zero] list


def _quant_graph(x, scale, zero):
    return torch.ops.fxk_cpu.quantize_act.default, (scale, zero)


# -- qact_linear ---------------------------------------------------------------------------------
def _qa_can(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    if xq.device.type != "cpu":
        return _not_cpu("xq", xq)
    cols = xq.shape[1] // scale.shape[1]
    if cols > MAX_GROUP_COLUMNS:
        return False, (f"{cols} columns per group; the exact int32 accumulation supports at most "
                       f"{MAX_GROUP_COLUMNS}")
    return _OK


def _qa_packed(k, qweight, scale, zero, wsum, bits):
    tag = ("cpu_qa", bits, k, id(scale), scale.data_ptr(), version_of(scale),
           id(zero), zero.data_ptr(), version_of(zero), id(wsum), wsum.data_ptr(), version_of(wsum))
    return cached_repack(qweight, tag, lambda: _C.repack_qact(qweight, scale, zero, wsum, bits, k))


def _qa_run(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    packed = _qa_packed(xq.shape[1], qweight, scale, zero, wsum, bits)
    return _C.qact_linear(xq, x_scale, x_zero, qweight, scale, zero, wsum, packed, bias, bits, out_dtype)


def _qa_bind(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    packed, f = _qa_packed(xq.shape[1], qweight, scale, zero, wsum, bits), _C.qact_linear
    return lambda xq, sa, za: f(xq, sa, za, qweight, scale, zero, wsum, packed, bias, bits, out_dtype)


def _qa_graph(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    packed = _qa_packed(xq.shape[1], qweight, scale, zero, wsum, bits)
    return torch.ops.fxk_cpu.qact_linear.default, (qweight, scale, zero, wsum, packed, bias, bits, out_dtype)


# -- fake (shape) implementations of the fxk_cpu operators (csrc/cpu/torch_ops.cpp) -------------
@torch.library.register_fake("fxk_cpu::dequant_linear")
def _(x, qweight, scale, zero, packed, bias, bits, in_features):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("fxk_cpu::quantize_act")
def _(x, scale, zero):
    m = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, dtype=torch.int32))


@torch.library.register_fake("fxk_cpu::qact_linear")
def _(xq, x_scale, x_zero, qweight, scale, zero, wsum, packed, bias, bits, out_dtype):
    return xq.new_empty(xq.shape[0], qweight.shape[0], dtype=out_dtype)


@torch.library.register_fake("fxk_cpu::decode_attention")
def _(q, k_cache, v_cache, mask, slot, window, scaling, softcap):
    return q.new_empty(q.shape)


@torch.library.register_fake("fxk_cpu::decode_layer")
def _(h, norm1, eps1, norm2, eps2, qkv, qkv_bias, o_proj, o_bias, gate_up, gate_up_bias, down, down_bias, dims,
      cos, sin, k_cache, v_cache, mask, slot, heads, window, scaling):
    return torch.empty_like(h)


set_isa(os.environ.get("FXK_CPU_ISA", "auto") or "auto")
_feat = _C.cpu_features()
set_backend_status("cpu", True, f"fxkernels._C, {active_isa()} kernels "
                   f"(cpu features: {', '.join(k for k, v in _feat.items() if v) or 'baseline x86-64'})")
register(Kernel("cpu_dequant_linear", "cpu", "dequant_linear", _dq_run, _dq_can, priority=100, bind=_dq_bind,
                graph=_dq_graph))
register(Kernel("cpu_quantize_act", "cpu", "quantize_act", _quant_run, _quant_can, priority=100, bind=_quant_bind,
                graph=_quant_graph))
register(Kernel("cpu_qact_linear", "cpu", "qact_linear", _qa_run, _qa_can, priority=100, bind=_qa_bind,
                graph=_qa_graph))
