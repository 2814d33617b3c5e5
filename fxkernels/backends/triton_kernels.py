"""Triton kernels of the fused dequant-GEMM ``y = x @ dequant(W).T + bias`` (W4A16 / W8A16).

Imported lazily by :mod:`fxkernels.backends.triton` (never at package import): ``@triton.jit``
decides at decoration time whether it compiles for a GPU or runs in the interpreter
(``TRITON_INTERPRET=1``), so this module records which one it got in :data:`INTERPRETED`.

Argument conventions are the kernel-level ones of :mod:`fxkernels.reference`:

* ``x``: fp16 / bf16 / fp32 ``[M, K]`` (any strides);
* ``w``: the checkpoint storage, unchanged (no repack): uint8 ``[N, K/2]`` with the code of the
  even column in the low nibble (``PACKED``), or int8 ``[N, K]`` holding ``q - 128``;
* ``s``: fp32 ``[N, G]``, ``z``: int32 ``[N, G]`` (unsigned code domain), groups of ``GS = K/G``
  consecutive columns;
* ``b``: optional bias ``[N]`` (any float dtype); ``y``: ``[M, N]`` in ``x.dtype``, or with
  ``USE_WORKSPACE`` (split-K) an fp32 workspace ``[splits, M, N]`` summed by :func:`splitk_reduce_kernel`.

Why no repack: a ``[BN, BK/2]`` byte tile of the native layout is ``BN`` runs of ``BK/2 >= 16``
contiguous bytes, i.e. whole 32-byte sectors, so global loads are already fully used; what
remains is ALU work, which the "magic number" conversion below keeps small.

SCALE_MODE (a compile-time choice made by the launcher):

* 0 (G == 1, per-channel / per-tensor): the integer ``q - z`` is exact in fp16/bf16, so the
  tensor cores see exact integers and the scale is applied once per output in the epilogue;
* 1 (one group per K tile, small BM): ``acc += dot(x, q - z) * s[n]``: a ``[BM, BN]`` multiply
  per tile instead of ``[BN, BK]`` when BM < BK (decode);
* 2 (one group per K tile, large BM): dequantize ``(q - z) * s`` in fp32, round once to the
  activation dtype and accumulate in the tensor-core accumulator (cheaper when BM >= BK);
* 3 (group size that is not a multiple of BK, e.g. 48 or 24): per-element gathered scale/zero.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@triton.jit
def _codes(w_ptr, offs_n, k0, k_end, kb0, kb_end, stride_wn, stride_wk, mask_n, PACKED: tl.constexpr,
           BK: tl.constexpr):
    """Unsigned codes ``[BN, BK]`` (uint8) of columns ``k0 .. k0+BK`` of the weight rows ``offs_n``
    (packed: bytes ``kb0 .. kb0+BK/2``, with ``kb0 = k0/2``).

    Byte offsets and bounds come in separately (not as ``k0 // 2``): Triton's alignment analysis
    loses divisibility through a division, and without it the loads stay single bytes instead of
    16-byte vectors."""
    if PACKED:
        offs_kb = kb0 + tl.arange(0, BK // 2)
        mask = mask_n[:, None] & (offs_kb < kb_end)[None, :]
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kb[None, :] * stride_wk, mask=mask, other=0)
        # low nibble = even k: interleaving (lo, hi) along K restores column order.
        q = tl.interleave(b & 0xF, b >> 4)
    else:
        offs_k = k0 + tl.arange(0, BK)
        mask = mask_n[:, None] & (offs_k < k_end)[None, :]
        c = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0)
        # int8 storage holds q - 128: flipping the sign bit of the byte gives q (0..255).
        q = c.to(tl.uint8, bitcast=True) ^ 0x80
    return q


@triton.jit
def _centered(q, z, DT: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_BIAS: tl.constexpr,
              EMULATE_BF16: tl.constexpr):
    """``q - z`` as exact integers in dtype DT (``z`` broadcastable to ``q``).

    With MAGIC the code is OR-ed into the mantissa of ``MAGIC_BIAS`` (1024.0 in fp16, 128.0 in
    bf16, where the spacing of representable values is exactly 1), giving ``MAGIC_BIAS + q``
    without an int->float conversion (I2F runs at a fraction of the FP16 pipe's rate); the
    subtraction of ``MAGIC_BIAS + z`` is exact, so the result equals ``q - z``.

    EMULATE_BF16 (interpreter only): Triton's interpreter does bf16 arithmetic on the raw bit
    patterns, so the exact subtraction is done in fp32 there."""
    if MAGIC and EMULATE_BF16:
        wf = (q.to(tl.uint16) | MAGIC_BITS).to(DT, bitcast=True)
        return (wf.to(tl.float32) - (z + MAGIC_BIAS).to(tl.float32)).to(DT)
    elif MAGIC:
        wf = (q.to(tl.uint16) | MAGIC_BITS).to(DT, bitcast=True)
        return wf - (z + MAGIC_BIAS).to(tl.float32).to(DT)
    else:
        # int -> bf16 goes through fp32 (exact for |v| < 2**24): PTX has no direct s32 -> bf16
        # conversion before sm_90, and Triton's interpreter gets int -> bf16 wrong.
        return (q.to(tl.int32) - z).to(tl.float32).to(DT)


@triton.jit
def _mma(xt, w, acc, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``acc + xt [BM, BK] @ w.T`` accumulated in fp32 (in the MMA accumulator itself).

    EMULATE_BF16 (interpreter only) widens the operands first: Triton's interpreter computes
    bf16 dots wrongly, and widening values that are already bf16 is exact, so the fp32 dot equals
    a tensor-core bf16 dot up to summation order."""
    if EMULATE_BF16:
        return tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(xt, tl.trans(w), acc, input_precision=DOT_PRECISION)


@triton.jit
def dequant_gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, KH, GS, K_PER_SPLIT, KH_PER_SPLIT,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
        PACKED: tl.constexpr, SCALE_MODE: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr,
        MAGIC_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WORKSPACE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    DT = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = min(K, k_start + K_PER_SPLIT)
    kb_start = pid_k * KH_PER_SPLIT  # packed: byte column of k_start (KH = K/2)
    kb_end = min(KH, kb_start + KH_PER_SPLIT)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if SCALE_MODE == 0:
        zc = tl.load(z_ptr + offs_n * stride_sn, mask=mask_n, other=0)
    for kt in range(0, tl.cdiv(k_end - k_start, BK)):
        k0 = k_start + kt * BK
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = _codes(w_ptr, offs_n, k0, k_end, kb_start + kt * (BK // 2), kb_end, stride_wn, stride_wk, mask_n,
                   PACKED, BK)
        if SCALE_MODE == 0:
            w = _centered(q, zc[:, None], DT, MAGIC, MAGIC_BITS, MAGIC_BIAS, EMULATE_BF16)
            acc = _mma(xt, w, acc, DOT_PRECISION, EMULATE_BF16)
        elif SCALE_MODE == 3:
            sg = offs_k // GS
            ms = mask_n[:, None] & mask_k[None, :]
            soff = offs_n[:, None] * stride_sn + sg[None, :] * stride_sg
            s = tl.load(s_ptr + soff, mask=ms, other=0.0)
            z = tl.load(z_ptr + soff, mask=ms, other=0)
            w = ((q.to(tl.int32) - z).to(tl.float32) * s).to(DT)
            acc = _mma(xt, w, acc, DOT_PRECISION, EMULATE_BF16)
        else:
            # The tile lies inside one group (the launcher makes BK divide GS and splits align).
            g = k0 // GS
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
            z = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0)
            if SCALE_MODE == 1:
                w = _centered(q, z[:, None], DT, MAGIC, MAGIC_BITS, MAGIC_BIAS, EMULATE_BF16)
                acc += _mma(xt, w, tl.zeros((BM, BN), dtype=tl.float32), DOT_PRECISION, EMULATE_BF16) * s[None, :]
            else:
                w = ((q.to(tl.int32) - z[:, None]).to(tl.float32) * s[:, None]).to(DT)
                acc = _mma(xt, w, acc, DOT_PRECISION, EMULATE_BF16)
    if SCALE_MODE == 0:
        sc = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
        acc = acc * sc[None, :]

    mask_y = mask_m[:, None] & mask_n[None, :]
    if not USE_WORKSPACE:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        # fp32 partial sums; the bias and the rounding to x.dtype happen once, after the sum.
        ws = y_ptr + pid_k * M * N
        tl.store(ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_y)


@triton.jit
def splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, M, N, split_k, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y[m, n] = sum_s ws[s, m, n] + b[n]`` in fp32, stored in y's dtype (contiguous [M, N])."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(split_k):
        acc += tl.load(ws_ptr + i * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
