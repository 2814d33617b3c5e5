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


# -- decode (small M): weights as 32-bit words, the weight tile as the MMA's wide operand ------
@triton.jit
def _halves(v, SPLIT_ASM: tl.constexpr):
    """The low and high 16 bits of each int32 of ``v`` (as uint16).

    SPLIT_ASM (GPU builds): one PTX ``mov.b32 {lo, hi}, v`` (the first destination is the low
    half), which ptxas resolves to the two halves of v's register, so a later f16x2 operation on
    (lo, hi) reads v as is. Written with a mask and a shift (the interpreter's form, same values),
    LLVM loses the pairing and ptxas re-assembles every pair with a PRMT: +0.5 instructions per
    INT4 weight on sm_90 (bench/gpu_static.py). The interpreter cannot run inline assembly."""
    if SPLIT_ASM:
        return tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [v], dtype=(tl.uint16, tl.uint16),
                                         is_pure=True, pack=1)
    else:
        return (v & 0xFFFF).to(tl.uint16), (v >> 16).to(tl.uint16)


@triton.jit
def _unpack_words(w, MASK, MAGIC_W, DT: tl.constexpr, BITS8: tl.constexpr, SPLIT_ASM: tl.constexpr):
    """``[BN, BKW]`` int32 words -> ``[BN, BKW * per_word]`` values ``MAGIC_BIAS + q`` in DT, in
    the column order of :func:`_word_order` (not K order).

    One AND-OR (a single LOP3) on a word sets two codes into the mantissas of two 16-bit floats
    at once (``MAGIC_W`` = the magic bias in both halves), so the per-weight integer work is a
    quarter (INT4) to half (INT8) of an instruction. ``MASK`` and ``MAGIC_W`` are runtime
    arguments on purpose: LOP3 takes one immediate, and a second compile-time constant gets
    re-materialized into a register before every LOP3 (measured: +0.3 instructions per weight on
    sm_90), while a kernel argument is read from the constant bank as an operand.

    INT4 (8 nibbles per word, nibble j = column j): shifts by 0/4/8/12 bring nibble pairs
    (j, j+4) under the mask 0x000F000F. INT8 (4 bytes, each ``q - 128``): flipping every sign bit
    gives ``q``, shifts by 0/8 bring byte pairs (j, j+2) under 0x00FF00FF. The join tree keeps
    the two halves of each LOP3 result adjacent (``join`` appends a trailing axis, so the last
    join pairs them): the subtraction of the zero point is then one f16x2/bf16x2 operation on the
    LOP3's register, and the activations are loaded in the same permuted column order instead."""
    if BITS8:
        u = w ^ -2139062144  # 0x80808080
        b0, b2 = _halves((u & MASK) | MAGIC_W, SPLIT_ASM)
        b1, b3 = _halves(((u >> 8) & MASK) | MAGIC_W, SPLIT_ASM)
        q = tl.join(tl.join(b0, b1), tl.join(b2, b3))
    else:
        a0, a4 = _halves((w & MASK) | MAGIC_W, SPLIT_ASM)
        a1, a5 = _halves(((w >> 4) & MASK) | MAGIC_W, SPLIT_ASM)
        a2, a6 = _halves(((w >> 8) & MASK) | MAGIC_W, SPLIT_ASM)
        a3, a7 = _halves(((w >> 12) & MASK) | MAGIC_W, SPLIT_ASM)
        q = tl.join(tl.join(tl.join(a0, a2), tl.join(a1, a3)), tl.join(tl.join(a4, a6), tl.join(a5, a7)))
    per_word: tl.constexpr = 4 if BITS8 else 8
    q = tl.reshape(q, (w.shape[0], w.shape[1] * per_word))
    return q.to(DT, bitcast=True)


@triton.jit
def _magic_zero(z, MAGIC_W, DT: tl.constexpr):
    """``MAGIC_BIAS + z`` in DT by the same mantissa OR as the codes (one LOP3, no int->float
    conversions); exact for the zero points' range (z < 1024 in fp16, z < 128 in bf16)."""
    return (z | (MAGIC_W & 0xFFFF)).to(tl.uint16).to(DT, bitcast=True)


