"""Triton integer-activation kernels (W8A8 / W4A8) on CUDA GPUs: ``fxk::qact_linear`` and
``fxk::quantize_act``. Registered by :mod:`fxkernels.backends.triton` (same environment rules:
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` with the backend forced).

Why a Triton kernel next to the CUDA extension's ``mma.sync`` GEMM (csrc/cuda/int8_gemm.cu):

* Hopper: Triton lowers ``tl.dot`` on int8 operands to the warp-group MMA (``wgmma`` with an s32
  accumulator, SASS ``IGMMA``) with asynchronous pipelining when a tile has >= 64 rows and 4+
  warps, for sm_90a; the extension is ``mma.sync m16n8k32`` only. A hand-written wgmma + TMA
  kernel (or CUTLASS 3 as a dependency) would need a GPU to validate even its addressing, while
  the Triton kernel's arithmetic runs in the interpreter against fxkernels.reference here and its
  sm_90a code is checked by compiling (tests/test_triton_int8.py, bench/gpu_static.py).
* Coverage: grouped weight scales (each group's exact int32 dot is scaled into an fp32
  accumulator) and 4-bit weights (nibbles are valid int8 operands as stored: no repack), which
  the extension refuses.
* Small M: split-K from the SM count, and a swapped orientation (``y.T = W x.T``) that puts the
  weight tile on the MMA's 64-row side, so a decode step pads the activations, not the weights.

The CUDA extension keeps the calls it takes today (W8A8 per channel/tensor, priority 200) except
small-M calls where its decode tiling launches fewer CTAs than half the SMs
(:data:`QACT_SMALL_M_NAME`, see there); ``bench/gpu_all.py`` times both on the same GPU.

Configurations per M bucket (:func:`qact_candidates`), autotuned on first use per (device, shape,
bucket) like the dequant-GEMM (``FXK_TRITON_AUTOTUNE=0``: the bucket's first candidate).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from .. import dispatch
from ..dispatch import Kernel, register
from . import triton as tb
from ._cache import cached_repack

QACT_KERNEL_NAME = "triton_qact_linear"
QUANT_KERNEL_NAME = "triton_quantize_act"
MAX_GROUP_K = 32768  # |sum over a group of (xq - za)(c - zc)| <= 255**2 * size must fit int32
MIN_BK = 32          # the int8 MMA's K step (mma.sync m16n8k32, wgmma k32)
# A split reads at least this many weight columns: its fp32 partials (4 bytes x M <= 16 rows per
# output) then cost at most 1/8 of the int8 weight bytes it streams.
MIN_SPLIT_COLUMNS = 512


@dataclasses.dataclass(frozen=True)
class QConfig:
    """One tiling of the integer GEMM: BM activation rows x BN weight rows x BK columns per step,
    warps, pipeline stages; ``swap``: compute ``y.T`` with the weight tile as the MMA's M side."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    swap: bool = False

    def __str__(self) -> str:
        return f"q-BM{self.bm}-BN{self.bn}-BK{self.bk}-w{self.warps}-s{self.stages}{'-swap' if self.swap else ''}"


