"""The kernel API: ``torch.library`` custom ops ``fxk::*`` with fake (meta) implementations.

Everything above this module (QuantLinear, the quantizer, benchmarks) calls these ops; each op
validates its arguments once, here, then :mod:`fxkernels.dispatch` picks the kernel. Argument
conventions are those of :mod:`fxkernels.reference` and docs/FORMAT.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch

FLOAT_ACTS = (torch.float32, torch.float16, torch.bfloat16)


def _fail(arg: str, got, expected: str):
    raise ValueError(f"{arg}: got {got}; expected {expected}")


def check_weight_args(qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int,
                      device: torch.device) -> int:
    """Validate kernel-level weight arguments; returns N."""
    if not 2 <= bits <= 8:
        _fail("bits", bits, "an integer in 2..8")
    if in_features <= 0:
        _fail("in_features", in_features, "a positive integer")
    want_dtype, want_cols = (torch.uint8, (in_features + 1) // 2) if bits <= 4 else (torch.int8, in_features)
    if qweight.dtype != want_dtype:
        _fail("qweight.dtype", qweight.dtype, f"{want_dtype} for {bits}-bit codes")
    if qweight.dim() != 2 or qweight.shape[1] != want_cols:
        _fail("qweight.shape", tuple(qweight.shape), f"[N, {want_cols}] for K={in_features}, {bits} bits")
    n = qweight.shape[0]
    if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != n:
        _fail("scale", f"{scale.dtype} {tuple(scale.shape)}", f"float32 [N={n}, groups]")
    groups = scale.shape[1]
    if groups <= 0 or in_features % groups:
        _fail("scale.shape[1]", groups, f"a divisor of in_features={in_features}")
    if zero.dtype != torch.int32 or tuple(zero.shape) != tuple(scale.shape):
        _fail("zero", f"{zero.dtype} {tuple(zero.shape)}", f"int32 {tuple(scale.shape)} like scale")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero", zero)):
        if t.device != device:
            _fail(f"{name}.device", t.device, f"the input's device {device}")
    return n


def _check_bias(bias: Optional[Tensor], n: int, device: torch.device) -> None:
    if bias is None:
        return
    if bias.shape != (n,) or not bias.dtype.is_floating_point or bias.device != device:
        _fail("bias", f"{bias.dtype} {tuple(bias.shape)} on {bias.device}", f"a float [{n}] tensor on {device}")


# -- weight-only dequant-GEMM ----------------------------------------------------------------
@torch.library.custom_op("fxk::dequant_linear", mutates_args=())
def dequant_linear(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor],
                   bits: int, in_features: int) -> Tensor:
    """``y = x @ dequant(W).T + bias``.

    x: fp32/fp16/bf16 ``[M, K]``; qweight: format storage; scale fp32 ``[N, G]``; zero int32
    ``[N, G]`` (unsigned domain); bias: float ``[N]`` or None. Returns ``[M, N]`` in ``x.dtype``,
    accumulated in fp32.
    """
    _check_dequant_linear(x, qweight, scale, zero, bias, bits, in_features)
    return dispatch.run("dequant_linear", x, qweight, scale, zero, bias, bits, in_features)


def _check_dequant_linear(x, qweight, scale, zero, bias, bits, in_features) -> int:
    if x.dim() != 2 or x.shape[1] != in_features:
        _fail("x.shape", tuple(x.shape), f"[M, {in_features}]")
    if x.dtype not in FLOAT_ACTS:
        _fail("x.dtype", x.dtype, f"one of {FLOAT_ACTS}")
    n = check_weight_args(qweight, scale, zero, bits, in_features, x.device)
    _check_bias(bias, n, x.device)
    return n


@dequant_linear.register_fake
def _(x, qweight, scale, zero, bias, bits, in_features):
    n = _check_dequant_linear(x, qweight, scale, zero, bias, bits, in_features)
    return x.new_empty(x.shape[0], n)


# -- activation quantization -----------------------------------------------------------------
@torch.library.custom_op("fxk::quantize_act", mutates_args=())
def quantize_act(x: Tensor, scale: Optional[Tensor], zero: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """int8 activation codes: static per-tensor when ``scale`` (fp32 [1]) and ``zero`` (int32 [1],
    in -128..127) are given, dynamic asymmetric per-token otherwise.

    Returns ``(xq int8 [M, K], scale fp32 [M], zero int32 [M])`` with ``x ~= scale * (xq - zero)``.
    """
    _check_quantize_act(x, scale, zero)
    _check_static_scale_value(scale)
    return dispatch.run("quantize_act", x, scale, zero)


def _check_static_scale_value(scale: Optional[Tensor]) -> None:
    """A static scale must be positive. Read on CPU tensors only: on an accelerator the read would
    be a device-to-host sync in every forward (and break CUDA-graph capture); QuantLinear checks
    its grid once, when it prepares a layer (see QuantLinear.prepare)."""
    if scale is not None and scale.device.type == "cpu" and not bool(scale.reshape(()) > 0):
        _fail("scale", float(scale.reshape(())), "a positive float32 [1] tensor")


def _check_quantize_act(x, scale, zero) -> None:
    if x.dim() != 2 or x.dtype not in FLOAT_ACTS:
        _fail("x", f"{x.dtype} {tuple(x.shape)}", "a 2-D fp32/fp16/bf16 tensor [M, K]")
    if (scale is None) != (zero is None):
        _fail("scale/zero", "only one of them", "both (static per-tensor) or neither (dynamic per-token)")
    if scale is not None:
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != x.device:
            _fail("scale", f"{scale.dtype} {tuple(scale.shape)} on {scale.device}",
                  f"a positive float32 [1] tensor on {x.device}")
        if zero.numel() != 1 or zero.dtype != torch.int32 or zero.device != x.device:
            _fail("zero", f"{zero.dtype} {tuple(zero.shape)} on {zero.device}",
                  f"an int32 [1] tensor in -128..127 on {x.device}")


@quantize_act.register_fake
def _(x, scale, zero):
    _check_quantize_act(x, scale, zero)
    m = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, dtype=torch.int32))


# -- integer GEMM with fused epilogue --------------------------------------------------------
@torch.library.custom_op("fxk::qact_linear", mutates_args=())
def qact_linear(xq: Tensor, x_scale: Tensor, x_zero: Tensor, qweight: Tensor, scale: Tensor,
                zero: Tensor, wsum: Tensor, bias: Optional[Tensor], bits: int,
                out_dtype: torch.dtype) -> Tensor:
    """W4A8 / W8A8: ``y[m,n] = sum_g sa[m] s[n,g] sum_{k in g} (xq-za)(c-zc) + bias[n]``.

    xq int8 ``[M, K]``; x_scale fp32 ``[M]``; x_zero int32 ``[M]``; qweight/scale/zero as in
    :func:`dequant_linear`; wsum int32 ``[N, G]`` = per-group sum of stored codes
    (:func:`fxkernels.reference.weight_sums`, computed once at load). Returns ``[M, N]`` in
    ``out_dtype``.
    """
    _check_qact_linear(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)
    return dispatch.run("qact_linear", xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)


def _check_qact_linear(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype) -> int:
    if xq.dim() != 2 or xq.dtype != torch.int8:
        _fail("xq", f"{xq.dtype} {tuple(xq.shape)}", "int8 [M, K]")
    m, k = xq.shape
    for name, t, dt in (("x_scale", x_scale, torch.float32), ("x_zero", x_zero, torch.int32)):
        if tuple(t.shape) != (m,) or t.dtype != dt or t.device != xq.device:
            _fail(name, f"{t.dtype} {tuple(t.shape)} on {t.device}", f"{dt} [{m}] on {xq.device}")
    n = check_weight_args(qweight, scale, zero, bits, k, xq.device)
    if wsum.shape != scale.shape or wsum.dtype != torch.int32 or wsum.device != xq.device:
        _fail("wsum", f"{wsum.dtype} {tuple(wsum.shape)}", f"int32 {tuple(scale.shape)} like scale")
    _check_bias(bias, n, xq.device)
    if out_dtype not in FLOAT_ACTS:
        _fail("out_dtype", out_dtype, f"one of {FLOAT_ACTS}")
    return n


@qact_linear.register_fake
def _(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    n = _check_qact_linear(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)
    return xq.new_empty(xq.shape[0], n, dtype=out_dtype)


def check_args(op: str, *args) -> None:
    """Validate ``fxk::<op>`` arguments' shapes, dtypes and devices without running it (fast paths
    that call kernels directly; they check values such as a positive static scale themselves)."""
    {"dequant_linear": _check_dequant_linear, "quantize_act": _check_quantize_act,
     "qact_linear": _check_qact_linear}[op](*args)
