"""Triton backend: fused dequant-GEMM for weight-only INT2..8 layers (W4A16 / W8A16) on CUDA GPUs.

Importing this module is cheap and never needs triton: the kernels
(:mod:`fxkernels.backends.triton_kernels`) are imported on first use. On CPU tensors the kernel
runs only in Triton's interpreter, as a test tool: ``TRITON_INTERPRET=1`` in the environment and
the backend forced (``fxkernels.use_backend("triton")``).

Configurations: one candidate list per M bucket (:data:`BUCKETS`; :data:`FP32_BUCKETS` for fp32
activations; tilings that spill on the GPU's architecture are left out, :func:`candidate_configs`).
On a GPU the first call of
each (device, layer shape, dtype, layout) times the bucket's candidates with
``triton.testing.do_bench`` and keeps the fastest (``FXK_TRITON_AUTOTUNE=0``: take the bucket's
first candidate, no timing). In the interpreter a single fixed configuration runs
(:data:`INTERPRETER_CONFIG`), since the interpreter cannot compare timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .. import dispatch
from ..dispatch import Kernel, register, set_backend_status

KERNEL_NAME = "triton_dequant_linear"
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Config:
    """One tiling: BM x BN output tile, BK-deep K steps, warps per CTA, software-pipeline stages."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"BM{self.bm}-BN{self.bn}-BK{self.bk}-w{self.warps}-s{self.stages}"


# Candidates per M bucket: (largest M of the bucket, configurations), first = default.
# Decode (M <= 16): BM = 16 is the smallest tensor-core tile; narrow BN and deep BK give many
# CTAs each streaming long contiguous weight rows, and split-K (chosen from the SM count) fills
# the GPU when N / BN is small. Large M: 128-wide tiles and 8 warps, where Hopper/Ampere reach
# tensor-core peak; stages are sized so that the pipelined x and weight tiles fit A100 shared
# memory (164 KiB) as well as H100 (227 KiB).
BUCKETS: Tuple[Tuple[Optional[int], Tuple[Config, ...]], ...] = (
    (16, (Config(16, 32, 256, 4, 4), Config(16, 64, 256, 4, 3), Config(16, 64, 128, 4, 4),
          Config(16, 16, 512, 4, 4))),
    (64, (Config(32, 64, 128, 4, 4), Config(64, 64, 128, 4, 3), Config(32, 128, 128, 4, 3),
          Config(16, 64, 256, 4, 3))),
    (256, (Config(64, 128, 64, 4, 4), Config(128, 128, 64, 8, 3), Config(64, 256, 64, 8, 3),
           Config(128, 64, 64, 4, 4))),
    (None, (Config(128, 128, 64, 8, 3), Config(128, 256, 64, 8, 3), Config(128, 128, 128, 8, 3),
            Config(64, 256, 64, 8, 4))),
)
INTERPRETER_CONFIG = Config(16, 32, 32, 4, 1)
GROUP_M = 8
REDUCE_BLOCK = 1024
MAX_SPLIT_K = 16
MODE3_MAX_BK = 32
MODE3_MAX_STAGES = 2


# Register spills (tests/test_triton_compile.py compiles every choice and checks): on sm_80 these
# fp16/bf16 tilings spill (a 128x256 fp32 accumulator is 128 registers per thread with 8 warps,
# next to A100's pipelined operands), so they are Hopper-only candidates; with gathered
# per-element scales (mode 3) the widest tile spills on both architectures.
SPILLS_SM80 = (Config(128, 256, 64, 8, 3), Config(128, 128, 128, 8, 3), Config(64, 128, 64, 4, 4))
# fp32 activations: `input_precision="ieee"` dots run on FMA units, not tensor cores, with both
# operands and the accumulator in registers; every fp16-sized tile above spills (thousands of
# spill instructions), so fp32 has its own small tiles, free of spills on sm_80 and sm_90.
FP32_BUCKETS: Tuple[Tuple[Optional[int], Tuple[Config, ...]], ...] = (
    (16, (Config(16, 32, 32, 4, 2), Config(32, 32, 32, 4, 2))),
    (None, (Config(64, 64, 16, 4, 3), Config(128, 64, 16, 8, 2), Config(32, 64, 32, 4, 3), Config(32, 32, 32, 4, 2))),
)
SPILLS_GATHER = (Config(128, 256, 64, 8, 3), Config(64, 64, 16, 4, 3), Config(128, 64, 16, 8, 2),
                 Config(32, 64, 32, 4, 3))


