"""The CPU backend (fxkernels/backends/cpu.py + csrc/cpu) against fxkernels.reference.

Integer parts are compared bit for bit; float outputs within bounds derived from the number of
fp32 roundings each kernel performs (qact_linear) or within 2x torch's own fp32 matmul error
against a float64 result (dequant_linear). Every test runs the AVX2 kernels (when the CPU has
them) and the forced scalar fallback.
"""

import pytest
import torch
import torch.nn.functional as F

import fxkernels
from fxkernels import dispatch, ops
from fxkernels import reference as R
from fxkernels.format import QuantSpec, pack

cpu = pytest.importorskip("fxkernels.backends.cpu", reason="fxkernels._C CPU extension not built")

# "auto" is AVX-512 VNNI (with AMX tiles for INT4 at 8+ rows) where the CPU has it, so "avx2" keeps
# the plain AVX2 kernels tested too
ISAS = ["auto", "avx2", "scalar"]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(params=ISAS)
def isa(request):
    with cpu.isa(request.param):
        if request.param == "scalar":
            assert cpu.active_isa() == "scalar"
        yield request.param


def make_weight(n, k, bits, groups, gen, zero_mode="random"):
    q = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    qw = pack(q, QuantSpec(bits=bits, granularity="channel"))
    scale = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    if zero_mode == "random":
        zero = torch.randint(0, 2 ** bits, (n, groups), generator=gen, dtype=torch.int32)
    else:
        zero = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.int32)
    return qw, scale, zero


# (M, N, K, G): odd M; N not a multiple of 8; K not a multiple of 8/32 (padded for G == 1);
# group sizes aligned to the AVX2 steps (32, 24, 8) and not (6 -> scalar path inside the backend).
SHAPES = [
    (1, 16, 64, 1),
    (1, 13, 34, 1),
    (3, 40, 96, 3),
    (17, 9, 256, 4),
    (3, 24, 48, 2),
    (2, 8, 12, 2),
    (17, 31, 130, 1),
    (5, 7, 2, 1),
]


# -- quantize_act ------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k", [(1, 1), (1, 4096), (3, 33), (17, 100), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_act_dynamic_bit_exact(isa, m, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 5).to(dtype)
    if m > 1:
        x[1] = x[1].abs() + 0.1  # all-positive row: lo clamps to 0
        if m > 2:
            x[2] = 0  # all-zero row: scale falls back to 1
    with fxkernels.use_backend("cpu"):
        xq, sa, za = ops.quantize_act(x, None, None)
    rq, rs, rz = R.quantize_act(x)
    assert torch.equal(sa, rs) and torch.equal(za, rz)
    assert torch.equal(xq, rq), f"{int((xq != rq).sum())} codes differ"


def test_quantize_act_static_ties_and_clamping(isa):
    # scale 2**-3: x * (1/scale) is exact, so x = (j + 0.5) / 8 lands exactly on a tie and
    # must round half to even; values beyond the grid must clamp to -128 / 127.
    scale = torch.tensor([0.125])
    zero = torch.tensor([3], dtype=torch.int32)
    j = torch.arange(-300, 300, dtype=torch.float32)
    x = torch.cat([(j + 0.5) / 8, j / 8, (j + 0.25) / 8]).reshape(3, -1)
    with fxkernels.use_backend("cpu"):
        xq, sa, za = ops.quantize_act(x, scale, zero)
    rq, rs, rz = R.quantize_act(x, scale, zero)
    assert torch.equal(xq, rq) and torch.equal(sa, rs) and torch.equal(za, rz)
    assert int(xq.min()) == -128 and int(xq.max()) == 127
    # spot-check the tie rule itself, independent of the reference: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    half = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5]]) / 8
    with fxkernels.use_backend("cpu"):
        hq, _, _ = ops.quantize_act(half, scale, torch.tensor([0], dtype=torch.int32))
    assert hq.tolist() == [[0, 2, 2, 0, -2]]


