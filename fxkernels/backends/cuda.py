"""CUDA backend: INT8 tensor-core GEMM with fused dequantization epilogue (W8A8) and activation
quantization, from the extension ``fxkernels._cuda`` (csrc/cuda, csrc/bindings_cuda.cpp).

Kernels registered with :mod:`fxkernels.dispatch` (CUDA tensors on sm >= 80 only; every refusal
says why):

* ``cuda_quantize_act``: dynamic per-token asymmetric or static per-tensor int8 activation codes,
  bit-exact with :func:`fxkernels.reference.quantize_act`.
* ``cuda_qact_linear``: ``y = sa[m] * s[n] * (acc - za*wsum - zs*xsum + K*za*zs) + bias`` with
  ``acc = xq . c`` on the tensor cores, for int8 weight storage (bits 5..8) and one weight scale
  per output channel (G = 1; per-tensor weights arrive expanded to ``[N, 1]``).

The raw GEMM is also a torch.library op, ``torch.ops.fxk.int8_mm_cuda(a, b, config=-1)``
(int8 ``[M, K]`` x int8 ``[N, K]`` -> int32 ``[M, N]``), so ``torch.library.opcheck`` and
``torch.compile`` see it; :func:`int8_mm` and :func:`qact_linear` expose a tile-config override
for benchmarks.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import Kernel, register, set_backend_status
from ._cache import cached_repack

try:
    from .. import _cuda as _ext
    IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not built (no toolkit at build time), or libcudart missing at load
    _ext = None
    IMPORT_ERROR = (f"fxkernels._cuda is not importable ({e}); build with "
                    "FXK_BUILD_CUDA=1 python setup.py build_ext --inplace")

MIN_CAPABILITY = (8, 0)  # mma.sync.m16n8k32 int8 and cp.async
MAX_K = 32768            # |sum_k (xq-za)(c-zs)| <= K * 255^2 must fit int32
ZERO_OFFSET = 128        # int8 storage holds q - 128 (fxkernels.format)


def num_configs() -> int:
    return _ext.num_configs if _ext is not None else 0


def config_name(config: int) -> str:
    return _ext.config_name(config) if _ext is not None else "?"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _device_reason(t: Tensor, name: str) -> Optional[str]:
    """Why tensor ``t`` cannot run here, or None."""
    if _ext is None:
        return IMPORT_ERROR
    if t.device.type != "cuda":
        return f"{name} is on {t.device}; the cuda backend runs CUDA tensors only"
    cap = _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        return f"{name} is on a GPU with sm_{cap[0]}{cap[1]}; the INT8 tensor-core kernels need sm_80 or newer"
    return None


def _require(t: Tensor, name: str) -> None:
    why = _device_reason(t, name)
    if why is not None:
        raise (RuntimeError if _ext is None else ValueError)(f"fxkernels cuda backend: {why}")


# -- raw int8 GEMM as a torch.library op ---------------------------------------------------------
@torch.library.custom_op("fxk::int8_mm_cuda", mutates_args=())
def int8_mm_cuda(a: Tensor, b: Tensor, config: int = -1) -> Tensor:
    """Exact ``int32 [M, N] = a [M, K] int8 @ b [N, K].T int8`` on the tensor cores.

    Both operands K-contiguous (a row-major, b as stored weights), K a multiple of 16,
    K <= 131072. ``config``: -1 picks the tile shape, 0..num_configs()-1 forces one.
    """
    _require(a, "a")
    if a.dtype != torch.int8 or a.dim() != 2:
        raise ValueError(f"a: got {a.dtype} {tuple(a.shape)}; expected int8 [M, K]")
    if b.dtype != torch.int8 or b.dim() != 2 or b.shape[1] != a.shape[1]:
        raise ValueError(f"b: got {b.dtype} {tuple(b.shape)}; expected int8 [N, K={a.shape[1]}]")
    if b.device != a.device:
        raise ValueError(f"b: on {b.device}; expected {a.device} like a")
    a, b = a.contiguous(), b.contiguous()
    out = a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)
    _ext.int8_gemm(a, b, out, None, None, None, None, 0, None, None, False, config,
                   _num_sms(a.device.index), _stream(a))
    return out


@int8_mm_cuda.register_fake
def _(a, b, config=-1):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def int8_mm(a: Tensor, b: Tensor, config: int = -1) -> Tensor:
    """``torch.ops.fxk.int8_mm_cuda`` (see :func:`int8_mm_cuda`)."""
    return torch.ops.fxk.int8_mm_cuda(a, b, config)


# -- activation quantization -------------------------------------------------------------------
def _quant_can(x: Tensor, scale: Optional[Tensor], zero: Optional[Tensor]):
    why = _device_reason(x, "x")
    if why is not None:
        return False, why
    if x.shape[1] == 0:
        return False, "x has K=0 columns; a per-token range needs at least one element"
    if x.shape[0] >= 2 ** 31 or x.shape[1] >= 2 ** 31:
        return False, f"x has shape {tuple(x.shape)}; the kernel indexes rows and columns with int32"
    if scale is not None and (scale.device != x.device or zero.device != x.device):
        return False, f"static scale/zero on {scale.device}/{zero.device}; expected {x.device} like x"
    return True, "CUDA quantize_act kernel"


def _quant_run(x: Tensor, scale: Optional[Tensor], zero: Optional[Tensor]):
    x = x.contiguous()
    m = x.shape[0]
    xq = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    z = torch.empty(m, dtype=torch.int32, device=x.device)
    if scale is not None:
        scale = scale.reshape(1).contiguous()
        zero = zero.reshape(1).contiguous()
    _ext.quantize_act(x, xq, s, z, scale, zero, _stream(x))
    return xq, s, z


# -- W8A8 GEMM with fused epilogue -------------------------------------------------------------
def _qa_can(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    why = _device_reason(xq, "xq")
    if why is not None:
        return False, why
    if bits < 5:
        return False, (f"bits={bits}: {bits}-bit weights are stored as nibbles; this kernel multiplies int8 "
                       "storage (bits 5..8), 4-bit weights need a W4A8 kernel")
    if scale.shape[1] != 1:
        return False, (f"scale has {scale.shape[1]} groups per row; the fused epilogue applies one weight scale "
                       "per output channel (G=1: per-tensor or per-channel), groups need per-group partial sums")
    k = xq.shape[1]
    if k % 16 or k == 0:
        return False, f"K={k}; the kernel needs a positive multiple of 16 (16-byte cp.async chunks)"
    if k > MAX_K:
        return False, f"K={k}; zero-point-corrected int32 sums are exact only for K <= {MAX_K}"
    if xq.shape[0] >= 2 ** 31 or qweight.shape[0] >= 2 ** 31:
        return False, f"M={xq.shape[0]}, N={qweight.shape[0]}; expected < 2^31"
    for name, t in (("xq", xq), ("qweight", qweight)):
        if t.is_contiguous() and t.data_ptr() % 16:
            return False, f"{name} data pointer is not 16-byte aligned (cp.async moves 16-byte chunks)"
    for name, t in (("x_scale", x_scale), ("x_zero", x_zero), ("wsum", wsum)):
        if t.device != xq.device:
            return False, f"{name} on {t.device}; expected {xq.device} like xq"
    return True, "CUDA INT8 tensor-core GEMM with fused epilogue"


def _needs_xsum(zero: Tensor) -> bool:
    """Whether any stored-domain weight zero (zero - 128) is nonzero, i.e. whether the kernel must
    form activation row sums. Decided once per zero tensor (one device sync, at first use); while
    a CUDA graph is being captured an uncached answer is the always-correct True."""
    if torch.cuda.is_current_stream_capturing():
        return True
    return cached_repack(zero, "cuda_zs_nonzero", lambda: bool((zero != ZERO_OFFSET).any()))


def qact_linear(xq: Tensor, x_scale: Tensor, x_zero: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor,
                wsum: Tensor, bias: Optional[Tensor], bits: int, out_dtype: torch.dtype,
                config: int = -1) -> Tensor:
    """The ``fxk::qact_linear`` computation on this backend (arguments as in
    :func:`fxkernels.ops.qact_linear`, validated there); ``config`` forces a tile shape."""
    ok, why = _qa_can(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)
    if not ok:
        raise ValueError(f"fxkernels cuda backend: {why}")
    m, n = xq.shape[0], qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    _ext.int8_gemm(xq.contiguous(), qweight.contiguous(), out, x_scale.contiguous(), x_zero.contiguous(),
                   scale.reshape(-1).contiguous(), zero.reshape(-1).contiguous(), ZERO_OFFSET,
                   wsum.reshape(-1).contiguous(), None if bias is None else bias.contiguous(),
                   _needs_xsum(zero), config, _num_sms(xq.device.index), _stream(xq))
    return out


def _qa_run(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    return qact_linear(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)


# -- registration ------------------------------------------------------------------------------
def _status() -> Tuple[bool, str]:
    if _ext is None:
        return False, IMPORT_ERROR
    info = _ext.runtime_info()
    if not torch.cuda.is_available():
        err = info["device_error"] or "torch sees no CUDA device"
        return False, f"fxkernels._cuda loaded (CUDA runtime {info['runtime_version']}), but no usable GPU: {err}"
    caps = [_capability(i) for i in range(torch.cuda.device_count())]
    good = [i for i, c in enumerate(caps) if c >= MIN_CAPABILITY]
    if not good:
        return False, f"GPUs with compute capability {caps}; the INT8 tensor-core kernels need sm_80 or newer"
    return True, f"INT8 tensor-core kernels on cuda:{good} (sm >= 80)"


set_backend_status("cuda", *_status())
register(Kernel("cuda_quantize_act", "cuda", "quantize_act", _quant_run, _quant_can, priority=200))
register(Kernel("cuda_qact_linear", "cuda", "qact_linear", _qa_run, _qa_can, priority=200))