# Candidates per M bucket, first = untimed default; every one compiles without register spills
# for sm_80 and sm_90a (tests/test_triton_int8.py, docs/GPU_STATIC.md).
# Decode (M <= 16): swapped, the weight tile (BN >= 64 rows: whole warp-group MMAs on Hopper) is
# the MMA's M side and 16 activation rows its N side; deep K steps amortize the per-step work.
# Per channel, larger M: 64- and 128-row tiles with 4-8 warps, the shapes Triton lowers to wgmma on
# sm_90a; int8 tiles are half the bytes of fp16 ones, so BK = 128 fits 3-4 stages in A100's
# 163 KiB. 128x256 tiles spill on sm_80 (an int32 accumulator of 128 registers per thread next
# to the pipelined operands) and are a Hopper-only candidate; 256x128 spills on both with W4.
# Grouped: an fp32 accumulator next to each step's int32 tile doubles the accumulator registers;
# 128x64 with 8 warps and the swapped 16-row tiles are the ones free of spills on both
# architectures for W4 and W8 (128x128, 64x128 and 64x64 spill on one or both).
QACT_BUCKETS_CHANNEL: Tuple[Tuple[Optional[int], Tuple[QConfig, ...]], ...] = (
    (16, (QConfig(16, 128, 256, 4, 3, True), QConfig(16, 64, 256, 4, 4, True), QConfig(16, 128, 128, 4, 4, True),
          QConfig(16, 256, 128, 8, 3, True))),
    (64, (QConfig(64, 64, 128, 4, 4), QConfig(64, 128, 128, 4, 4), QConfig(16, 128, 256, 4, 3, True),
          QConfig(32, 128, 128, 4, 4))),
    (256, (QConfig(128, 128, 128, 8, 3), QConfig(64, 128, 128, 4, 4), QConfig(128, 64, 128, 4, 4))),
    (None, (QConfig(128, 128, 128, 8, 3), QConfig(128, 128, 128, 8, 4), QConfig(128, 128, 64, 4, 4))),
)
QACT_HOPPER_LARGE = (QConfig(128, 256, 128, 8, 3),)
QACT_BUCKETS_GROUPED: Tuple[Tuple[Optional[int], Tuple[QConfig, ...]], ...] = (
    (16, (QConfig(16, 128, 128, 4, 4, True), QConfig(16, 64, 128, 4, 4, True), QConfig(16, 128, 128, 8, 4, True))),
    (64, (QConfig(16, 128, 128, 4, 4, True), QConfig(128, 64, 128, 8, 3), QConfig(16, 64, 128, 4, 4, True))),
    (None, (QConfig(128, 64, 128, 8, 3), QConfig(16, 128, 128, 8, 4, True), QConfig(16, 128, 128, 4, 4, True))),
)
# Group sizes with no power-of-two divisor >= 32 (e.g. 48, 40, 24): masked 32-column steps per group.
QACT_ODD_GROUP_CONFIGS = (QConfig(16, 64, 32, 4, 3, True),)
# The interpreter cannot time candidates: the smallest legal tiles, swapped for decode as on a GPU.
QACT_INTERPRETER_CONFIGS = {True: QConfig(16, 32, 32, 4, 1, True), False: QConfig(16, 32, 32, 4, 1)}
QUANT_BLOCK = 1024
QUANT_INTERPRETER_BLOCK = 64


