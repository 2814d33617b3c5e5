"""The Triton integer-activation kernels (``triton_qact_linear``, ``triton_quantize_act``;
fxkernels/backends/triton_int8.py) against fxkernels.reference in Triton's CPU interpreter, and
compiled without a GPU for sm_80 and sm_90a.

As in tests/test_triton_kernels.py, every kernel run happens in ONE child process with
``TRITON_INTERPRET=1`` set before triton is imported; the tests assert on the JSON it reports.

Tolerance from first principles (:func:`fxkernels.backends.triton_int8.error_bound`): the
integer part is exact (int32 dots and zero-point corrections), so the only errors are fp32
roundings: each chunk of columns summed in int32 (a split's K chunk per channel, one K step for
groups that are a multiple of it, a whole group otherwise) is converted, scaled and accumulated
(3 roundings per chunk), then the activation scale, the bias, the split-K partial sums and the
final rounding to the output dtype. Elementwise, ``|y - exact| <= (3 chunks + splits + 3) *
2**-24 * mag + r(|exact|)`` with ``mag`` the sum of the absolute scaled chunk terms (float64) and
``r`` half an ulp of the output dtype (one ulp for bf16: the interpreter truncates fp32 -> bf16).
With power-of-two scales and small codes every step is exact and the output must equal the
reference bit for bit. Activation codes must equal the reference's bit for bit.

Default run: every M in 1..17, each with one layout (so all layouts are seen), every layout at
M = 1 and M = 17, explicit configurations for split-K, both orientations and several K steps per
group. ``-m slow`` runs every M with every layout and compiles the whole variant matrix.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

if __package__:  # under pytest; the interpreter worker runs this file as a script and needs neither
    from .conftest import SMEM_LIMIT, run_compile_worker, run_interpreter_worker, worker_result

ROOT = Path(__file__).resolve().parents[1]

# (bits, granularity, group size, symmetric, out dtype, K); N = 40 or 33 leaves partial tiles.
LAYOUTS = [
    (8, "channel", None, False, "float32", 200), (8, "group", 32, False, "float16", 192),
    (4, "channel", None, False, "float16", 200), (4, "group", 32, False, "float32", 192),
    (8, "tensor", None, True, "bfloat16", 136), (4, "group", 128, True, "float16", 384),
    (8, "group", 64, True, "float32", 192), (4, "group", 48, False, "float32", 192),   # 48: masked steps
    (4, "group", 40, False, "float16", 200), (8, "group", 16, False, "float32", 96),   # below 32: masked
    (3, "group", 32, False, "float32", 128), (2, "channel", None, False, "float32", 104),
    (6, "group", 32, False, "bfloat16", 128), (8, "channel", None, True, "float16", 99),  # odd K
    (4, "group", 24, False, "float32", 96), (5, "channel", None, False, "float32", 77),
]


def _case_name(m, lay, n):
    bits, gran, gs, sym, dt, k = lay
    return f"M{m}_W{bits}A8_{gran}{gs or ''}_{'sym' if sym else 'asym'}_{dt}_N{n}_K{k}"


def dispatch_cases(full: bool):
    out = []
    for i, m in enumerate(range(1, 18)):
        for lay in (LAYOUTS if full else [LAYOUTS[i % len(LAYOUTS)]]):
            n = 40 if m % 2 else 33
            out.append((_case_name(m, lay, n), m, n, lay, None, None))
    if not full:
        for m in (1, 17):
            out += [(_case_name(m, lay, 40) + "_all", m, 40, lay, None, None) for lay in LAYOUTS]
    return out


# (name, M, N, layout, (bm, bn, bk, warps, stages, swap), split_k)
CONFIG_CASES = [
    ("split3_channel_w8_swap", 1, 40, (8, "channel", None, False, "float16", 256), (16, 32, 32, 4, 1, True), 3),
    ("split4_channel_w4_noswap", 5, 33, (4, "channel", None, False, "float32", 200), (16, 16, 32, 4, 1, False), 4),
    ("split2_g64_w4_bk32_swap", 3, 40, (4, "group", 64, False, "float32", 256), (16, 32, 32, 4, 1, True), 2),
    ("split3_g128_w8_bk64", 17, 40, (8, "group", 128, False, "float32", 384), (16, 16, 64, 4, 1, False), 3),
    ("split2_g48_mode2", 2, 40, (4, "group", 48, False, "float16", 192), (16, 32, 32, 4, 1, True), 2),
    ("bm32_noswap_g32", 20, 40, (8, "group", 32, False, "float32", 128), (32, 32, 32, 4, 1, False), None),
    ("bn64_swap_channel_rows", 16, 70, (4, "channel", None, False, "float32", 128), (16, 64, 64, 4, 1, True), None),
    # W4 with BK >= 64: low and high nibbles as two operands against even / odd activation columns
    ("w4_nibble_split_g64_noswap", 18, 40, (4, "group", 64, False, "float32", 256), (16, 32, 64, 4, 1, False), None),
    ("w4_nibble_split_ch_swap_tail", 3, 33, (4, "channel", None, False, "float16", 200),
     (16, 32, 128, 4, 1, True), 2),
    ("w4_nibble_split_g128_bk128", 9, 40, (4, "group", 128, True, "bfloat16", 384), (16, 32, 128, 4, 1, True), 2),
]

EXACT_CASES = [
    ("exact_w8_channel", 3, 40, (8, "channel", None, False, "float32", 200), None, None),
    ("exact_w4_g32_swap_split", 1, 33, (4, "group", 32, False, "float32", 256), (16, 32, 32, 4, 1, True), 2),
    ("exact_w8_g64_noswap", 17, 40, (8, "group", 64, False, "float32", 192), (16, 16, 32, 4, 1, False), None),
    ("exact_w4_g40_mode2", 5, 40, (4, "group", 40, False, "float32", 200), None, None),
    ("exact_w4_channel_fp16", 4, 40, (4, "channel", None, True, "float16", 128), None, None),
    ("exact_w4_nibble_split_g64", 17, 40, (4, "group", 64, False, "float32", 256), (16, 32, 64, 4, 1, False), None),
]


# -- the worker (child process, TRITON_INTERPRET=1) --------------------------------------------
def _make(m, n, lay, exact, seed, bias=True):
    from fxkernels import reference
    from fxkernels.format import QuantSpec, as_grouped, pack

    bits, gran, gs, sym, dt, k = lay
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, granularity=gran, group_size=gs, symmetric=sym)
    shape = spec.scale_shape(n, k)
    q = torch.randint(0, spec.qmax + 1, (n, k), generator=gen)
    if sym:
        zero = torch.full(shape, (spec.qmax + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.randint(0, spec.qmax + 1, shape, generator=gen, dtype=torch.int32)
    if exact:
        scale = 2.0 ** torch.randint(-3, 1, shape, generator=gen).float()
        xq = torch.randint(-4, 5, (m, k), generator=gen, dtype=torch.int8)
        sa = 2.0 ** torch.randint(-2, 1, (m,), generator=gen).float()
        za = torch.randint(-3, 4, (m,), generator=gen, dtype=torch.int32)
        b = torch.randint(-4, 5, (n,), generator=gen).float() if bias else None
    else:
        scale = torch.rand(shape, generator=gen) * 0.02 + 0.002
        xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        sa = torch.rand(m, generator=gen) * 0.05 + 1e-3
        za = torch.randint(-128, 128, (m,), generator=gen, dtype=torch.int32)
        b = torch.randn(n, generator=gen) if bias else None
    qw = pack(q, spec)
    s, z = as_grouped(scale, spec, n), as_grouped(zero, spec, n)
    ws = reference.weight_sums(qw, bits, k, s.shape[1])
    return (xq, sa, za, qw, s, z, ws, b, bits, getattr(torch, dt))


def _measure(args, y, plan) -> dict:
    from fxkernels import reference
    from fxkernels.backends import triton_int8 as ti

    out_dtype = args[-1]
    k, groups = args[0].shape[1], args[4].shape[1]
    exact, bound = ti.error_bound(*args, chunk=ti.plan_chunk(plan, k, groups), splits=plan.split_k,
                                  truncating=out_dtype == torch.bfloat16)
    err = (y.double() - exact).abs()
    ref = reference.qact_linear(*args)
    return dict(out_dtype=str(y.dtype), out_shape=list(y.shape), within=bool((err <= bound).all()),
                worst=(err / bound).max().item(), err=err.max().item(), equal_ref=bool(torch.equal(y, ref)))


def _run(case, exact: bool) -> dict:
    import fxkernels
    from fxkernels import dispatch
    from fxkernels.backends import triton_int8 as ti

    name, m, n, lay, cfg, split = case
    args = _make(m, n, lay, exact, zlib.crc32(name.encode()), bias=m % 3 != 0)
    k, groups = args[0].shape[1], args[4].shape[1]
    if cfg is None:
        with fxkernels.use_backend("triton"):
            kernel = dispatch.select("qact_linear", *args).name
            y = fxkernels.ops.qact_linear(*args)
        c = ti.QACT_INTERPRETER_CONFIGS[m <= 16]
        plan = ti.make_qact_plan(c, m, n, k, groups, 4)
    else:
        c = ti.QConfig(*cfg)
        plan = ti.make_qact_plan(c, m, n, k, groups, 4, split)
        y = ti.launch_qact(*args, c, split_k=split)
        kernel = "launch_qact"
    r = dict(kernel=kernel, split_k=plan.split_k, scale_mode=plan.scale_mode, swap=c.swap, bk=plan.bk)
    r.update(_measure(args, y, plan))
    return r


def _quantize_cases() -> dict:
    """``triton_quantize_act`` against the reference, bit for bit: dynamic per token and static,
    fp32/fp16/bf16, rows of zeros, all-positive rows, exact ties, huge values, strided input."""
    import fxkernels
    from fxkernels import reference

    out = {}
    g = torch.Generator().manual_seed(7)
    base = torch.randn(9, 300, generator=g) * torch.logspace(-3, 2, 9)[:, None]
    base[0] = 0
    base[1] = base[1].abs() + 0.1
    base[2, :8] = torch.tensor([0.5, 1.5, -2.5, 2.5, 1e4, -1e4, 3.5, -0.5])
    for dt in ("float32", "float16", "bfloat16"):
        for static in (False, True):
            x = base.to(getattr(torch, dt))
            s, z = (torch.tensor([0.037]), torch.tensor([5], dtype=torch.int32)) if static else (None, None)
            for label, xx in (("contig", x), ("strided", x[:, 3:])):
                with fxkernels.use_backend("triton"):
                    got = fxkernels.ops.quantize_act(xx, s, z)
                want = reference.quantize_act(xx, s, z)
                out[f"{dt}_{'static' if static else 'dynamic'}_{label}"] = [bool(torch.equal(a, b))
                                                                             for a, b in zip(got, want)]
    return out


def _compile_and_refusals() -> dict:
    """torch.compile(fullgraph=True) over W4A8 / W8A8 QuantLinear on the Triton backend, and
    the refusals' reasons."""
    import fxkernels
    from fxkernels import dispatch
    from fxkernels.backends import triton_int8 as ti

    out = {}
    calls = {"qact": 0, "quant": 0}
    real = {}
    for op, name, key in (("qact_linear", ti.QACT_KERNEL_NAME, "qact"),
                          ("quantize_act", ti.QUANT_KERNEL_NAME, "quant")):
        for kern in dispatch.candidates(op):
            if kern.name == name:
                real[name] = kern.run

                def counting(*a, _run=kern.run, _key=key):
                    calls[_key] += 1
                    return _run(*a)
                kern.run = counting
    try:
        for label, spec in (("w4a8_g32", fxkernels.QuantSpec(bits=4, granularity="group", group_size=32, act_bits=8)),
                            ("w8a8_channel", fxkernels.QuantSpec(bits=8, granularity="channel", act_bits=8))):
            torch.manual_seed(0)
            lin = torch.nn.Linear(128, 40)
            ql = fxkernels.QuantLinear.from_linear(lin, spec)
            xi = torch.randn(2, 3, 128)
            calls.update(qact=0, quant=0)
            torch._dynamo.reset()
            with fxkernels.use_backend("triton"):
                y = torch.compile(ql, fullgraph=True, backend="aot_eager")(xi)
            with fxkernels.use_backend("reference"):
                y_ref = ql(xi)
            out[label] = dict(qact=calls["qact"], quant=calls["quant"],
                              err=(y - y_ref).abs().max().item(), top=y_ref.abs().max().item())
    finally:
        for op in ("qact_linear", "quantize_act"):
            for kern in dispatch.candidates(op):
                if kern.name in real:
                    kern.run = real[kern.name]

    def args(m, n, k, bits, groups):
        from fxkernels.format import QuantSpec, as_grouped, pack
        spec = QuantSpec(bits=bits, granularity="group" if groups > 1 else "channel",
                         group_size=k // groups if groups > 1 else None)
        qw = pack(torch.zeros(n, k, dtype=torch.int32), spec)
        shape = spec.scale_shape(n, k)
        s, z = as_grouped(torch.ones(shape), spec, n), as_grouped(torch.zeros(shape, dtype=torch.int32), spec, n)
        return (torch.zeros(m, k, dtype=torch.int8), torch.ones(m), torch.zeros(m, dtype=torch.int32), qw, s, z,
                torch.zeros_like(z), None, bits, torch.float16)

    # empty batches, a half-precision bias and an expanded (stride-0) activation scale
    lay = (4, "group", 32, False, "float16", 128)
    a = list(_make(5, 24, lay, False, 11))
    a[7] = a[7].to(torch.bfloat16)
    a[1] = a[1][:1].expand(5)
    with fxkernels.use_backend("triton"):
        e = list(a)
        e[0], e[1], e[2] = a[0][:0], a[1][:0], a[2][:0]
        out["empty"] = list(fxkernels.ops.qact_linear(*e).shape)
        out["empty_quant"] = [list(t.shape) for t in fxkernels.ops.quantize_act(torch.zeros(0, 64), None, None)]
        y = fxkernels.ops.qact_linear(*a)
    plan = ti.make_qact_plan(ti.QACT_INTERPRETER_CONFIGS[True], 5, 24, 128, 4, 4)
    exact, bound = ti.error_bound(*a, chunk=ti.plan_chunk(plan, 128, 4), splits=plan.split_k)
    out["bias_bf16_within"] = bool(((y.double() - exact).abs() <= bound).all())
    with fxkernels.use_backend("triton"):
        out["ok"] = list(ti.qact_can_implement(*args(2, 8, 64, 4, 2)))
        out["big_group"] = list(ti.qact_can_implement(*args(1, 8, 65536, 8, 1)))
        a = list(args(2, 8, 64, 8, 1))
        a[3] = torch.zeros(8, 128, dtype=torch.int8)[:, ::2]
        out["strided_w"] = list(ti.qact_can_implement(*a))
    out["not_forced"] = list(ti.qact_can_implement(*args(2, 8, 64, 4, 2)))
    return out


def _worker(path: str, full: bool) -> None:
    results = {}
    for exact, cases in ((False, dispatch_cases(full) + CONFIG_CASES), (True, EXACT_CASES)):
        for case in cases:
            try:
                results[case[0]] = _run(case, exact)
            except Exception as e:  # reported per case by the parent
                results[case[0]] = {"error": f"{type(e).__name__}: {e}"}
    for key, fn in (("_quantize", _quantize_cases), ("_compile", _compile_and_refusals)):
        try:
            results[key] = fn()
        except Exception as e:
            import traceback
            results[key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
    Path(path).write_text(json.dumps(results))


# -- the tests (parent process) ----------------------------------------------------------------
def _spawn(tmp, full: bool) -> dict:
    return run_interpreter_worker(__file__, tmp, full, timeout=1800)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("triton_int8"), full=False)


def _get(results, name):
    return worker_result(results, name)


def _check(name, r, m, n, lay):
    assert r["out_shape"] == [m, n] and r["out_dtype"] == f"torch.{lay[4]}", r
    assert r["within"], f"{name}: error {r['err']:.3g}, {r['worst']:.3g}x the bound (mode {r['scale_mode']})"


@pytest.mark.parametrize("case", dispatch_cases(False), ids=[c[0] for c in dispatch_cases(False)])
def test_dispatch_matches_reference(results, case):
    name, m, n, lay, _, _ = case
    r = _get(results, name)
    assert r["kernel"] == "triton_qact_linear", r
    _check(name, r, m, n, lay)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_configs_match_reference(results, case):
    name, m, n, lay, cfg, split = case
    r = _get(results, name)
    if split:
        assert r["split_k"] > 1, f"{name}: split-K not exercised"
    _check(name, r, m, n, lay)


def test_cases_cover_the_paths(results):
    seen = [_get(results, c[0]) for c in dispatch_cases(False) + CONFIG_CASES + EXACT_CASES]
    assert {r["scale_mode"] for r in seen} == {0, 1, 2}
    assert {r["swap"] for r in seen} == {True, False}
    assert any(r["split_k"] > 1 and r["scale_mode"] == s for r in seen for s in (0, 1, 2))
    assert any(r["scale_mode"] == 1 and r["bk"] < 64 for r in seen)  # several K steps per group
    # W4 codes through both unpackings: interleaved (BK 32) and split nibbles (BK >= 64)
    w4 = [(r, c) for r, c in zip(seen, dispatch_cases(False) + CONFIG_CASES + EXACT_CASES) if c[3][0] <= 4]
    assert {r["bk"] >= 64 for r, _ in w4} == {True, False}


@pytest.mark.parametrize("case", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_exact_on_integer_data(results, case):
    r = _get(results, case[0])
    assert r["equal_ref"], f"{case[0]}: max error {r['err']} on exact data"


def test_quantize_act_bit_exact(results):
    r = _get(results, "_quantize")
    bad = {k: v for k, v in r.items() if v != [True, True, True]}
    assert len(r) == 12 and not bad, bad


def test_torch_compile_fullgraph_runs_the_triton_int8_kernels(results):
    r = _get(results, "_compile")
    for label in ("w4a8_g32", "w8a8_channel"):
        c = r[label]
        assert c["qact"] >= 1 and c["quant"] >= 1, (label, c)
        # same codes on both paths; fp32 roundings only (3 per group of 4 + scale + bias)
        assert c["err"] <= 1e-5 * c["top"], (label, c)


def test_refusals_explain_themselves(results):
    r = _get(results, "_compile")
    assert r["ok"][0] is True
    ok, why = r["big_group"]
    assert not ok and "in_features=65536" in why and "32768" in why
    ok, why = r["strided_w"]
    assert not ok and "qweight strides" in why
    ok, why = r["not_forced"]
    assert not ok and "forced" in why


def test_empty_batches_bf16_bias_and_expanded_scale(results):
    r = _get(results, "_compile")
    assert r["empty"] == [0, 24] and r["empty_quant"] == [[0, 64], [0], [0]]
    assert r["bias_bf16_within"]


def test_qact_plan():
    from fxkernels.backends import triton_int8 as ti

    cfg = ti.QConfig(16, 128, 256, 4, 3, True)
    p = ti.make_qact_plan(cfg, 1, 4096, 4096, 1, num_sms=132)  # 32 tiles for 132 SMs
    assert p.scale_mode == 0 and p.split_k > 1 and p.seg % p.bk == 0 and (p.split_k - 1) * p.seg < 4096
    assert p.split_k == 8  # 2 CTAs per SM would need 9 splits; capped at 512 columns per split
    p = ti.make_qact_plan(cfg, 1, 11008, 4096, 32, num_sms=132)  # g128: K step 128, mode 1
    assert (p.bk, p.scale_mode) == (128, 1) and p.split_k > 1 and p.seg % 128 == 0
    p = ti.make_qact_plan(cfg, 1, 4096, 4800, 100, num_sms=132)  # g48: masked steps
    assert (p.bk, p.scale_mode, p.seg) == (32, 2, 48) and p.segs_per_split * p.split_k >= 100
    p = ti.make_qact_plan(ti.QConfig(128, 128, 128, 8, 3), 4096, 4096, 4096, 1, num_sms=132)
    assert p.split_k == 1
    # N = 1024 at small M: 8 weight tiles, split-K fills the SMs (the extension runs 32 CTAs)
    p = ti.make_qact_plan(cfg, 16, 1024, 4096, 1, num_sms=132)
    assert 8 * p.split_k == 64
    p = ti.make_qact_plan(ti.QConfig(16, 64, 256, 4, 4, True), 16, 1024, 4096, 1, num_sms=132)
    assert 16 * p.split_k == 128
    assert ti.qact_candidates((9, 0), 4096, 4096, 1)[1][-1] in ti.QACT_HOPPER_LARGE
    assert not set(ti.qact_candidates((8, 0), 4096, 4096, 1)[1]) & set(ti.QACT_HOPPER_LARGE)
    assert ti.qact_candidates((9, 0), 1, 4800, 100)[1] == ti.QACT_ODD_GROUP_CONFIGS


def test_unaligned_weights_are_refused_on_a_gpu():
    from fxkernels.backends import triton_int8 as ti

    assert ti.alignment_reason(4096, 4096, 0x7f0000000000) is None
    assert ti.alignment_reason(4096, 2048, 0x7f0000000000) is None  # INT4 rows
    assert "in_features=4088" in ti.alignment_reason(4088, 4088, 0x7f0000000000)
    assert "rows of 2056 B" in ti.alignment_reason(4112, 2056, 0x7f0000000000)
    assert "address 0x7f0000000004" in ti.alignment_reason(4096, 4096, 0x7f0000000004)


def test_small_m_route_only_where_the_extension_starves_the_gpu():
    from fxkernels import dispatch
    from fxkernels.backends import triton_int8 as ti

    assert ti.small_m_preferred(1, 1024, 132)[0]          # 32 CTAs for 132 SMs
    assert ti.small_m_preferred(16, 2048, 132)[0]         # 64 < 66
    ok, why = ti.small_m_preferred(1, 4096, 132)          # 128 CTAs: the extension keeps it
    assert not ok and "128 CTAs" in why
    ok, why = ti.small_m_preferred(17, 1024, 132)
    assert not ok and "M=17" in why
    prio = {k.name: k.priority for k in dispatch.candidates("qact_linear")}
    assert prio[ti.QACT_SMALL_M_NAME] > prio["cuda_qact_linear"] > prio[ti.QACT_KERNEL_NAME]
    # on CPU tensors the route refuses; the general kernel is what the interpreter runs
    x = torch.zeros(1, 64, dtype=torch.int8)
    ok, why = ti.small_m_can_implement(x, None, None, torch.zeros(8, 64, dtype=torch.int8), None, None, None,
                                       None, 8, torch.float16)
    assert not ok and "cpu" in why


# -- compile-only checks (no GPU) ------------------------------------------------------------------
_STATIC_SCRIPT = """
import json, sys, torch
sys.path.insert(0, "bench")
import gpu_static
from fxkernels.backends import triton_int8 as ti
rows = []
for arch in (80, 90):
    for cfg, grouped in ti.qact_shipped_configs((arch // 10, arch % 10)):
        if cfg in ti.QACT_ODD_GROUP_CONFIGS:
            layouts = ((4, 96), (8, 96))  # g48 at K = 4608
        elif grouped:
            layouts = ((4, 32), (8, 32)) if FULL else ((4, 32),)
        else:
            layouts = ((8, 1), (4, 1)) if FULL else ((8, 1),)
        for bits, groups in layouts:
            k = 4608 if groups == 96 else 4096
            kern = ti.compile_qact_variant(arch, cfg, bits, groups, k=k)
            ins = gpu_static.disassemble(kern.asm["cubin"])
            res = gpu_static.resources(kern.asm["cubin"])
            spills = sum(1 for _, t in ins if gpu_static.opcode(t) in ("LDL", "STL"))
            ops = sorted({gpu_static.opcode(t) for _, t in ins if "MMA" in gpu_static.opcode(t)})
            rows.append(dict(tag=f"sm_{arch} {cfg} W{bits} groups{groups}", arch=arch, cfg=str(cfg),
                             mside=cfg.bn if cfg.swap else cfg.bm, warps=cfg.warps, spills=spills,
                             local=res["local"], shared=kern.metadata.shared, mma=ops))
    # the JIT's variant for unaligned weights (K = 99, odd row strides) spills: the backend refuses
    # those layers on a GPU (alignment_reason); this row records that the refusal is needed
    cfg = ti.QACT_BUCKETS_CHANNEL[0][1][0]
    kern = ti.compile_qact_variant(arch, cfg, 8, 1, k=4096, aligned=False)
    spills = sum(1 for _, t in gpu_static.disassemble(kern.asm["cubin"]) if gpu_static.opcode(t) in ("LDL", "STL"))
    rows.append(dict(tag=f"sm_{arch} {cfg} W8 unaligned", arch=arch, cfg="unaligned", spills=spills))
    for static in (False, True):
        kern = ti.compile_quantize_variant(arch, torch.bfloat16, static)
        res = gpu_static.resources(kern.asm["cubin"])
        rows.append(dict(tag=f"sm_{arch} quantize_act static={static}", arch=arch, cfg="quant", mside=0, warps=4,
                         spills=res["local"], local=res["local"], shared=kern.metadata.shared, mma=[]))
print(json.dumps(rows))
"""
def _static_rows(full: bool):
    return run_compile_worker(_STATIC_SCRIPT, full, timeout=1800)


def _check_static(rows):
    unaligned = [r for r in rows if r["cfg"] == "unaligned"]
    assert len(unaligned) == 2 and all(r["spills"] > 0 for r in unaligned), unaligned
    rows = [r for r in rows if r["cfg"] != "unaligned"]
    bad = [f"{r['tag']}: spills {r['spills']}, local {r['local']} B, shared {r['shared']} B" for r in rows
           if r["spills"] or r["local"] or r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not bad, "\n".join(bad)
    for r in rows:
        if r["cfg"] == "quant":
            continue
        if r["arch"] == 90 and r["mside"] >= 64 and r["warps"] >= 4:
            # Hopper's warp-group MMA on int8 (wgmma ... .s32.s8.s8) disassembles as IGMMA
            assert "IGMMA" in r["mma"], f"{r['tag']}: no warp-group MMA on sm_90a ({r['mma']})"
        else:
            assert r["mma"] and set(r["mma"]) <= {"IMMA", "IGMMA"}, f"{r['tag']}: {r['mma']}"


def test_shipped_configs_compile_without_spills():
    """Every configuration the backend may choose, compiled for sm_80 and sm_90a: no spills,
    shared memory within the GPU's limit, integer tensor-core instructions, and on sm_90a the
    warp-group MMA wherever the MMA's M side has 64+ rows."""
    _check_static(_static_rows(full=False))


@pytest.mark.slow
def test_full_variant_matrix_compiles_without_spills():
    _check_static(_static_rows(full=True))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], bool(int(sys.argv[3])))