def candidate_configs(m: int, cc: Tuple[int, int] = (9, 0), dtype: torch.dtype = torch.float16,
                      gather: bool = False) -> Tuple[Optional[int], Tuple[Config, ...]]:
    """``(bucket limit, candidates)`` a GPU of compute capability ``cc`` may choose from for M rows
    of ``dtype`` activations (``gather``: a group size that no power of two >= 16 divides, mode 3);
    the first candidate is the untimed default. Tilings that spill there are left out."""
    buckets = FP32_BUCKETS if dtype == torch.float32 else BUCKETS
    drop = (SPILLS_SM80 if cc < (9, 0) else ()) + (SPILLS_GATHER if gather else ())
    for limit, cfgs in buckets:
        if limit is None or m <= limit:
            return limit, tuple(c for c in cfgs if c not in drop)
    raise AssertionError("unreachable: the last bucket has no limit")


def shipped_configs(cc: Optional[Tuple[int, int]] = None, dtype: Optional[torch.dtype] = None,
                    gather: bool = False) -> List[Config]:
    """Every configuration this backend may launch (for compile checks): on a GPU of compute
    capability ``cc`` with ``dtype`` activations, or (None) the whole fp16/bf16 table."""
    seen: List[Config] = []
    if cc is None:
        for _, cfgs in BUCKETS:
            seen.extend(c for c in cfgs if c not in seen)
        return seen
    for limit, _ in (FP32_BUCKETS if dtype == torch.float32 else BUCKETS):
        m = limit if limit is not None else 1 << 20
        seen.extend(c for c in candidate_configs(m, cc, dtype or torch.float16, gather)[1] if c not in seen)
    return seen


def bucket_configs(m: int) -> Tuple[Config, ...]:
    for limit, cfgs in BUCKETS:
        if limit is None or m <= limit:
            return cfgs
    raise AssertionError("unreachable: the last bucket has no limit")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """One tiling of the small-M decode kernel: BN weight rows x BK columns per K step, warps,
    pipeline stages, and ``waves``: split K until about ``waves`` CTAs per SM exist (0: never)."""

    bn: int
    bk: int
    warps: int
    stages: int
    waves: int

    def __str__(self) -> str:
        return f"decode-BN{self.bn}-BK{self.bk}-w{self.warps}-s{self.stages}-waves{self.waves}"


# Decode (M <= DECODE_MAX_M): the weight tile is the 64-row side of Hopper's warp-group MMA, so
# BN >= 64; wide and deep tiles amortize the per-step work that is not per weight (x and scale
# loads, addresses, barriers) over more weights. sm_90 main loop, INT4 g128, SASS instructions
# per weight: BN512-BK128 2.3, BN256-BK256 2.4, BN256-BK128 2.6, BN128-BK128 2.8
# (bench/gpu_static.py, docs/GPU_STATIC.md). 256-row tiles and wider need 8 warps (with 4 they
# reach 255 registers and spill); A100 (163 KiB of shared memory per block) gets the tiles that
# fit it without spills. Split-K is part of the candidates: 4096x11008 at BN256 gives only 43
# row tiles for 132 SMs, so the waves choose how far K is split to fill the GPU.
DECODE_CONFIGS_SM90: Tuple[DecodeConfig, ...] = (
    DecodeConfig(256, 256, 8, 2, 2), DecodeConfig(512, 128, 8, 2, 2), DecodeConfig(256, 128, 8, 3, 2),
    DecodeConfig(256, 256, 8, 2, 4), DecodeConfig(128, 128, 4, 4, 4), DecodeConfig(64, 256, 4, 4, 4),
)
DECODE_CONFIGS_SM80: Tuple[DecodeConfig, ...] = (
    DecodeConfig(256, 128, 8, 3, 2), DecodeConfig(128, 128, 4, 4, 4), DecodeConfig(256, 128, 8, 3, 1),
    DecodeConfig(64, 256, 4, 4, 4),
)
DECODE_CONFIGS = DECODE_CONFIGS_SM90  # the list for the newest architecture (reports, compile checks)