def qact_candidates(cc: Tuple[int, int], m: int, k: int, groups: int) -> Tuple[Optional[int], Tuple[QConfig, ...]]:
    """``(bucket limit, candidates)`` for a GPU of compute capability ``cc`` and this problem."""
    if groups > 1 and not _pow2_divisor(k // groups, 128):
        return -1, QACT_ODD_GROUP_CONFIGS
    buckets = QACT_BUCKETS_GROUPED if groups > 1 else QACT_BUCKETS_CHANNEL
    for limit, cfgs in buckets:
        if limit is None or m <= limit:
            if limit is None and groups == 1 and cc >= (9, 0):
                cfgs = cfgs + QACT_HOPPER_LARGE
            return limit, cfgs
    raise AssertionError("unreachable: the last bucket has no limit")


def qact_shipped_configs(cc: Tuple[int, int] = (9, 0)):
    """``[(config, grouped)]``: every configuration this backend may launch on such a GPU
    (odd group sizes count as grouped)."""
    seen = []
    for grouped, buckets in ((False, QACT_BUCKETS_CHANNEL), (True, QACT_BUCKETS_GROUPED)):
        cfgs = [c for _, cs in buckets for c in cs]
        if not grouped and cc >= (9, 0):
            cfgs += list(QACT_HOPPER_LARGE)
        for c in cfgs:
            if (c, grouped) not in seen:
                seen.append((c, grouped))
    return seen + [(c, True) for c in QACT_ODD_GROUP_CONFIGS]


@dataclasses.dataclass(frozen=True)
class QPlan:
    """Launch parameters: scale mode (kernel docstring), K step, segment length and count, and
    the split of K."""

    cfg: QConfig
    bk: int
    scale_mode: int
    seg: int
    nseg: int
    segs_per_split: int
    split_k: int


def _pow2_divisor(gs: int, bk: int) -> int:
    """The largest power of two <= ``bk`` dividing ``gs`` (0 when below MIN_BK)."""
    while bk >= MIN_BK and gs % bk:
        bk //= 2
    return bk if bk >= MIN_BK else 0


def make_qact_plan(cfg: QConfig, m: int, n: int, k: int, groups: int, num_sms: int,
                   split_k: Optional[int] = None) -> QPlan:
    """Scale mode, K step and split. ``split_k=None``: split K when the output tiles cannot occupy
    every SM (small M), up to about two CTAs per SM, each split at least MIN_SPLIT_COLUMNS wide.
    Splits start at K-step boundaries (modes 0 and 1; a K step never crosses a group in mode 1)
    or at group boundaries (mode 2)."""
    gs = k // groups
    bk = cfg.bk
    mode = 0
    if groups > 1:
        bk = _pow2_divisor(gs, cfg.bk)
        mode = 1 if bk else 2
        if mode == 2:
            bk = MIN_BK  # masked K steps inside each group
    unit_cols = gs if mode == 2 else bk
    units = groups if mode == 2 else -(-k // bk)  # what a split holds: groups, or K steps
    tiles = -(-m // cfg.bm) * -(-n // cfg.bn)
    want = 1 if split_k is None else split_k
    if split_k is None and tiles < num_sms:
        min_units = -(-MIN_SPLIT_COLUMNS // unit_cols)
        want = max(1, min(tb.MAX_SPLIT_K, -(-2 * num_sms // tiles), units // min_units))
    want = max(1, min(want, units, tb._INT32_MAX // max(1, m * n)))
    per = -(-units // want)
    split = -(-units // per)
    if mode == 2:
        return QPlan(cfg, bk, 2, gs, groups, per, split)
    seg = per * bk
    return QPlan(cfg, bk, mode, seg, groups if mode == 1 else -(-k // seg), 1, -(-k // seg))


def _zc_nonzero(zero: torch.Tensor, offset: int) -> bool:
    """Whether any weight zero point differs from the storage offset (then the kernel forms the
    activations' row sums). One device read per zero tensor, cached; while a CUDA graph is being
    captured an uncached answer is the always-correct True."""
    if zero.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return True
        return cached_repack(zero, ("triton_zc_nonzero", offset), lambda: bool((zero != offset).any()))
    return bool((zero != offset).any())


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] == 1 or t.stride(1) == 1 else t.contiguous()


def launch_qact(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype, cfg: QConfig,
                split_k: Optional[int] = None, need_xsum: Optional[bool] = None) -> torch.Tensor:
    """Run the integer GEMM with an explicit configuration (tests, autotuning, benchmarks).

    Arguments as :func:`fxkernels.ops.qact_linear` (validated there); ``qact_can_implement``
    must accept them. ``need_xsum=None`` decides from the zero points."""
    with tb._device_guard(xq.device):
        return _launch_qact(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype, cfg,
                            split_k, need_xsum)


def _launch_qact(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype, cfg, split_k=None,
                 need_xsum=None):
    km = tb.kernels()
    m, k = xq.shape
    n, groups = scale.shape
    y = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return y
    offset = 0 if bits <= 4 else 128
    if need_xsum is None:
        need_xsum = _zc_nonzero(zero, offset)
    num_sms = tb._device_facts(xq.device)[1] if xq.device.type == "cuda" else 4
    plan = make_qact_plan(cfg, m, n, k, groups, num_sms, split_k)
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    scale, zero, wsum = _unit_cols(scale), _unit_cols(zero), _unit_cols(wsum)
    out = tb._split_k_workspace(y, plan.split_k)
    grid = (-(-m // cfg.bm) * -(-n // cfg.bn), plan.split_k)
    km.qact_gemm_kernel[grid](
        xq, x_scale.contiguous(), x_zero.contiguous(), qweight, scale, zero, wsum,
        bias if bias is not None else scale, out,
        m, n, k, plan.seg, plan.nseg, plan.segs_per_split, offset,
        xq.stride(0), qweight.stride(0), scale.stride(0), zero.stride(0), wsum.stride(0), y.stride(0),
        PACKED=bits <= 4, SCALE_MODE=plan.scale_mode, NEED_XSUM=need_xsum, SWAP=cfg.swap, HAS_BIAS=bias is not None,
        USE_WORKSPACE=plan.split_k > 1, BM=cfg.bm, BN=cfg.bn, BK=plan.bk, GROUP_M=tb.GROUP_M,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return tb._reduce_split_k(km, out, y, bias, scale, plan.split_k)


_qact_tuned: Dict[tuple, QConfig] = {}


def choose_qact_config(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype) -> QConfig:
    m, k = xq.shape
    if xq.device.type != "cuda":
        return QACT_INTERPRETER_CONFIGS[m <= 16]
    limit, cands = qact_candidates(tb._device_facts(xq.device)[0], m, k, scale.shape[1])
    if not tb._autotune_enabled():
        return cands[0]
    key = (xq.device.index, limit, qweight.shape[0], xq.shape[1], scale.shape[1], bits, out_dtype,
           bias is not None)
    hit = _qact_tuned.get(key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return cands[0]  # no timing inside a CUDA-graph capture; warm up before capturing
    with tb._tune_lock:
        hit = _qact_tuned.get(key)
        if hit is None:
            hit = _qact_tuned[key] = tb._time_candidates(
                cands, lambda cfg: _launch_qact(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits,
                                                out_dtype, cfg))
    return hit


def _env_reason(t: torch.Tensor, name: str) -> Optional[str]:
    """Why the Triton backend cannot run on ``t``'s device in this process, or None."""
    if not tb._HAVE_TRITON:
        return "triton is not installed"
    dev = t.device.type
    if dev == "cuda":
        if tb.interpreting():
            return "TRITON_INTERPRET=1 is set: kernels are decorated for the CPU interpreter"
        cc, _ = tb._device_facts(t.device)
        if cc < (8, 0):
            return f"compute capability {cc[0]}.{cc[1]}; expected >= 8.0 (int8 tensor cores, cp.async)"
        return None
    if dev == "cpu":
        if not tb.interpreting():
            return "CPU tensor: runs on CUDA, or on CPU only under TRITON_INTERPRET=1 (a test tool)"
        if dispatch._forced() not in ("triton", name):
            return "CPU tensor under TRITON_INTERPRET=1: only when forced (use_backend('triton'))"
        return None
    return f"device {dev!r}; expected cuda (or cpu under TRITON_INTERPRET=1)"


def qact_can_implement(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype) -> Tuple[bool, str]:
    why = _env_reason(xq, QACT_KERNEL_NAME)
    if why is not None:
        return False, why
    if not 2 <= bits <= 8:
        return False, f"bits={bits}; expected 2..8"
    m, k = xq.shape
    n, groups = scale.shape
    gs = k // groups
    if gs > MAX_GROUP_K:
        what = "in_features" if groups == 1 else "group size"
        return False, (f"{what}={gs}; zero-point-corrected int32 sums are exact only for at most "
                       f"{MAX_GROUP_K} columns per group")
    if qweight.stride(1) != 1:
        return False, f"qweight strides {tuple(qweight.stride())}; expected a unit column stride"
    if xq.device.type == "cuda":
        why = alignment_reason(k, qweight.stride(0) * qweight.element_size(), qweight.data_ptr())
        if why is not None:
            return False, why
    biggest = max(xq.numel(), qweight.numel(), m * n)
    if biggest > tb._INT32_MAX:
        return False, f"a tensor of {biggest} elements exceeds the kernel's 32-bit offsets (max {tb._INT32_MAX})"
    return True, "int8 x int8 tensor-core GEMM (W4A8/W8A8, channel or grouped scales), fused epilogue"


def alignment_reason(k: int, row_bytes: int, data_ptr: int) -> Optional[str]:
    """Why a GPU launch would get the kernel's unaligned variant, or None. The JIT compiles a
    separate variant when K, the weight row stride or the weight pointer is not a multiple of 16;
    in it the weight loads cannot be vectorized and every configuration spills registers
    (thousands of LDL/STL on sm_80 and sm_90a: tests/test_triton_int8.py), so such layers are
    left to the other kernels (the reference) instead. LLaMA-like layers are aligned."""
    if k % 16:
        return f"in_features={k} is not a multiple of 16 (the kernel's unaligned variant spills registers)"
    if row_bytes % 16 or data_ptr % 16:
        return (f"qweight rows of {row_bytes} B at address {data_ptr:#x}; expected 16-byte aligned rows "
                "(the kernel's unaligned variant spills registers)")
    return None


def run_qact(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    with tb._device_guard(xq.device):
        cfg = choose_qact_config(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)
        return _launch_qact(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype, cfg)


# -- activation quantization --------------------------------------------------------------------
def quant_can_implement(x, scale, zero) -> Tuple[bool, str]:
    why = _env_reason(x, QUANT_KERNEL_NAME)
    if why is not None:
        return False, why
    if x.shape[1] == 0:
        return False, "x has K=0 columns; a per-token range needs at least one element"
    if x.numel() > tb._INT32_MAX:
        return False, f"x has {x.numel()} elements; the kernel's offsets are 32-bit (max {tb._INT32_MAX})"
    return True, "per-token / static int8 activation codes, bit-exact with the reference"


def run_quantize_act(x, scale, zero):
    with tb._device_guard(x.device):
        km = tb.kernels()
        x = x if x.stride(1) == 1 else x.contiguous()
        m, k = x.shape
        xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
        s = torch.empty(m, dtype=torch.float32, device=x.device)
        z = torch.empty(m, dtype=torch.int32, device=x.device)
        if m == 0:
            return xq, s, z
        block = QUANT_INTERPRETER_BLOCK if km.INTERPRETED else min(QUANT_BLOCK, 1 << max(0, (k - 1).bit_length()))
        static = scale is not None
        km.quantize_act_kernel[(m,)](
            x, xq, s, z, scale.reshape(1) if static else s, zero.reshape(1) if static else z, k, x.stride(0),
            STATIC=static, BLOCK=block, num_warps=4)
        return xq, s, z


# Small M ahead of the CUDA extension where its decode tiling starves the GPU: that kernel gives
# each CTA a 16 x CUDA_DECODE_BN output tile over all of K (csrc/cuda/fxk_gemm.h, Cfg0), so
# N = 1024 launches 32 CTAs, one per SM on 32 of 132 SMs. A decode GEMM is bound by weight bytes
# in flight (Little's law: an H100 needs ~2 MB in flight, 3.35 TB/s x ~600 ns), and 32 CTAs with
# a 24 KiB weight ring each hold 0.75 MB: under 40 % of the bandwidth at best. The split-K path
# launches about two CTAs per SM instead. Taken when the extension would run fewer CTAs than
# half the SMs; elsewhere the extension keeps its calls.
CUDA_DECODE_BN = 32
QACT_SMALL_M_NAME = "triton_qact_linear_small_m"


def small_m_can_implement(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype):
    if xq.device.type != "cuda":
        return False, f"xq on {xq.device}: the small-M route exists to fill a GPU's SMs"
    ok, why = small_m_preferred(xq.shape[0], qweight.shape[0], tb._device_facts(xq.device)[1])
    if not ok:
        return ok, why
    return qact_can_implement(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype)


def small_m_preferred(m: int, n: int, num_sms: int) -> Tuple[bool, str]:
    """Whether an ``M x N`` call is one where the CUDA extension's decode tiling starves the GPU."""
    if m > 16:
        return False, f"M={m} > 16: the CUDA extension's tiles (or the general Triton kernel) take it"
    ctas = -(-n // CUDA_DECODE_BN)
    if 2 * ctas >= num_sms:
        return False, f"N={n}: the CUDA extension's decode tiling launches {ctas} CTAs for {num_sms} SMs, enough"
    return True, f"N={n}: {ctas} CTAs of the CUDA extension for {num_sms} SMs; split-K launches ~2 per SM"


register(Kernel(QACT_KERNEL_NAME, "triton", "qact_linear", run_qact, qact_can_implement, priority=150))
register(Kernel(QACT_SMALL_M_NAME, "triton", "qact_linear", run_qact, small_m_can_implement, priority=210))
register(Kernel(QUANT_KERNEL_NAME, "triton", "quantize_act", run_quantize_act, quant_can_implement, priority=150))


# -- ahead-of-time compilation (GPU-less checks) -------------------------------------------------
_OUT = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def compile_qact_variant(arch: int, cfg: QConfig, bits: int, groups: int = 1, out_dtype: torch.dtype = torch.float16,
                         split_k: int = 1, need_xsum: bool = True, has_bias: bool = True, k: int = 4096,
                         aligned: bool = True):
    """Compile the integer GEMM for ``sm_<arch>`` (90 means sm_90a, as Triton targets Hopper)
    without a GPU, with 16-divisible sizes, pointers and row strides as the JIT specializes them
    for LLaMA-like shapes (``aligned=False``: nothing known to be divisible, the variant odd
    shapes such as K = 99 get). ``groups`` = 1 is per-channel; otherwise the group size is
    ``k // groups``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    km = tb.kernels()
    if km.INTERPRETED:
        raise RuntimeError("compile_qact_variant: TRITON_INTERPRET=1 is set; compile in a process without it")
    plan = make_qact_plan(cfg, 16, 4096, k, groups, 132, split_k)
    sig = {"x_ptr": "*i8", "sa_ptr": "*fp32", "za_ptr": "*i32", "w_ptr": "*u8" if bits <= 4 else "*i8",
           "s_ptr": "*fp32", "z_ptr": "*i32", "ws_ptr": "*i32", "b_ptr": "*fp32",
           "y_ptr": _OUT[out_dtype] if plan.split_k == 1 else "*fp32"}
    ints = ("M", "N", "K", "SEG", "NSEG", "SEGS_PER_SPLIT", "ZERO_OFFSET", "stride_xm", "stride_wn", "stride_sn",
            "stride_zn", "stride_wsn", "stride_ym")
    sig.update({name: "i32" for name in ints})
    consts = dict(PACKED=bits <= 4, SCALE_MODE=plan.scale_mode, NEED_XSUM=need_xsum, SWAP=cfg.swap, HAS_BIAS=has_bias,
                  USE_WORKSPACE=plan.split_k > 1, BM=cfg.bm, BN=cfg.bn, BK=plan.bk, GROUP_M=tb.GROUP_M)
    sig.update({name: "constexpr" for name in consts})
    names = km.qact_gemm_kernel.arg_names
    div16 = ["x_ptr", "sa_ptr", "za_ptr", "w_ptr", "s_ptr", "z_ptr", "ws_ptr", "b_ptr", "y_ptr", "N", "K", "SEG",
             "stride_xm", "stride_wn", "stride_ym"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16} if aligned else {}
    src = ASTSource(fn=km.qact_gemm_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.warps, "num_stages": cfg.stages})


def compile_quantize_variant(arch: int, dtype: torch.dtype = torch.float16, static: bool = False,
                             block: int = QUANT_BLOCK):
    """Compile the activation quantizer for ``sm_<arch>`` without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    km = tb.kernels()
    if km.INTERPRETED:
        raise RuntimeError("compile_quantize_variant: TRITON_INTERPRET=1 is set; compile in a process without it")
    sig = {"x_ptr": _OUT[dtype], "xq_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*i32", "ss_ptr": "*fp32",
           "sz_ptr": "*i32", "K": "i32", "stride_xm": "i32", "STATIC": "constexpr", "BLOCK": "constexpr"}
    names = km.quantize_act_kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ("x_ptr", "xq_ptr", "K", "stride_xm")}
    src = ASTSource(fn=km.quantize_act_kernel, signature=sig, constexprs=dict(STATIC=static, BLOCK=block),
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 1})


# -- the kernel's error model (tests and benchmarks) ---------------------------------------------
def plan_chunk(plan: QPlan, k: int, groups: int) -> int:
    """Columns summed exactly in int32 before each conversion to fp32: the split's K chunk (mode
    0), one K step (mode 1) or one group (mode 2)."""
    return {0: plan.seg, 1: plan.bk, 2: k // groups}[plan.scale_mode]


def error_bound(xq, x_scale, x_zero, qweight, scale, zero, wsum, bias, bits, out_dtype, chunk: int,
                splits: int = 1, truncating: bool = False):
    """``(exact, bound)``, float64 ``[M, N]`` on the inputs' device: the exact result of
    ``fxk::qact_linear`` and an elementwise bound on the error of a kernel that sums ``chunk``
    columns (inside one group) exactly in int32, converts each chunk's zero-point-corrected sum
    to fp32 (the ``za`` group term joins the group's first chunk), scales and accumulates it
    (3 roundings per chunk), applies the activation scale and bias, adds ``splits`` partials,
    and rounds once to ``out_dtype``:
    ``(3 chunks + splits + 3) * 2**-24 * mag + half an ulp of out_dtype at |exact|`` (a whole ulp
    with ``truncating``: Triton's interpreter truncates fp32 -> bf16), where
    ``mag = sa * sum over chunks |s_g P_chunk| + |bias|``. (Chunks of a split-K launch sum to
    the same per-chunk terms.) ``wsum`` is recomputed from the codes, as its definition."""
    import torch

    from ..reference import storage_offset, stored_codes

    k = xq.shape[1]
    groups = scale.shape[1]
    gs = k // groups
    chunk = min(chunk, gs)
    c = stored_codes(qweight, bits, k).double()
    zc = (zero - storage_offset(bits)).double()
    x = xq.double()
    za = x_zero.double()[:, None]
    y = torch.zeros(xq.shape[0], scale.shape[0], dtype=torch.float64, device=xq.device)
    mag = torch.zeros_like(y)
    nchunks = 0
    for g in range(groups):
        s = scale[:, g].double()[None, :]
        z = zc[:, g][None, :]
        for k0 in range(g * gs, (g + 1) * gs, chunk):
            sl = slice(k0, min(k0 + chunk, (g + 1) * gs))
            part = x[:, sl] @ c[:, sl].t() - z * x[:, sl].sum(1, keepdim=True)
            if k0 == g * gs:
                part = part - za * (c[:, g * gs:(g + 1) * gs].sum(1)[None, :] - gs * z)
            y += part * s
            mag += (part * s).abs()
            nchunks += 1
    sa = x_scale.double()[:, None]
    y, mag = y * sa, mag * sa
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[out_dtype]
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(torch.finfo(out_dtype).tiny))) - mant)
    last = ulp if truncating else 0.5 * ulp
    return y, (3 * nchunks + splits + 3) * 2.0 ** -24 * mag + last
