"""Pure-torch implementations of every fxkernels op: the oracle of all kernel tests and the
last-resort fallback of :mod:`fxkernels.dispatch`.

Kernel-level argument conventions (shared by every backend; see docs/FORMAT.md):

* ``qweight``: storage of :mod:`fxkernels.format` (uint8 ``[N, K/2]`` for bits <= 4, int8
  ``[N, K]`` holding ``q - 128`` for bits 5..8).
* ``scale``: float32 ``[N, G]``; ``zero``: int32 ``[N, G]`` in the unsigned code domain;
  ``G`` groups of ``K // G`` consecutive input columns (G = 1: per-channel or per-tensor).
* Activation codes are int8 ``[M, K]`` with float32 scale ``[M]`` and int32 zero ``[M]``
  (signed domain): ``x ~= sa * (xq - za)``. Quantization is ``xq = clamp(rint(x * (1/sa)) + za,
  -128, 127)`` with ``1/sa`` rounded to fp32 first and ties to even; kernels must match it bit
  for bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .format import QuantSpec, unpack


def _spec(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, granularity="channel")


def storage_offset(bits: int) -> int:
    return 0 if bits <= 4 else 128


def stored_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes as the kernels read them: nibbles for <= 4 bits, signed int8 otherwise (int32)."""
    return unpack(qweight, _spec(bits), in_features) - storage_offset(bits)


def dequant_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   in_features: int) -> torch.Tensor:
    """float32 ``[N, K]`` weight from storage and ``[N, G]`` scale/zero."""
    q = unpack(qweight, _spec(bits), in_features)
    g = in_features // scale.shape[1]
    s = scale.float().repeat_interleave(g, dim=1)
    z = zero.to(torch.int32).repeat_interleave(g, dim=1)
    return (q - z).float() * s


def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: Optional[torch.Tensor], bits: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` computed in fp32, returned in ``x.dtype``."""
    w = dequant_weight(qweight, scale, zero, bits, in_features)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def act_qparams_dynamic(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-token int8 grid ``(scale fp32 [M], zero int32 [M])`` for ``x [M, K]``."""
    xf = x.float()
    lo = torch.clamp(xf.amin(dim=1), max=0.0)
    hi = torch.clamp(xf.amax(dim=1), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-128.0 - lo / scale), -128, 127).to(torch.int32)
    return scale, zero


def quantize_act(x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                 zero: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes of ``x [M, K]``: static per-tensor if ``scale``/``zero`` ([1]) are given,
    dynamic asymmetric per-token otherwise. Returns ``(xq int8 [M,K], scale fp32 [M], zero int32 [M])``."""
    m = x.shape[0]
    if scale is None:
        scale, zero = act_qparams_dynamic(x)
    else:
        scale = scale.float().reshape(1).expand(m).contiguous()
        zero = zero.to(torch.int32).reshape(1).expand(m).contiguous()
    inv = (1.0 / scale).float()
    xq = torch.clamp(torch.round(x.float() * inv[:, None]) + zero[:, None], -128, 127).to(torch.int8)
    return xq, scale, zero


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a [M,K] @ b [N,K].T`` (float64 holds every partial sum exactly for K < 2**37)."""
    return (a.double() @ b.double().t()).to(torch.int32)


def qact_linear(xq: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, qweight: torch.Tensor,
                scale: torch.Tensor, zero: torch.Tensor, wsum: torch.Tensor, bias: Optional[torch.Tensor],
                bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Integer GEMM of int8 activations with quantized weights, exact zero-point corrections,
    fused rescale and bias: ``y[m,n] = sum_g sa[m] s[n,g] sum_{k in g} (xq-za)(c-zc) + b[n]``
    where ``c`` are the stored codes and ``zc`` the zero in the stored domain.

    ``wsum`` is accepted (it is what fast kernels use for the correction
    ``-za * sum_k c``) and checked here against its definition."""
    k = xq.shape[1]
    n, groups = scale.shape
    gsize = k // groups
    c = stored_codes(qweight, bits, k)
    zc = zero.to(torch.int32) - storage_offset(bits)
    xc = (xq.to(torch.int32) - x_zero.to(torch.int32)[:, None]).double()
    wc = (c - zc.repeat_interleave(gsize, dim=1)).double()
    y = torch.zeros(xq.shape[0], n, dtype=torch.float64)
    for g in range(groups):
        sl = slice(g * gsize, (g + 1) * gsize)
        acc = xc[:, sl] @ wc[:, sl].t()  # exact integers
        y += acc * scale[:, g].double()[None, :]
    y = y * x_scale.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.float().to(out_dtype)


def weight_sums(qweight: torch.Tensor, bits: int, in_features: int, groups: int) -> torch.Tensor:
    """``int32 [N, G]``: sum of stored codes over each group (precomputed once at load)."""
    c = stored_codes(qweight, bits, in_features)
    return c.reshape(c.shape[0], groups, in_features // groups).sum(dim=2).to(torch.int32)