def decode_configs(cc: Tuple[int, int]) -> Tuple[DecodeConfig, ...]:
    """Candidates for a GPU of compute capability ``cc`` (the first is the untimed default)."""
    return DECODE_CONFIGS_SM90 if cc >= (9, 0) else DECODE_CONFIGS_SM80


DECODE_MAX_M = 16
DECODE_INTERPRETER_CONFIG = DecodeConfig(16, 64, 4, 1, 0)
DECODE_KERNEL_NAME = "triton_decode_linear"


# -- environment ------------------------------------------------------------------------------
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Mirror of triton's own TRITON_INTERPRET parsing (read at kernel decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_kernels_lock = threading.Lock()


def kernels():
    """The kernel module, (re)decorated for the current mode (GPU compile or interpreter).

    ``@triton.jit`` fixes the mode when it decorates, so if TRITON_INTERPRET changed since the
    module was imported (tests set it before their first call) the module is reloaded."""
    with _kernels_lock:
        mod = sys.modules.get("fxkernels.backends.triton_kernels")
        if mod is None:
            mod = importlib.import_module("fxkernels.backends.triton_kernels")
        elif mod.INTERPRETED != interpreting():
            mod = importlib.reload(mod)
        return mod


_sm_cache: Dict[int, Tuple[Tuple[int, int], int]] = {}


def _device_facts(device: torch.device) -> Tuple[Tuple[int, int], int]:
    """(compute capability, SM count), cached: can_implement must not query the driver per call."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    hit = _sm_cache.get(idx)
    if hit is None:
        p = torch.cuda.get_device_properties(idx)
        hit = _sm_cache[idx] = ((p.major, p.minor), p.multi_processor_count)
    return hit


# -- planning a launch ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a launch needs besides tensors: derived from a Config and the problem."""

    cfg: Config
    bk: int
    scale_mode: int
    split_k: int
    k_per_split: int
    magic: bool
    magic_bits: int
    magic_bias: int
    stages: int