def check_unit_scale_integer_exact(bits, m, n, k, g, seed):
    """Unit scales, random asymmetric zeros and activations: the cpu backend's qact_linear must
    equal the reference bit for bit (integer sums < 2**24 are exact in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    qw, _, zero = make_weight(n, k, bits, g, gen)
    scale = torch.ones(n, g)
    xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    za = torch.randint(-128, 128, (m,), generator=gen, dtype=torch.int32)
    sa = torch.ones(m)
    ws = R.weight_sums(qw, bits, k, g)
    with fxkernels.use_backend("cpu"):
        y = ops.qact_linear(xq, sa, za, qw, scale, zero, ws, None, bits, torch.float32)
    ref = R.qact_linear(xq, sa, za, qw, scale, zero, ws, None, bits, torch.float32)
    assert torch.equal(y, ref), f"max diff {(y - ref).abs().max().item()}"


# -- qact_linear: the integer part is exact -------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_qact_linear_integer_exact(isa, bits, m, n, k, g):
    """With every scale 1 the output is the exact integer sum (all |values| < 2**24, so fp32
    holds them and the float epilogue adds no rounding): must equal the reference bit for bit."""
    check_unit_scale_integer_exact(bits, m, n, k, g, seed=bits * 7919 + m * 31 + n * 7 + k)


# Shapes for the register-blocked micro-kernels: W8A8 runs 2 tiles (16 output rows) x 6 rows,
# W4A8 4 rows (and a 2-tile GEMV at M = 1), so these cover full blocks plus every remainder:
# M % 6 in 1..5, an odd tile count (N = 51, 7 tiles), K not a multiple of 8/32/64, groups of
# 24/40 columns, per-channel, and an activation block boundary (M = 200 with K = 2048).
BLOCK_SHAPES = [
    (1, 51, 130, 1),
    (3, 51, 96, 4),
    (13, 24, 200, 5),
    (37, 51, 130, 1),
    (37, 17, 240, 6),
    (40, 72, 64, 1),
    (200, 24, 2048, 16),
]


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("m,n,k,g", BLOCK_SHAPES)
def test_qact_linear_blocked_integer_exact(isa, bits, m, n, k, g):
    """Unit scales, random asymmetric zeros and activations: every block shape and remainder
    of the AVX2 micro-kernels equals the reference bit for bit."""
    check_unit_scale_integer_exact(bits, m, n, k, g, seed=bits * 101 + m * 13 + n * 5 + k + g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k,g", BLOCK_SHAPES[:5])
def test_qact_linear_blocked_real_scales_match_reference(isa, bits, m, n, k, g):
    """Real scales, bias and symmetric zeros, through quantize_act: the kernel performs the
    same fp32 operations per group as the reference's order, so results agree to a few ulps."""
    gen = torch.Generator().manual_seed(bits * 7 + m + n + k)
    qw, scale, zero = make_weight(n, k, bits, g, gen, zero_mode="sym")
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ws = R.weight_sums(qw, bits, k, g)
    with fxkernels.use_backend("cpu"):
        xq, sa, za = ops.quantize_act(x, None, None)
        y = ops.qact_linear(xq, sa, za, qw, scale, zero, ws, bias, bits, torch.float32)
    ref = R.qact_linear(xq, sa, za, qw, scale, zero, ws, bias, bits, torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,k", [(4, 4096), (8, 256)])
def test_qact_linear_extreme_codes_no_saturation(isa, bits, k):
    """Largest products the formats allow: xq = -128 with za = 127 and codes at the far end
    from their zero. INT4 stresses the int16 partial sums of vpmaddubsw (8 x 3840 per flush),
    INT8 the vpmaddwd pairs; the result (< 2**24) must be exact."""
    n, m = 16, 2
    qmax = 2 ** bits - 1
    qw = pack(torch.full((n, k), qmax), QuantSpec(bits=bits))
    qw_lo = pack(torch.zeros(n, k, dtype=torch.int64), QuantSpec(bits=bits))
    zero_hi = torch.zeros(n, 1, dtype=torch.int32)
    zero_lo = torch.full((n, 1), qmax, dtype=torch.int32)
    xq = torch.full((m, k), -128, dtype=torch.int8)
    za = torch.full((m,), 127, dtype=torch.int32)
    sa, scale = torch.ones(m), torch.ones(n, 1)
    for w, z in ((qw, zero_hi), (qw_lo, zero_lo)):
        ws = R.weight_sums(w, bits, k, 1)
        with fxkernels.use_backend("cpu"):
            y = ops.qact_linear(xq, sa, za, w, scale, z, ws, None, bits, torch.float32)
        ref = R.qact_linear(xq, sa, za, w, scale, z, ws, None, bits, torch.float32)
        assert torch.equal(y, ref)
        assert abs(float(ref[0, 0])) == 255 * qmax * k


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k,g", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_qact_linear_float_epilogue(isa, bits, m, n, k, g, out_dtype):
    """Real scales and bias: the kernel does one rounding per group converting the exact
    integer, one per scale multiply-add and one for the final rescale + bias, so it is within
    (G + 3) fp32 eps of the summed magnitudes of the reference (computed in float64)."""
    gen = torch.Generator().manual_seed(bits * 13 + m * 5 + n * 3 + k)
    qw, scale, zero = make_weight(n, k, bits, g, gen)
    x = torch.randn(m, k, generator=gen)
    xq, sa, za = R.quantize_act(x)
    ws = R.weight_sums(qw, bits, k, g)
    bias = torch.randn(n, generator=gen)
    with fxkernels.use_backend("cpu"):
        y = ops.qact_linear(xq, sa, za, qw, scale, zero, ws, bias, bits, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    # float64 ground truth and the magnitude the roundings scale with
    c = R.stored_codes(qw, bits, k).double()
    zc = (zero - R.storage_offset(bits)).double().repeat_interleave(k // g, dim=1)
    xc = xq.double() - za.double()[:, None]
    per_group = torch.einsum("mgk,ngk->mng", xc.reshape(m, g, -1), (c - zc).reshape(n, g, -1))
    terms = per_group * scale.double()[None] * sa.double()[:, None, None]
    exact = terms.sum(-1) + bias.double()
    mag = terms.abs().sum(-1) + bias.double().abs()
    tol = (g + 3) * EPS32 * mag
    if out_dtype != torch.float32:
        tol = tol + torch.finfo(out_dtype).eps * exact.abs()
    err = (y.double() - exact).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol).max().item():.2f}"


# -- dequant_linear: within 2x torch's own fp32 matmul error -----------------------------------
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("m,n,k,g", SHAPES + [(1, 64, 1024, 8), (8, 33, 512, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_linear_accuracy(isa, bits, m, n, k, g, dtype):
    gen = torch.Generator().manual_seed(bits * 3 + m * 17 + n * 11 + k)
    qw, scale, zero = make_weight(n, k, bits, g, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    with fxkernels.use_backend("cpu"):
        y = ops.dequant_linear(x, qw, scale, zero, bias, bits, k)
    assert y.dtype == dtype and y.shape == (m, n)
    w = R.dequant_weight(qw, scale, zero, bits, k)  # exact fp32 weight
    exact = x.double() @ w.double().t() + bias.double()
    torch_err = (F.linear(x.float(), w, bias).double() - exact).abs().max().item()
    floor = EPS32 * ((x.double().abs() @ w.double().abs().t()) + bias.double().abs()).max().item()
    tol = 2 * max(torch_err, floor)
    err = (y.double() - exact).abs()
    if dtype != torch.float32:  # both outputs end with one rounding to the narrow type
        err = err - torch.finfo(dtype).eps * exact.abs()
    assert err.max().item() <= tol, f"err {err.max().item():.3g} > tol {tol:.3g}"


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("n,k,g", [(51, 130, 1), (51, 96, 4), (24, 200, 5), (17, 240, 6), (9, 12, 2),
                                   (33, 4096, 1), (40, 4096, 32)])
def test_dequant_linear_gemv_accuracy(isa, bits, n, k, g):
    """M = 1 runs its own AVX2 kernel (two tiles, zero point folded out of the loop for nibble
    codes): odd tile counts, group sizes leaving a 2-column tail, long rows; same bound as above."""
    check_gemv_accuracy(bits, n, k, g, seed=bits * 5 + n * 3 + k + g)


def check_gemv_accuracy(bits, n, k, g, seed):
    gen = torch.Generator().manual_seed(seed)
    qw, scale, zero = make_weight(n, k, bits, g, gen)
    x = torch.randn(1, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    with fxkernels.use_backend("cpu"):
        y = ops.dequant_linear(x, qw, scale, zero, bias, bits, k)
    assert_within_2x_torch_error(y, x, R.dequant_weight(qw, scale, zero, bits, k), bias)


def assert_within_2x_torch_error(y, x, w, bias):
    """fp32 ``y ~ x @ w.T + bias`` no further from the float64 product than twice torch's own fp32
    matmul (or twice one rounding of the magnitudes, where torch happens to be exact)."""
    exact = x.double() @ w.double().t() + bias.double()
    torch_err = (F.linear(x, w, bias).double() - exact).abs().max().item()
    floor = EPS32 * ((x.double().abs() @ w.double().abs().t()) + bias.double().abs()).max().item()
    err = (y.double() - exact).abs().max().item()
    assert err <= 2 * max(torch_err, floor), f"err {err:.3g} > tol {2 * max(torch_err, floor):.3g}"


def test_large_weights_repacked_into_huge_pages_stay_exact(isa):
    """Repacked weights of >= 4 MiB are copied into 2 MiB huge-page mappings (Linux THP): the
    copy must hold the same bytes and live as long as the cache entry that owns it."""
    from fxkernels import _C

    check_unit_scale_integer_exact(4, 3, 1024, 8192, 1, seed=7)  # 4 MiB of nibble codes
    check_gemv_accuracy(8, 520, 8192, 2, seed=8)                   # 4.1 MiB of int8 codes
    buf = _C.huge_page_buffer((5 << 20) + 3)
    assert buf.dtype == torch.uint8 and buf.numel() == (5 << 20) + 3 and bool((buf[::4093] == 1).all())
    with pytest.raises(RuntimeError, match="nbytes=0"):
        _C.huge_page_buffer(0)


@pytest.mark.parametrize("k,g", [(33, 1), (35, 5)])
def test_odd_in_features_nibbles(isa, k, g):
    """Kernel-level arguments allow an odd K for nibble codes (the last byte holds one code)."""
    gen = torch.Generator().manual_seed(k)
    qw, scale, zero = make_weight(12, k + 1, 4, g, gen)
    x = torch.randn(3, k, generator=gen)
    with fxkernels.use_backend("cpu"):
        y = ops.dequant_linear(x, qw, scale, zero, None, 4, k)
        xq, sa, za = ops.quantize_act(x, None, None)
        ws = R.weight_sums(qw, 4, k, g)
        yq = ops.qact_linear(xq, torch.ones(3), za, qw, torch.ones_like(scale), zero, ws, None, 4, torch.float32)
    torch.testing.assert_close(y, R.dequant_linear(x, qw, scale, zero, None, 4, k), rtol=1e-5, atol=1e-5)
    ref = R.qact_linear(xq, torch.ones(3), za, qw, torch.ones_like(scale), zero, ws, None, 4, torch.float32)
    assert torch.equal(yq, ref)


def test_dequant_linear_matches_reference_backend_on_quantlinear(isa):
    """The whole QuantLinear path (W4 g32 asym, weight-only and W4A8 dynamic) on both backends."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(3, 5, 96)
    for spec in (QuantSpec(bits=4, granularity="group", group_size=32),
                 QuantSpec(bits=4, granularity="group", group_size=32, act_bits=8)):
        layer = fxkernels.QuantLinear.from_linear(lin, spec)
        with fxkernels.use_backend("cpu"):
            y = layer(x)
        with fxkernels.use_backend("reference"):
            ref = layer(x)
        assert y.shape == (3, 5, 40)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# -- dispatch, caching and refusals --------------------------------------------------------------
class _Spy:
    """Stands in for fxkernels._C inside the backend module and counts what is called."""

    def __init__(self, real):
        self._real, self.calls = real, {}

    def __getattr__(self, name):
        fn = getattr(self._real, name)

        def wrapped(*a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **kw)

        return wrapped


def test_use_backend_cpu_runs_the_extension(monkeypatch):
    spy = _Spy(cpu._C)
    monkeypatch.setattr(cpu, "_C", spy)
    gen = torch.Generator().manual_seed(1)
    qw, scale, zero = make_weight(24, 64, 4, 2, gen)
    ws = R.weight_sums(qw, 4, 64, 2)
    x = torch.randn(2, 64, generator=gen)
    with fxkernels.use_backend("cpu"):
        assert dispatch.select("dequant_linear", x, qw, scale, zero, None, 4, 64).name == "cpu_dequant_linear"
        ops.dequant_linear(x, qw, scale, zero, None, 4, 64)
        ops.dequant_linear(x, qw, scale, zero, None, 4, 64)
        xq, sa, za = ops.quantize_act(x, None, None)
        ops.qact_linear(xq, sa, za, qw, scale, zero, ws, None, 4, torch.float32)
        ops.qact_linear(xq, sa, za, qw, scale, zero, ws, None, 4, torch.float32)
    assert spy.calls["dequant_linear"] == 2 and spy.calls["qact_linear"] == 2
    assert spy.calls["quantize_act"] == 1
    # the repack happens once per weight, not per call (with VNNI the weight-only layer takes the
    # integer-activation layout too, for its limb path)
    repacks = lambda: spy.calls.get("repack_dequant", 0) + spy.calls.get("repack_qact", 0)  # noqa: E731
    assert repacks() == 2
    # an in-place write to the weight invalidates the repack, and the new weight is used
    qw.bitwise_xor_(0x11)
    with fxkernels.use_backend("cpu"):
        y = ops.dequant_linear(x, qw, scale, zero, None, 4, 64)
    assert repacks() == 3
    torch.testing.assert_close(y, R.dequant_linear(x, qw, scale, zero, None, 4, 64), rtol=1e-5, atol=1e-5)


def test_refusals_name_the_reason():
    ok, why = cpu._qa_can(torch.zeros(1, 8, dtype=torch.int8, device="meta"), None, None, None,
                          torch.ones(8, 1), None, None, None, 8, torch.float32)
    assert not ok and "meta" in why and "CPU" in why
    k = cpu.MAX_GROUP_COLUMNS * 2
    xq = torch.zeros(1, k, dtype=torch.int8)
    qw = torch.zeros(8, k, dtype=torch.int8)
    scale, zero = torch.ones(8, 1), torch.full((8, 1), 128, dtype=torch.int32)
    ws = torch.zeros(8, 1, dtype=torch.int32)
    args = (xq, torch.ones(1), torch.zeros(1, dtype=torch.int32), qw, scale, zero, ws, None, 8, torch.float32)
    ok, why = cpu._qa_can(*args)
    assert not ok and str(k) in why and str(cpu.MAX_GROUP_COLUMNS) in why
    with fxkernels.use_backend("cpu"), pytest.raises(RuntimeError, match="columns per group"):
        ops.qact_linear(*args)
    with pytest.raises(ValueError, match="isa"):
        cpu.set_isa("avx512")


def test_backend_reports_status():
    rows = [r for r in fxkernels.available_kernels() if r["backend"] == "cpu"]
    assert {r["name"] for r in rows} >= {"cpu_dequant_linear", "cpu_quantize_act", "cpu_qact_linear"}
    assert all(r["usable"] for r in rows)


def test_opcheck_with_cpu_backend():
    gen = torch.Generator().manual_seed(2)
    qw, scale, zero = make_weight(16, 32, 4, 1, gen)
    ws = R.weight_sums(qw, 4, 32, 1)
    x = torch.randn(3, 32, generator=gen)
    xq, sa, za = R.quantize_act(x)
    bias = torch.randn(16, generator=gen)
    with fxkernels.use_backend("cpu"):
        torch.library.opcheck(torch.ops.fxk.dequant_linear.default, (x, qw, scale, zero, bias, 4, 32))
        torch.library.opcheck(torch.ops.fxk.quantize_act.default, (x, None, None))
        torch.library.opcheck(torch.ops.fxk.qact_linear.default,
                              (xq, sa, za, qw, scale, zero, ws, bias, 4, torch.float32))


# Longer K: activation rows at padded strides (K = 2048 and 4096 pad to an odd number of 64-byte
# lines, 3000 and 4160 do not need to), groups of 260 and 320 columns, several 12-row blocks, two
# row blocks of the cache blocking (M = 70 at K = 2600), odd tile counts.
LONG_K = [(29, 40, 3000, 1), (70, 24, 2600, 10), (13, 33, 4160, 13), (2, 16, 2048, 1), (19, 24, 4096, 2)]


@pytest.mark.parametrize("m,n,k,g", LONG_K)
def test_long_k_in_chunks_integer_exact(isa, m, n, k, g):
    # INT4 only: with unit scales, INT8 sums over these K pass 2**24 and the float group sums
    # round (in the reference too); W8A8 at these K is checked against the AVX2 kernels below.
    check_unit_scale_integer_exact(4, m, n, k, g, seed=m * 31 + n * 7 + k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m, n, k, g", [(1, 1000, 4096, 1), (7, 1536, 576, 1), (17, 576, 1536, 12),
                                        (13, 24, 256, 2), (33, 40, 260, 1), (5, 32, 258, 1), (100, 72, 512, 1),
                                        (20, 60, 192, 3), (2, 30, 64, 1)]
                         + LONG_K)
def test_vnni_path_is_bit_identical_to_avx2(bits, m, n, k, g):
    """The AVX-512 VNNI kernels (vpdpbusd; W8A8 with the +128 activation offset; 512-bit tile
    pairs from 2 rows) against the plain AVX2 ones: the same exact int32 sums, so the same floats,
    on tile pairs, a pair whose second tile ends past N (N = 60, 30), odd tiles, full and partial
    16-row blocks, padded K and grouped scales."""
    import fxkernels._C as C
    feats = C.cpu_features()
    if not all(feats.get(f) for f in ("avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512vnni")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    gen = torch.Generator().manual_seed(m * 1000 + k)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
    spec = QuantSpec(bits=bits, granularity="group" if g > 1 else "channel", group_size=k // g if g > 1 else None,
                     act_bits=8, act_mode="dynamic")
    layer = fxkernels.QuantLinear.from_linear(lin, spec)
    x = torch.randn(m, k, generator=gen) * 3
    with cpu.isa("avx2"):
        ref = layer(x)
    with cpu.isa("avx512vnni"):
        assert cpu.active_isa() == "avx512vnni"
        out = layer(x)
    assert torch.equal(out, ref)


def _amx_usable():
    from fxkernels import _C

    return bool(_C.cpu_features().get("amx_int8"))


# rows: under, at and over the AMX threshold (8), a partial 16-row tile, one pass of five tiles (80)
# and a second pass; N: tile pairs (where the tile kernel also sums a weight-only row's limbs) and an
# odd last 8-row tile (where limb_linear sums them); groups of 64, 128 and 192 columns, and K that is
# not a multiple of 64 per group (that layer stays on VNNI); N = 40000 splits the limb rows in chunks.
AMX_CASES = [(8, 32, 128, 1), (32, 1536, 576, 1), (32, 576, 1536, 12), (9, 40, 256, 2), (100, 72, 512, 1),
             (81, 24, 640, 5), (17, 33, 192, 1), (33, 1000, 4096, 32), (12, 24, 200, 1), (4, 48, 576, 1),
             (30, 40000, 64, 1), (3, 64, 192, 1)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k,g", AMX_CASES)
def test_amx_path_is_bit_identical_to_vnni(m, n, k, g, bits):
    """INT4/INT8 on AMX tiles against the vpdpbusd kernel: the same exact int32 sums and the same
    epilogue, so the same floats, for W4A8/W8A8 and for the weight-only layers' int8 limbs."""
    if not _amx_usable():
        pytest.skip("this CPU (or OS) offers no AMX-INT8 tiles")
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen) * 3
    grouping = dict(granularity="group", group_size=k // g) if g > 1 else dict(granularity="channel")
    for act in (dict(act_bits=8, act_mode="dynamic"), {}):
        layer = fxkernels.QuantLinear.from_linear(lin, QuantSpec(bits=bits, **grouping, **act))
        with cpu.isa("avx512vnni"):
            ref = layer(x)
        with cpu.isa("avx512amx"):
            assert cpu.active_isa() == "avx512amx"
            out = layer(x)
        assert torch.equal(out, ref), (act, (out - ref).abs().max())


def test_amx_isa_refused_where_absent():
    if _amx_usable():
        with cpu.isa("avx512amx"):
            assert cpu.active_isa() == "avx512amx"
        with cpu.isa("avx512vnni"):
            assert cpu.active_isa() == "avx512vnni"
    else:
        with pytest.raises(RuntimeError, match="avx512amx"):
            cpu.set_isa("avx512amx")


# -- weight-only on integer units: fp32 activations split into int8 limbs --------------------------
def limb_outputs_same_on_avx2_and_vnni(x, qw, scale, zero, packed, bias, bits, k):
    """The limb layout's outputs on the AVX2 kernels, checked equal to the VNNI kernels' where they run."""
    from fxkernels import _C

    with cpu.isa("avx2"):
        y = _C.dequant_linear(x, qw, scale, zero, packed, bias, bits, k)
    if _vnni_isas():
        with cpu.isa("avx512vnni"):
            assert torch.equal(_C.dequant_linear(x, qw, scale, zero, packed, bias, bits, k), y)
    return y


def limb_case(bits, m, n, k, g, seed):
    gen = torch.Generator().manual_seed(seed)
    qw, scale, zero = make_weight(n, k, bits, g, gen)
    packed = cpu._limb_layout(qw, scale, zero, bits, k)
    assert len(packed) == 6 and packed[5] is cpu._DIGIT_TENSORS[cpu.activation_digits_in_use()]
    return gen, qw, scale, zero, packed


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m,n,k,g", [(1, 40, 256, 1), (1, 1000, 576, 1), (3, 17, 96, 3), (17, 33, 130, 1),
                                     (5, 24, 512, 8), (30, 40000, 64, 1), (9, 48, 256, 4), (2, 30, 64, 1)])
def test_limb_path_same_on_avx2_and_vnni_and_accurate(bits, m, n, k, g):
    """The limb layout gives the same floats on the AVX2 and the VNNI integer kernels (exact int32
    sums, then the same fp32 epilogue; with an even tile count the 512-bit VNNI kernels sum the
    limbs as they store), and is within the dequant_linear bound of the tests above."""

    _, qw, scale, zero, packed = limb_case(bits, m, n, k, g, seed=bits * 7 + m * 3 + n + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    y = limb_outputs_same_on_avx2_and_vnni(x, qw, scale, zero, packed, bias, bits, k)
    assert_within_2x_torch_error(y, x, R.dequant_weight(qw, scale, zero, bits, k), bias)


# M >= 8 rows with >= 4 tiles: the INT4 512-bit kernel's two-pairs-per-broadcast loop (8-row halves)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k,g", [(8, 64, 128, 1), (20, 60, 192, 3), (9, 48, 256, 4), (1, 40, 256, 1),
                                     (13, 72, 96, 1)])
def test_two_activation_digits_within_their_rounding_bound(bits, m, n, k, g):
    """With set_activation_digits(2) each row is rounded to a fixed point of 2^(8*2-2) steps of its
    largest |x| (half a step per value at most): the product stays within that rounding, carried
    through the |weights|, plus fp32 epilogue rounding; AVX2 and VNNI give the same floats; the
    layout holds the digit count."""

    with cpu.activation_digits(2):
        _, qw, scale, zero, packed = limb_case(bits, m, n, k, g, seed=bits * 5 + m + n + k)
    assert int(packed[5]) == 2 and cpu.activation_digits_in_use() == cpu.DEFAULT_ACTIVATION_DIGITS
    gen = torch.Generator().manual_seed(k + 1)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, 1] = 40.0  # an outlier: the row's fixed point is scaled to it
    bias = torch.randn(n, generator=gen)
    y = limb_outputs_same_on_avx2_and_vnni(x, qw, scale, zero, packed, bias, bits, k)
    w = R.dequant_weight(qw, scale, zero, bits, k).double()
    exact = x.double() @ w.t() + bias.double()
    amax = x.double().abs().amax(dim=1, keepdim=True)
    rounding = amax * 2.0 ** (2 - 8 * 2) * w.abs().sum(dim=1)[None]  # half of a step 2^(3 - 8L) amax
    epilogue = 4 * EPS32 * ((x.double().abs() @ w.abs().t()) + bias.double().abs())
    err = (y.double() - exact).abs()
    assert bool((err <= rounding + epilogue).all()), (err - rounding - epilogue).max()
    assert err.max() > EPS32 * 1e3 * exact.abs().max()  # coarser than 4 digits: the setting took effect


def _digits_layout(packed, digits):
    return list(packed[:5]) + [cpu._DIGIT_TENSORS[digits]]


# K = 8192 (> 4096): rows with one dominant value round coarser than bf16 on 2 digits; N = 40 is an
# odd tile count (the kernels then store each digit row, summed afterwards), N = 96 an even one
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,g", [(1, 40, 1), (3, 96, 1), (8, 96, 4), (13, 40, 1), (24, 96, 1)])
def test_auto_digits_give_each_row_two_or_four_and_bf16_bound(bits, m, n, g):
    """Under "auto" a row is computed on 2 digits unless their rounding exceeds bf16's bound for
    it (||e||_2 > 2^-8 ||x||_2), then on 4: each row equals the fixed setting it falls under, alone
    or batched with any rows, on the AVX2 and the VNNI kernels alike, and the product stays within
    ||w_n||_2 2^-8 ||x_m||_2 of the exact one (plus the fp32 epilogue)."""
    k = 8192
    _, qw, scale, zero, packed = limb_case(bits, m, n, k, g, seed=bits + m + n)
    gen = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=gen)
    wide = torch.arange(m) % 3 == 0
    x[wide] *= 1e-3
    x[wide, 5] = 2252.0  # 2^11 * 1.1: scaled into [2^13, 2^14) its square is below k * 2^14
    bias = torch.randn(n, generator=gen)
    y = {d: limb_outputs_same_on_avx2_and_vnni(x, qw, scale, zero, _digits_layout(packed, d), bias, bits, k)
         for d in (2, 4, "auto")}
    for i in range(m):
        assert torch.equal(y["auto"][i], y[4][i] if wide[i] else y[2][i]), i
        alone = limb_outputs_same_on_avx2_and_vnni(x[i:i + 1], qw, scale, zero, _digits_layout(packed, "auto"),
                                                   bias, bits, k)
        assert torch.equal(alone[0], y["auto"][i]), i
    assert bool(wide.any()) and not torch.equal(y[2][wide], y[4][wide])  # the wide rows' settings differ
    w = R.dequant_weight(qw, scale, zero, bits, k).double()
    exact = x.double() @ w.t() + bias.double()
    bf16_bound = 2.0 ** -8 * x.double().norm(dim=1, keepdim=True) * w.norm(dim=1)[None]
    epilogue = 4 * EPS32 * ((x.double().abs() @ w.abs().t()) + bias.double().abs())
    assert bool(((y["auto"].double() - exact).abs() <= bf16_bound + epilogue).all())


def test_activation_digits_setting_is_checked_and_keyed_in_eager_plans():
    for bad in (3, 5, 0, "2", "Auto", True, 2.0):
        with pytest.raises(ValueError, match=rf"n={bad!r}; expected one of \(2, 4, 'auto'\)"):
            cpu.set_activation_digits(bad)
    assert [cpu.activation_digits_from_text(t) for t in ("2", "4", "auto")] == [2, 4, "auto"]
    with pytest.raises(ValueError, match="--activation-digits: '3'; expected one of 2, 4, auto"):
        cpu.activation_digits_from_text("3")
    assert cpu.activation_digits_in_use() == cpu.DEFAULT_ACTIVATION_DIGITS
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(256, 64)
    layer = fxkernels.QuantLinear.from_linear(lin, QuantSpec(4, "channel"))
    x = torch.randn(8, 256, generator=gen)
    with torch.no_grad():
        four = layer(x)
        with cpu.activation_digits(2):
            two = layer(x)
        again = layer(x)
    assert torch.equal(four, again)
    if cpu.active_isa() in cpu.LIMB_ISAS:  # elsewhere weight-only layers do not split activations
        assert not torch.equal(two, four)
        torch.testing.assert_close(two, four, rtol=1e-3, atol=1e-3)
    else:
        assert torch.equal(two, four)


def _vnni_isas():
    from fxkernels import _C

    feats = _C.cpu_features()
    return ("avx512vnni",) if all(feats.get(f) for f in ("avx512f", "avx512vl", "avx512vnni")) else ()


@pytest.mark.parametrize("limb_isa", ["avx2", "auto"])
def test_limb_path_rows_with_outliers_tiny_values_and_non_finite(limb_isa):
    """Each row gets its own fixed point: a 1000x outlier, a row of 1e-30 values (too small for the
    digit scale factors: computed by the float loop), an all-zero row and rows holding Inf or NaN
    (which must come out non-finite where the float product is) next to ordinary rows."""
    from fxkernels import _C

    n, k = 24, 200
    gen, qw, scale, zero, packed = limb_case(4, 6, n, k, 1, seed=11)
    x = torch.randn(6, k, generator=gen)
    x[0, 5] = 1000.0
    x[1] = x[1] * 1e-30
    x[2] = 0.0
    x[3, 7] = float("inf")
    x[4, 9] = float("nan")
    bias = torch.randn(n, generator=gen)
    with cpu.isa(limb_isa):
        y = _C.dequant_linear(x, qw, scale, zero, packed, bias, 4, k)
    w = R.dequant_weight(qw, scale, zero, 4, k)
    want = F.linear(x, w, bias)
    assert torch.equal(torch.isfinite(y), torch.isfinite(want))
    assert torch.isnan(y[4]).all()
    ok = torch.tensor([0, 1, 2, 5])
    assert_within_2x_torch_error(y[ok], x[ok], w, bias)
    assert torch.equal(y[2], bias)  # a zero row: exactly the bias


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("m,n,k,g", [(256, 40, 96, 3), (300, 600, 130, 1), (128, 9, 48, 2), (129, 17, 70, 10)])
def test_long_inputs_dequantize_for_sgemm(isa, bits, m, n, k, g):
    """From 128 rows on, the vector ISAs dequantize blocks of the weight exactly and multiply them
    with torch's sgemm, except where the limb layout runs on 512-bit VNNI kernels without AMX (the
    scalar ISA keeps its own loop): K not a multiple of 8, odd group sizes, 2- to 8-bit codes."""
    gen = torch.Generator().manual_seed(bits * 31 + m + n + k)
    qw, scale, zero = make_weight(n, k, bits, g, gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    with fxkernels.use_backend("cpu"):
        y = ops.dequant_linear(x, qw, scale, zero, bias, bits, k)
    assert_within_2x_torch_error(y, x, R.dequant_weight(qw, scale, zero, bits, k), bias)


def test_long_inputs_span_several_weight_blocks():
    """A weight of more rows than one fp32 block (>= 8 MiB and >= 512 rows; here 2 blocks of 1024
    2048-column rows)."""
    gen = torch.Generator().manual_seed(5)
    n, k = 1100, 2048
    qw, scale, zero = make_weight(n, k, 4, 4, gen)
    x = torch.randn(256, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    with fxkernels.use_backend("cpu"):
        y = ops.dequant_linear(x, qw, scale, zero, bias, 4, k)
    assert_within_2x_torch_error(y, x, R.dequant_weight(qw, scale, zero, 4, k), bias)