@triton.jit
def _word_order(t, BITS8: tl.constexpr):
    """K offset (within its word) of tile column ``t`` as :func:`_unpack_words` lays them out:
    INT4 columns hold K offsets 0,4,1,5,2,6,3,7 of each word, INT8 0,2,1,3."""
    if BITS8:
        return (t & ~3) + ((t >> 1) & 1) + 2 * (t & 1)
    else:
        return (t & ~7) + 2 * ((t >> 2) & 1) + ((t >> 1) & 1) + 4 * (t & 1)


@triton.jit
def _decode_subtile(acc, x_ptr, w_ptr, s_ptr, z_ptr, rows, offs_m, mask_m, kk, kw, k_end, kw_end, zz_ch,
                    MASK, MAGIC_W, K, stride_xm, stride_wn, stride_sn, GS: tl.constexpr,
                    DT: tl.constexpr, BITS8: tl.constexpr, SCALE_MODE: tl.constexpr, MAGIC_BIAS: tl.constexpr,
                    EMULATE_BF16: tl.constexpr, SPLIT_ASM: tl.constexpr, MASKED: tl.constexpr, KS: tl.constexpr):
    """``acc [BN, BM] += dequant(W[rows, kk:kk+KS]) @ x[:, kk:kk+KS].T`` (K columns from ``kk``,
    word column ``kw = kk / per_word`` passed separately so its divisibility stays visible)."""
    per_word: tl.constexpr = 4 if BITS8 else 8
    offs_w = kw + tl.arange(0, KS // per_word)
    offs_k = kk + _word_order(tl.arange(0, KS), BITS8)
    wp = w_ptr + rows[:, None] * stride_wn + offs_w[None, :]
    xp = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
    if MASKED:  # the last, partial K step of a split: zero words and zero activations add nothing
        w = tl.load(wp, mask=(offs_w < kw_end)[None, :], other=0)
        xt = tl.load(xp, mask=mask_m[None, :] & (offs_k < k_end)[:, None], other=0.0)
    else:
        w = tl.load(wp)
        xt = tl.load(xp, mask=mask_m[None, :], other=0.0)
    q = _unpack_words(w, MASK, MAGIC_W, DT, BITS8, SPLIT_ASM)
    if SCALE_MODE == 0:
        zz = zz_ch  # loop-invariant, converted to DT once
    else:
        # KS divides the group size and sub-tiles start at multiples of KS: one group per sub-tile
        # (clamped: a masked sub-tile past K must not read past the last group)
        # (GS is a compile-time constant: a runtime division costs ~15 instructions per sub-tile)
        g = tl.minimum(kk, K - 1) // GS
        s = tl.load(s_ptr + rows * stride_sn + g)
        zz = _magic_zero(tl.load(z_ptr + rows * stride_sn + g), MAGIC_W, DT)
    if EMULATE_BF16:
        # interpreter only: it does bf16 arithmetic (and dots) on raw bit patterns; fp32 is exact here
        wq = q.to(tl.float32) - zz[:, None].to(tl.float32)
        part = tl.dot(wq, xt.to(tl.float32), input_precision="ieee")
    else:
        # (MAGIC_BIAS + q) - (MAGIC_BIAS + z) = q - z exactly (small integers), paired f16x2/bf16x2 subtracts
        wq = q - zz[:, None]
        part = tl.dot(wq, xt)
    if SCALE_MODE == 0:
        return acc + part
    else:
        return acc + part * s[:, None]


@triton.jit
def decode_gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, KW, K_PER_SPLIT, KW_PER_SPLIT, MASK, MAGIC_W,
        stride_xm, stride_wn, stride_sn, stride_ym,
        GS: tl.constexpr, BITS8: tl.constexpr, SCALE_MODE: tl.constexpr, MAGIC_BIAS: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_WORKSPACE: tl.constexpr, EMULATE_BF16: tl.constexpr, SPLIT_ASM: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr):
    """Small-M ``y = x @ dequant(W).T (+ bias)`` computed transposed, ``y.T = W' @ x.T``.

    The weight tile ``[BN, KS]`` is the MMA's M-side operand (64-row warp-group MMA on Hopper),
    the few activation rows its narrow N side (BM = 8 or 16), so a batch of one pads the
    activations, not the weights. ``w`` is the checkpoint's storage viewed as int32 words
    (``[N, KW]``, ``KW = K / per_word``); K steps of BK columns run as BK/KS sub-tiles of one
    group each. Rows past N are clamped to N-1 instead of masked (their results are never
    stored), and only the last K step of a split is masked, so the main loop carries no masks.

    SCALE_MODE 0: per-channel (G = 1): exact integer dot, scale once in the epilogue;
    1: grouped (KS divides GS): each sub-tile's dot is scaled by its group's scale."""
    DT = x_ptr.dtype.element_ty
    per_word: tl.constexpr = 4 if BITS8 else 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1)
    offs_m = tl.arange(0, BM)
    mask_m = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    kw_start = pid_k * KW_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    kw_end = tl.minimum(KW, kw_start + KW_PER_SPLIT)
    n_full = (k_end - k_start) // BK

    zz_ch = tl.zeros((BN,), dtype=DT)
    if SCALE_MODE == 0:
        zz_ch = _magic_zero(tl.load(z_ptr + rows * stride_sn), MAGIC_W, DT)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for kt in range(0, n_full):
        for sub in tl.static_range(BK // KS):
            acc = _decode_subtile(acc, x_ptr, w_ptr, s_ptr, z_ptr, rows, offs_m, mask_m,
                                  k_start + kt * BK + sub * KS,
                                  kw_start + kt * (BK // per_word) + sub * (KS // per_word),
                                  k_end, kw_end, zz_ch, MASK, MAGIC_W, K, stride_xm, stride_wn, stride_sn, GS,
                                  DT, BITS8, SCALE_MODE, MAGIC_BIAS, EMULATE_BF16, SPLIT_ASM, False, KS)
    if k_start + n_full * BK < k_end:
        for sub in tl.static_range(BK // KS):
            acc = _decode_subtile(acc, x_ptr, w_ptr, s_ptr, z_ptr, rows, offs_m, mask_m,
                                  k_start + n_full * BK + sub * KS,
                                  kw_start + n_full * (BK // per_word) + sub * (KS // per_word),
                                  k_end, kw_end, zz_ch, MASK, MAGIC_W, K, stride_xm, stride_wn, stride_sn, GS,
                                  DT, BITS8, SCALE_MODE, MAGIC_BIAS, EMULATE_BF16, SPLIT_ASM, True, KS)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr + rows * stride_sn)[:, None]

    mask_y = (offs_n < N)[:, None] & mask_m[None, :]
    if not USE_WORKSPACE:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        ws = y_ptr + pid_k * M * N
        tl.store(ws + offs_m[None, :] * N + offs_n[:, None], acc, mask=mask_y)


# -- integer activations (W8A8 / W4A8): int8 x int8 tensor-core GEMM, int32 accumulation --------
@triton.jit
def _along_n(v, SWAP: tl.constexpr):
    """A per-output-column vector ``[BN]`` broadcast against the accumulator (``[BN, BM]`` when
    SWAP, else ``[BM, BN]``)."""
    if SWAP:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _along_m(v, SWAP: tl.constexpr):
    """A per-activation-row vector ``[BM]`` broadcast against the accumulator."""
    if SWAP:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _dot_tile(xt, w_ptr, offs_n, k0, k_stop, stride_wn, mask_n, acc, PACKED: tl.constexpr, SWAP: tl.constexpr,
              BK: tl.constexpr):
    """``acc + xq . c`` (int32, exact) for the activation tile ``xt [BM, BK]`` (columns
    ``k0 .. k0+BK``) and the weight rows ``offs_n`` (codes zero past ``k_stop``).

    int8 storage (``q - 128``) is the MMA operand as loaded: no conversion on the weight path.
    PACKED (bits <= 4): a byte holds two nibbles, the even column in the low one; a nibble
    (0..15) is already a valid int8, so the tensor cores multiply the stored codes and the zero
    point is corrected after the dot. SWAP with BK >= 64 (decode): the low and high nibbles
    stay two ``[BN, BK/2]`` operands against the even and odd activation columns (a reshape of
    the small activation tile splits them) instead of being interleaved back into column order:
    5.1 instead of 6.5 SASS instructions per INT4 weight on sm_90a (on sm_80 6.5 against 6.3)
    (docs/GPU_STATIC.md; the difference is byte permutes). Unswapped tiles interleave: there the
    split costs as much or more, and with groups it spills on sm_80.
    """
    if PACKED:
        offs_kb = k0 // 2 + tl.arange(0, BK // 2)
        mask = mask_n[:, None] & (offs_kb < (k_stop + 1) // 2)[None, :]
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kb[None, :], mask=mask, other=0)
        lo = (b & 0xF).to(tl.int8, bitcast=True)
        hi = (b >> 4).to(tl.int8, bitcast=True)
        if SWAP and BK >= 64:
            x_even, x_odd = tl.split(tl.reshape(xt, (xt.shape[0], BK // 2, 2)))
            acc = tl.dot(lo, tl.trans(x_even), acc, out_dtype=tl.int32)
            acc = tl.dot(hi, tl.trans(x_odd), acc, out_dtype=tl.int32)
        elif SWAP:
            acc = tl.dot(tl.interleave(lo, hi), tl.trans(xt), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(xt, tl.trans(tl.interleave(lo, hi)), acc, out_dtype=tl.int32)
    else:
        offs_k = k0 + tl.arange(0, BK)
        mask = mask_n[:, None] & (offs_k < k_stop)[None, :]
        c = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
        if SWAP:
            acc = tl.dot(c, tl.trans(xt), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(xt, tl.trans(c), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _int_segment(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, kb, ke, stride_xm, stride_wn,
                 PACKED: tl.constexpr, NEED_XSUM: tl.constexpr, SWAP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``(sum_k xq c, sum_k xq)`` over columns ``kb .. ke``: the exact int32 dot (``[BN, BM]``
    when SWAP) and, with NEED_XSUM, the activation row sums ``[BM]``.

    Row sums: with SWAP the activation tile is 16 rows and is summed directly; otherwise a
    ``[BM, BK]`` tile would need its own register copy for a cross-thread reduction (64 registers
    per thread at 128x128 with 8 warps, enough to spill next to the accumulator), so the tensor
    cores form them instead, as ``x . e0`` with a 16-column operand whose first column is ones
    (1/8 of the MMA work at BN = 128)."""
    if SWAP:
        iacc = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        iacc = tl.zeros((BM, BN), dtype=tl.int32)
    xs2 = tl.zeros((BM, 16), dtype=tl.int32)
    xs = tl.zeros((BM,), dtype=tl.int32)
    e0 = ((tl.arange(0, BK)[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0)).to(tl.int8)
    for kt in range(0, tl.cdiv(ke - kb, BK)):
        k0 = kb + kt * BK
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & (offs_k < ke)[None, :], other=0)
        iacc = _dot_tile(xt, w_ptr, offs_n, k0, ke, stride_wn, mask_n, iacc, PACKED, SWAP, BK)
        if NEED_XSUM:
            if SWAP:
                xs += tl.sum(xt.to(tl.int32), axis=1)
            else:
                xs2 = tl.dot(xt, e0, xs2, out_dtype=tl.int32)
    if NEED_XSUM and not SWAP:
        xs = tl.sum(xs2, axis=1)
    return iacc, xs


@triton.jit
def _int_step(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, k0, stride_xm, stride_wn,
              PACKED: tl.constexpr, NEED_XSUM: tl.constexpr, SWAP: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One K step of BK whole columns from ``k0`` (inside K: no column mask):
    ``(xq . c, sum_k xq)`` as in :func:`_int_segment`, from a fresh int32 tile."""
    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, BK))[None, :],
                 mask=mask_m[:, None], other=0)
    if SWAP:
        d = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        d = tl.zeros((BM, BN), dtype=tl.int32)
    d = _dot_tile(xt, w_ptr, offs_n, k0, k0 + BK, stride_wn, mask_n, d, PACKED, SWAP, BK)
    xs = tl.zeros((BM,), dtype=tl.int32)
    if SWAP:
        if NEED_XSUM:
            xs = tl.sum(xt.to(tl.int32), axis=1)
    else:
        if NEED_XSUM:
            e0 = ((tl.arange(0, BK)[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0)).to(tl.int8)
            xs = tl.sum(tl.dot(xt, e0, out_dtype=tl.int32), axis=1)
    return d, xs


@triton.jit
def qact_gemm_kernel(
        x_ptr, sa_ptr, za_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, b_ptr, y_ptr,
        M, N, K, SEG, NSEG, SEGS_PER_SPLIT, ZERO_OFFSET,
        stride_xm, stride_wn, stride_sn, stride_zn, stride_wsn, stride_ym,
        PACKED: tl.constexpr, SCALE_MODE: tl.constexpr, NEED_XSUM: tl.constexpr, SWAP: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_WORKSPACE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """``y[m, n] = sa[m] * sum_g s[n, g] * sum_{k in g} (xq[m,k] - za[m]) (c[n,k] - zc[n,g]) + b[n]``.

    ``x``: int8 codes ``[M, K]`` (unit column stride), ``sa`` fp32 / ``za`` int32 ``[M]``;
    ``w``: checkpoint storage (PACKED nibbles ``[N, ceil(K/2)]`` or int8 ``q - 128`` ``[N, K]``,
    unit column stride); ``s`` fp32 / ``z`` int32 (unsigned domain; ``zc = z - ZERO_OFFSET``) /
    ``ws`` int32 (per-group sums of the stored codes) ``[N, G]``, each with its own row stride and
    a unit column stride.

    Integer sums are exact in int32 on the tensor cores; the zero points are corrected in
    integers, ``dot - zc * sum_k xq - za * (ws - GS * zc)`` (the ``za`` term once per group), and
    sums wrap modulo 2**32, so a result is exact whenever the true corrected sum fits int32
    (|sum| <= 255**2 * group size: group size <= 32768). SCALE_MODE (chosen by the launcher):

    * 0, per channel (G = 1): a split's K chunk (SEG columns, split ``pid_k``) in one int32
      accumulator; the ``za`` term by the split holding column 0 (GS = K); the scale once.
    * 1, groups that are a multiple of BK (SEG = K_PER_SPLIT, a multiple of BK): one flat K loop,
      each step inside one group; its int32 dot, corrected, is scaled into an fp32 accumulator
      (the ``za`` term at the step that starts a group). One int32 tile per step, not a second
      accumulator held across a group: that keeps large tiles free of register spills.
    * 2, any other group size (SEG = GS): a split holds SEGS_PER_SPLIT whole groups, each summed
      in masked K steps (:func:`_int_segment`) and then scaled into the fp32 accumulator.

    SWAP computes ``y.T`` (``[BN, BM]`` accumulator): the weight tile is the MMA's M side (64-row
    warp-group MMA on Hopper, which may take that operand from registers after unpacking) and the
    few activation rows the narrow N side, for decode. Grid: (row x column tiles, K splits);
    with USE_WORKSPACE each split stores fp32 partials ``[splits, M, N]`` for
    :func:`splitk_reduce_kernel`, which adds the bias."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
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
    za = tl.load(za_ptr + offs_m, mask=mask_m, other=0)
    if SCALE_MODE == 2:
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        seg_lo = pid_k * SEGS_PER_SPLIT
        seg_hi = tl.minimum(NSEG, seg_lo + SEGS_PER_SPLIT)
        for g in range(seg_lo, seg_hi):
            kb = g * SEG
            iacc, xs = _int_segment(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, kb, tl.minimum(K, kb + SEG),
                                    stride_xm, stride_wn, PACKED, NEED_XSUM, SWAP, BM, BN, BK)
            zc = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0) - ZERO_OFFSET
            wsum = tl.load(ws_ptr + offs_n * stride_wsn + g, mask=mask_n, other=0)
            if NEED_XSUM:
                iacc -= _along_n(zc, SWAP) * _along_m(xs, SWAP)
            iacc -= _along_m(za, SWAP) * _along_n(wsum - SEG * zc, SWAP)
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)
            acc += iacc.to(tl.float32) * _along_n(s, SWAP)
    elif SCALE_MODE == 1:
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        gs = K // NSEG
        k_start = pid_k * SEG
        k_end = tl.minimum(K, k_start + SEG)
        for kt in range(0, tl.cdiv(k_end - k_start, BK)):
            k0 = k_start + kt * BK
            d, xs = _int_step(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, k0, stride_xm, stride_wn,
                              PACKED, NEED_XSUM, SWAP, BM, BN, BK)
            g = k0 // gs
            zc = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0) - ZERO_OFFSET
            if NEED_XSUM:
                d -= _along_n(zc, SWAP) * _along_m(xs, SWAP)
            za_first = tl.where(k0 % gs == 0, za, 0)  # the step that starts group g
            wsum = tl.load(ws_ptr + offs_n * stride_wsn + g, mask=mask_n, other=0)
            d -= _along_m(za_first, SWAP) * _along_n(wsum - gs * zc, SWAP)
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)
            acc += d.to(tl.float32) * _along_n(s, SWAP)
    else:
        # per channel: this split's K chunk in a single int32 accumulator
        kb = pid_k * SEG
        iacc, xs = _int_segment(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, kb, tl.minimum(K, kb + SEG),
                                stride_xm, stride_wn, PACKED, NEED_XSUM, SWAP, BM, BN, BK)
        zc = tl.load(z_ptr + offs_n * stride_zn, mask=mask_n, other=0) - ZERO_OFFSET
        if NEED_XSUM:
            iacc -= _along_n(zc, SWAP) * _along_m(xs, SWAP)
        if pid_k == 0:  # the za term once: by the split holding column 0
            wsum = tl.load(ws_ptr + offs_n * stride_wsn, mask=mask_n, other=0)
            iacc -= _along_m(za, SWAP) * _along_n(wsum - K * zc, SWAP)
        acc = iacc.to(tl.float32) * _along_n(tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0), SWAP)
    acc = acc * _along_m(tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0), SWAP)

    mask_y = _along_m(mask_m, SWAP) & _along_n(mask_n, SWAP)
    if not USE_WORKSPACE:
        if HAS_BIAS:
            acc += _along_n(tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), SWAP)
        yp = y_ptr + _along_m(offs_m, SWAP) * stride_ym + _along_n(offs_n, SWAP)
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        ws = y_ptr + pid_k * M * N
        tl.store(ws + _along_m(offs_m, SWAP) * N + _along_n(offs_n, SWAP), acc, mask=mask_y)


@triton.jit
def _round_even(v):
    """Round to nearest, ties to even, of fp32 ``v`` with |v| <= 2**22: adding 1.5 * 2**23 moves
    the value to where the fp32 spacing is 1, so the addition itself rounds (IEEE, ties to even)
    and the subtraction is exact. Two additions: no multiply the compiler could fuse into them."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def quantize_act_kernel(x_ptr, xq_ptr, s_ptr, z_ptr, ss_ptr, sz_ptr, K, stride_xm,
                        STATIC: tl.constexpr, BLOCK: tl.constexpr):
    """One activation row per program: int8 codes bit-exact with
    :func:`fxkernels.reference.quantize_act`.

    Dynamic (per token): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = (hi - lo) / 255``
    (1 where that is 0), ``z = clamp(rint(-128 - lo / s), -128, 127)``. Static: ``s``, ``z``
    from ``ss``/``sz`` (``[1]``). Then ``xq = clamp(rint(x * (1/s)) + z, -128, 127)``, with
    ``1/s`` rounded to fp32 first. Divisions are ``div_rn`` (IEEE, correctly rounded; Triton's
    ``/`` on fp32 is an approximate division on NVIDIA GPUs). ``x * (1/s)`` is clamped to
    +-512 before rounding: that keeps the rounding trick in range, and separates the multiply
    from the addition so that no FMA forms (a fused multiply-add rounds once, the reference twice);
    the final clamp makes the result the same as without it."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    xrow = x_ptr + row * stride_xm
    if STATIC:
        s = tl.load(ss_ptr)
        z = tl.load(sz_ptr)
    else:
        lo = tl.zeros((BLOCK,), dtype=tl.float32)
        hi = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            v = tl.load(xrow + k0 + offs, mask=m, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, v)
            hi = tl.maximum(hi, v)
        lo_r = tl.min(lo, axis=0)
        hi_r = tl.max(hi, axis=0)
        s = tl.math.div_rn(hi_r - lo_r, 255.0)
        s = tl.where(s > 0, s, 1.0)
        zf = _round_even(-128.0 - tl.math.div_rn(lo_r, s))
        z = tl.minimum(tl.maximum(zf, -128.0), 127.0).to(tl.int32)
    inv = tl.math.div_rn(1.0, s)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        v = tl.load(xrow + k0 + offs, mask=m, other=0.0).to(tl.float32) * inv
        v = tl.minimum(tl.maximum(v, -512.0), 512.0)
        q = _round_even(v).to(tl.int32) + z
        q = tl.minimum(tl.maximum(q, -128), 127)
        tl.store(xq_ptr + row * K + k0 + offs, q.to(tl.int8), mask=m)
    tl.store(s_ptr + row, s)
    tl.store(z_ptr + row, z)