def make_plan(cfg: Config, m: int, n: int, k: int, groups: int, bits: int, dtype: torch.dtype,
              num_sms: int, split_k: Optional[int] = None) -> Plan:
    """Choose the scale mode, the K step and the split of K for one configuration.

    ``split_k=None`` picks it: when the output tiles cannot occupy every SM (decode on narrow
    layers), K is split so that about two CTAs per SM stream weights, capped so that every split
    keeps at least four K steps (otherwise the fp32 partials cost more traffic than they hide)."""
    bk = cfg.bk
    gs = k // groups
    if groups == 1:
        mode = 0
    else:
        while gs % bk and bk > 16:
            bk //= 2  # one group per K step: a per-row scale vector instead of a gather
        if gs % bk:
            # Gathered [BN, BK] scale and zero tiles are 16x the weight tile's bytes and the
            # pipeliner stages them in shared memory: a short K step and two stages keep them
            # within A100's 163 KiB. Rare group sizes only (no power of two >= 16 divides them).
            mode, bk = 3, min(cfg.bk, MODE3_MAX_BK)
        else:
            mode = 1 if cfg.bm <= 32 else 2
    ksteps = -(-k // bk)
    if split_k is None:
        tiles = -(-m // cfg.bm) * -(-n // cfg.bn)
        split_k = 1
        if tiles < num_sms:
            split_k = max(1, min(MAX_SPLIT_K, (2 * num_sms) // tiles, ksteps // 4))
    split_k = max(1, min(split_k, ksteps, _INT32_MAX // max(1, m * n)))  # workspace offsets are 32-bit
    k_per_split = -(-ksteps // split_k) * bk  # whole K steps: group tiles stay aligned
    split_k = -(-k // k_per_split)
    if dtype == torch.float16:
        magic, mbits, mbias = True, 0x6400, 1024   # 1024.0: fp16 spacing 1 up to 2048
    elif dtype == torch.bfloat16 and bits <= 4:
        magic, mbits, mbias = True, 0x4300, 128    # 128.0: bf16 spacing 1 up to 256 (q < 128 only)
    else:
        magic, mbits, mbias = False, 0, 0
    stages = min(cfg.stages, MODE3_MAX_STAGES) if mode == 3 else cfg.stages
    return Plan(cfg, bk, mode, split_k, k_per_split, magic, mbits, mbias, stages)


def launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           bias: Optional[torch.Tensor], bits: int, in_features: int, cfg: Config,
           split_k: Optional[int] = None) -> torch.Tensor:
    """Run the kernel with an explicit configuration (tests and autotuning call this directly).

    x: fp16/bf16/fp32 ``[M, K]``; qweight: uint8 ``[N, K/2]`` (bits <= 4) or int8 ``[N, K]``;
    scale fp32 / zero int32 ``[N, G]``; bias ``[N]`` or None. Returns ``[M, N]`` in x.dtype."""
    with _device_guard(x.device):
        return _launch(x, qweight, scale, zero, bias, bits, in_features, cfg, split_k)


def _launch(x, qweight, scale, zero, bias, bits, in_features, cfg, split_k=None):
    km = kernels()
    m, k = x.shape
    n, groups = scale.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    num_sms = _device_facts(x.device)[1] if x.device.type == "cuda" else 4
    plan = make_plan(cfg, m, n, k, groups, bits, x.dtype, num_sms, split_k)
    out = _split_k_workspace(y, plan.split_k)
    grid = (-(-m // cfg.bm) * -(-n // cfg.bn), plan.split_k)
    km.dequant_gemm_kernel[grid](
        x, qweight, scale, zero, bias if bias is not None else scale, out,
        m, n, k, k // 2, k // groups, plan.k_per_split, plan.k_per_split // 2,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), y.stride(1),
        PACKED=bits <= 4, SCALE_MODE=plan.scale_mode, MAGIC=plan.magic, MAGIC_BITS=plan.magic_bits,
        MAGIC_BIAS=plan.magic_bias, HAS_BIAS=bias is not None, USE_WORKSPACE=plan.split_k > 1,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        EMULATE_BF16=km.INTERPRETED and x.dtype == torch.bfloat16,
        BM=cfg.bm, BN=cfg.bn, BK=plan.bk, GROUP_M=GROUP_M, num_warps=cfg.warps, num_stages=plan.stages)
    return _reduce_split_k(km, out, y, bias, scale, plan.split_k)


def _split_k_workspace(y: torch.Tensor, split_k: int) -> torch.Tensor:
    """Where the kernels write: ``y`` itself, or fp32 partial sums ``[split_k, M, N]``."""
    return y if split_k == 1 else torch.empty((split_k, *y.shape), device=y.device, dtype=torch.float32)


def _reduce_split_k(km, out: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                    split_k: int) -> torch.Tensor:
    """``y`` = sum of the partial sums (+ bias) when the launch split K; returns ``y``."""
    if split_k > 1:
        m, n = y.shape
        km.splitk_reduce_kernel[(-(-(m * n) // REDUCE_BLOCK),)](
            out, bias if bias is not None else scale, y, m, n, split_k,
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4)
    return y


def _device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current device's current
    stream, so a layer on cuda:1 would otherwise run on cuda:0 (``device_map="auto"``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# -- decode kernel (small M) ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Launch parameters of the decode kernel derived from a DecodeConfig and the problem."""

    cfg: DecodeConfig
    bm: int
    ks: int
    scale_mode: int
    split_k: int
    k_per_split: int
    magic_bias: int
    magic_w: int
    mask: int


DECODE_MAX_SUBTILE = 128


def _subtile(k: int, groups: int, bk: int) -> int:
    """K columns per sub-tile: within one group (the largest power of two dividing the group
    size), at most BK and at most 128: the dequantized ``[BN, sub-tile]`` tile is staged in shared
    memory for the MMA, and 256-row tiles of 256 columns (128 KiB) do not fit A100's 163 KiB
    next to the pipelined weight words."""
    if groups == 1:
        return min(bk, DECODE_MAX_SUBTILE)
    gs = k // groups
    return min(bk, gs & -gs, DECODE_MAX_SUBTILE)


def make_decode_plan(cfg: DecodeConfig, m: int, n: int, k: int, groups: int, bits: int, dtype: torch.dtype,
                     num_sms: int, split_k: Optional[int] = None) -> DecodePlan:
    """Scale mode, sub-tile, split of K (``split_k=None``: from ``cfg.waves`` and the SM count)
    and the magic constants for one decode launch."""
    bm = 8 if m <= 8 else 16
    ks = _subtile(k, groups, cfg.bk)
    mode = 0 if groups == 1 else 1
    ksteps = -(-k // cfg.bk)
    if split_k is None:
        split_k = 1
        tiles = -(-n // cfg.bn)
        if cfg.waves and tiles < cfg.waves * num_sms:
            split_k = min(MAX_SPLIT_K, -(-cfg.waves * num_sms // tiles))
    split_k = max(1, min(split_k, ksteps, _INT32_MAX // max(1, m * n)))
    k_per_split = -(-ksteps // split_k) * cfg.bk
    split_k = -(-k // k_per_split)
    if dtype == torch.float16:
        bias, half = 1024, 0x6400  # fp16 spacing is 1 in [1024, 2048): 1024 + q exact for q < 1024
    else:
        bias, half = 128, 0x4300   # bf16 spacing is 1 in [128, 256): 128 + q exact for q < 128 (INT4)
    mask = 0x00FF00FF if bits > 4 else 0x000F000F
    return DecodePlan(cfg, bm, ks, mode, split_k, k_per_split, bias, half | (half << 16), mask)


def _as_i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def launch_decode(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bias: Optional[torch.Tensor], bits: int, in_features: int, cfg: DecodeConfig,
                  split_k: Optional[int] = None) -> torch.Tensor:
    """Run the decode kernel with an explicit configuration (same arguments as :func:`launch`;
    :func:`decode_can_implement` must accept them)."""
    with _device_guard(x.device):
        return _launch_decode(x, qweight, scale, zero, bias, bits, in_features, cfg, split_k)


def _launch_decode(x, qweight, scale, zero, bias, bits, in_features, cfg, split_k=None):
    km = kernels()
    m, k = x.shape
    n, groups = scale.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    num_sms = _device_facts(x.device)[1] if x.device.type == "cuda" else 4
    plan = make_decode_plan(cfg, m, n, k, groups, bits, x.dtype, num_sms, split_k)
    per_word = 4 if bits > 4 else 8
    words = qweight.view(torch.int32)  # the checkpoint storage as 32-bit words: no copy
    out = _split_k_workspace(y, plan.split_k)
    km.decode_gemm_kernel[(-(-n // cfg.bn), plan.split_k)](
        x, words, scale, zero, bias if bias is not None else scale, out,
        m, n, k, k // per_word, plan.k_per_split, plan.k_per_split // per_word,
        _as_i32(plan.mask), _as_i32(plan.magic_w),
        x.stride(0), words.stride(0), scale.stride(0), y.stride(0),
        GS=k // groups if groups > 1 else 0, BITS8=bits > 4, SCALE_MODE=plan.scale_mode,
        MAGIC_BIAS=plan.magic_bias, HAS_BIAS=bias is not None,
        USE_WORKSPACE=plan.split_k > 1, EMULATE_BF16=km.INTERPRETED and x.dtype == torch.bfloat16,
        SPLIT_ASM=not km.INTERPRETED, BM=plan.bm, BN=cfg.bn, BK=cfg.bk, KS=plan.ks, num_warps=cfg.warps,
        num_stages=cfg.stages)
    return _reduce_split_k(km, out, y, bias, scale, plan.split_k)


_decode_tuned: Dict[tuple, DecodeConfig] = {}


def choose_decode_config(x, qweight, scale, zero, bias, bits, in_features) -> DecodeConfig:
    if x.device.type != "cuda":
        return DECODE_INTERPRETER_CONFIG
    cands = decode_configs(_device_facts(x.device)[0])
    if not _autotune_enabled():
        return cands[0]
    key = (x.device.index, 8 if x.shape[0] <= 8 else 16, qweight.shape[0], in_features, scale.shape[1], bits,
           x.dtype, bias is not None)
    hit = _decode_tuned.get(key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return cands[0]  # no timing inside a CUDA-graph capture; warm up before capturing
    with _tune_lock:
        hit = _decode_tuned.get(key)
        if hit is None:
            hit = _decode_tuned[key] = _time_candidates(
                cands, lambda cfg: _launch_decode(x, qweight, scale, zero, bias, bits, in_features, cfg))
    return hit


def decode_can_implement(x, qweight, scale, zero, bias, bits, in_features) -> Tuple[bool, str]:
    ok, why = can_implement(x, qweight, scale, zero, bias, bits, in_features, _name=DECODE_KERNEL_NAME)
    if not ok:
        return ok, why
    m, k, groups = x.shape[0], in_features, scale.shape[1]
    if m > DECODE_MAX_M:
        return False, f"M={m} rows; the decode kernel takes M <= {DECODE_MAX_M}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"x.dtype {x.dtype}; the decode kernel takes fp16 or bf16"
    if bits > 4 and x.dtype != torch.float16:
        return False, f"bits={bits} with {x.dtype}: 128 + q is not exact in bf16 for 8-bit codes; expected fp16"
    per_word = 4 if bits > 4 else 8
    if k % per_word:
        return False, f"in_features={k} is not a multiple of {per_word} (whole 32-bit weight words per row)"
    if groups > 1 and (k // groups) % 16:
        return False, f"group size {k // groups} is not a multiple of 16 (the MMA's K step)"
    if qweight.stride(1) != 1 or qweight.stride(0) % 4 or qweight.storage_offset() % 4:
        return False, (f"qweight strides {tuple(qweight.stride())}, offset {qweight.storage_offset()}; "
                       "expected rows of 4-byte aligned words (unit column stride, row stride and offset % 4 == 0)")
    if x.device.type == "cuda" and torch.version.hip:
        return False, "ROCm device: the decode kernel splits registers with PTX inline assembly (NVIDIA only)"
    if x.stride(1) != 1 or scale.stride(1) != 1 or zero.stride() != scale.stride():
        return False, "x, scale and zero must have unit column stride (and zero the strides of scale)"
    return True, "fused dequant-GEMM, small-M decode path"


def run_decode(x, qweight, scale, zero, bias, bits, in_features):
    with _device_guard(x.device):
        cfg = choose_decode_config(x, qweight, scale, zero, bias, bits, in_features)
        return _launch_decode(x, qweight, scale, zero, bias, bits, in_features, cfg)


# -- configuration choice ---------------------------------------------------------------------
_tuned: Dict[tuple, Config] = {}
_tune_lock = threading.Lock()


def _autotune_enabled() -> bool:
    return os.environ.get("FXK_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def choose_config(x, qweight, scale, zero, bias, bits, in_features) -> Config:
    if x.device.type != "cuda":
        return INTERPRETER_CONFIG
    m, groups = x.shape[0], scale.shape[1]
    gather = groups > 1 and (in_features // groups) % 16 != 0
    bucket, cands = candidate_configs(m, _device_facts(x.device)[0], x.dtype, gather)
    if not _autotune_enabled():
        return cands[0]
    key = (x.device.index, bucket, qweight.shape[0], in_features, scale.shape[1], bits <= 4, x.dtype,
           bias is not None)
    hit = _tuned.get(key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return cands[0]  # timing inside a CUDA-graph capture is impossible; warm up before capturing
    with _tune_lock:
        hit = _tuned.get(key)
        if hit is None:
            hit = _tuned[key] = _time_candidates(
                cands, lambda cfg: _launch(x, qweight, scale, zero, bias, bits, in_features, cfg))
    return hit


def _time_candidates(cands, launch_with):
    """The fastest of ``cands`` by ``do_bench(lambda: launch_with(cfg))`` (the caller holds the
    device guard: do_bench allocates its L2-flush buffer and events on the current device)."""
    from triton.testing import do_bench

    best, best_ms, errors = None, float("inf"), []
    for cfg in cands:
        try:
            ms = do_bench(lambda: launch_with(cfg), warmup=5, rep=20)
        except Exception as e:  # e.g. triton OutOfResources on a smaller GPU: skip that tiling
            errors.append(f"{cfg}: {type(e).__name__}: {e}")
            warnings.warn(f"triton: configuration {cfg} failed and is skipped: {errors[-1]}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("triton: every configuration failed: " + "; ".join(errors))
    return best


# -- dispatch hooks ---------------------------------------------------------------------------
def can_implement(x, qweight, scale, zero, bias, bits, in_features, _name=KERNEL_NAME) -> Tuple[bool, str]:
    if not _HAVE_TRITON:
        return False, "triton is not installed"
    dev = x.device.type
    if dev == "cuda":
        if interpreting():
            return False, "TRITON_INTERPRET=1 is set: kernels are decorated for the CPU interpreter"
        cc, _ = _device_facts(x.device)
        if cc < (8, 0):
            return False, f"compute capability {cc[0]}.{cc[1]}; expected >= 8.0 (bf16 tensor cores, cp.async)"
    elif dev == "cpu":
        if not interpreting():
            return False, "CPU tensor: runs on CUDA, or on CPU only under TRITON_INTERPRET=1 (a test tool)"
        if dispatch._forced() not in ("triton", _name):
            return False, "CPU tensor under TRITON_INTERPRET=1: only when forced (use_backend('triton'))"
    else:
        return False, f"device {dev!r}; expected cuda (or cpu under TRITON_INTERPRET=1)"
    if x.dtype not in _ACT_DTYPES:
        return False, f"x.dtype {x.dtype}; expected one of fp16, bf16, fp32"
    if not 2 <= bits <= 8:
        return False, f"bits={bits}; expected 2..8"
    m, n = x.shape[0], qweight.shape[0]
    # Offsets are 32-bit inside the kernel (64-bit address math halves the index throughput).
    biggest = max(x.numel(), qweight.numel(), m * n)
    if biggest > _INT32_MAX:
        return False, f"a tensor of {biggest} elements exceeds the kernel's 32-bit offsets (max {_INT32_MAX})"
    return True, "fused dequant-GEMM"


def run(x, qweight, scale, zero, bias, bits, in_features):
    with _device_guard(x.device):
        cfg = choose_config(x, qweight, scale, zero, bias, bits, in_features)
        return _launch(x, qweight, scale, zero, bias, bits, in_features, cfg)


_HAVE_TRITON = _have_triton()
if not _HAVE_TRITON:
    set_backend_status("triton", False, "triton is not installed")
elif torch.cuda.is_available():
    set_backend_status("triton", True, "CUDA device found")
elif interpreting():
    set_backend_status("triton", True, "TRITON_INTERPRET=1: CPU interpreter (tests only, force the backend)")
else:
    set_backend_status("triton", False,
                       "no CUDA device (TRITON_INTERPRET=1 + use_backend('triton') runs the interpreter)")
# Above the CPU kernels and the reference; the CUDA extension's hand-written kernels, where they
# exist for an op, may rank higher.
register(Kernel(KERNEL_NAME, "triton", "dequant_linear", run, can_implement, priority=100))
# Ahead of the general kernel for the calls it takes (M <= 16): no 16-row padding of the weights.
register(Kernel(DECODE_KERNEL_NAME, "triton", "dequant_linear", run_decode, decode_can_implement, priority=105))


# -- ahead-of-time compilation (GPU-less checks) -----------------------------------------------
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def compile_variant(arch: int, cfg: Config, bits: int, dtype: torch.dtype, scale_mode: int,
                    split_k: int = 1, has_bias: bool = True, bk: Optional[int] = None):
    """Compile the GEMM kernel for ``sm_<arch>`` without a GPU (``triton.compile`` on an
    ``ASTSource``); returns the compiled kernel (``.asm['cubin']``, ``.metadata.shared``).

    Integer arguments and pointers are declared 16-divisible, as the JIT specializes them for
    LLaMA-like shapes, so the checked code is the vectorized code a GPU would run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    km = kernels()
    if km.INTERPRETED:
        raise RuntimeError("compile_variant: TRITON_INTERPRET=1 is set; compile in a process without it")
    plan_bk = bk or (min(cfg.bk, MODE3_MAX_BK) if scale_mode == 3 else cfg.bk)
    stages = min(cfg.stages, MODE3_MAX_STAGES) if scale_mode == 3 else cfg.stages
    magic = make_plan(cfg, 16, 4096, 4096, 1, bits, dtype, 132)
    sig = {"x_ptr": _PTR[dtype], "w_ptr": "*u8" if bits <= 4 else "*i8", "s_ptr": "*fp32", "z_ptr": "*i32",
           "b_ptr": "*fp32", "y_ptr": _PTR[dtype] if split_k == 1 else "*fp32"}
    ints = ("M", "N", "K", "KH", "GS", "K_PER_SPLIT", "KH_PER_SPLIT", "stride_xm", "stride_wn", "stride_sn",
            "stride_ym")
    sig.update({name: "i32" for name in ints})
    # The JIT turns integer arguments equal to 1 into constants; unit strides are what make the
    # loads vectorizable, so the check compiles them that way too.
    units = {name: 1 for name in ("stride_xk", "stride_wk", "stride_sg", "stride_yn")}
    consts = dict(PACKED=bits <= 4, SCALE_MODE=scale_mode, MAGIC=magic.magic, MAGIC_BITS=magic.magic_bits,
                  MAGIC_BIAS=magic.magic_bias, HAS_BIAS=has_bias, USE_WORKSPACE=split_k > 1,
                  DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", EMULATE_BF16=False,
                  BM=cfg.bm, BN=cfg.bn, BK=plan_bk, GROUP_M=GROUP_M)
    consts.update(units)
    sig.update({name: "constexpr" for name in consts})
    names = km.dequant_gemm_kernel.arg_names
    div16 = [(names.index(n),) for n in ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "N", "K", "KH",
                                          "GS", "K_PER_SPLIT", "KH_PER_SPLIT", "stride_xm", "stride_wn",
                                          "stride_ym")]
    attrs = {k: [["tt.divisibility", 16]] for k in div16}
    src = ASTSource(fn=km.dequant_gemm_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.warps, "num_stages": stages})


def compile_decode_variant(arch: int, cfg: DecodeConfig, bits: int, dtype: torch.dtype, groups: int = 32,
                           m: int = 1, split_k: int = 1, has_bias: bool = False, k: int = 4096,
                           split_asm: bool = True):
    """Compile the decode kernel for ``sm_<arch>`` without a GPU, as :func:`compile_variant` does
    for the general kernel (16-divisible sizes and pointers, unit strides as the JIT sees them).
    ``groups`` = 1 is per-channel; otherwise the group size is ``k // groups``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    km = kernels()
    if km.INTERPRETED:
        raise RuntimeError("compile_decode_variant: TRITON_INTERPRET=1 is set; compile in a process without it")
    plan = make_decode_plan(cfg, m, 4096, k, groups, bits, dtype, 132, split_k)
    sig = {"x_ptr": _PTR[dtype], "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i32", "b_ptr": "*fp32",
           "y_ptr": _PTR[dtype] if split_k == 1 else "*fp32"}
    ints = ("M", "N", "K", "KW", "K_PER_SPLIT", "KW_PER_SPLIT", "MASK", "MAGIC_W", "stride_xm",
            "stride_wn", "stride_sn", "stride_ym")
    sig.update({name: "i32" for name in ints})
    consts = dict(GS=k // groups if groups > 1 else 0, BITS8=bits > 4, SCALE_MODE=plan.scale_mode,
                  MAGIC_BIAS=plan.magic_bias, HAS_BIAS=has_bias,
                  USE_WORKSPACE=split_k > 1, EMULATE_BF16=False, SPLIT_ASM=split_asm, BM=plan.bm, BN=cfg.bn,
                  BK=cfg.bk, KS=plan.ks)
    sig.update({name: "constexpr" for name in consts})
    names = km.decode_gemm_kernel.arg_names
    div16 = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "N", "K", "KW", "K_PER_SPLIT", "KW_PER_SPLIT",
             "stride_xm", "stride_wn", "stride_ym"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=km.decode_gemm_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.warps, "num_stages": cfg.stages})


# The integer-activation kernels (W8A8 / W4A8 GEMM, activation quantization) register themselves.
from . import triton_int8  # noqa: E402,F401
