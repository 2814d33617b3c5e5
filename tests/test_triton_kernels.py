"""The Triton dequant-GEMM kernels against fxkernels.reference, run by Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton itself is imported (triton's own ``@jit``
helpers are decorated at its import), and another test module, or torch.compile, may import
triton first in this pytest process. So every kernel run happens in ONE child process (this file
run as a script, ``--worker``) that computes all cases and reports numbers as JSON; the tests
below assert on those numbers, one test per case.

Tolerance (the rule for every float kernel): the kernel's max error against a float64 evaluation of the same quantized
weights must be within 2x the error of torch's own matmul in the activation dtype (x and the
dequantized weight rounded to that dtype, fp32 accumulation), plus half a unit in the last place
of the largest output (each result is rounded once more to the output dtype). For bf16 the
interpreter truncates fp32->bf16 instead of rounding, doubling the unit roundoff, so the factor is
4 there. Where scales and activations are small integers, every product and sum is exact and the
kernel must match bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# (name, bits, granularity, group_size, symmetric, dtype, (M, N, K), bias, config, split_k)
# config None = the dispatch path (use_backend("triton") + fxk::dequant_linear, interpreter config
# BM16-BN32-BK32); otherwise (bm, bn, bk) with launch(); shapes leave remainder tiles in M, N, K.
CASES = [
    ("w4_channel_asym_fp16_bias", 4, "channel", None, False, "float16", (19, 40, 200), True, None, None),
    ("w4_channel_sym_fp16", 4, "channel", None, True, "float16", (1, 40, 96), False, None, None),
    ("w4_tensor_asym_fp32_bias", 4, "tensor", None, False, "float32", (5, 72, 136), True, None, None),
    ("w4_g32_asym_fp16_bias", 4, "group", 32, False, "float16", (19, 40, 192), True, None, None),
    ("w4_g32_sym_fp32", 4, "group", 32, True, "float32", (3, 33, 128), False, None, None),
    ("w4_g64_asym_fp16_bigBK", 4, "group", 64, False, "float16", (7, 40, 192), True, (16, 16, 128), None),
    ("w4_g48_asym_fp16_bk16", 4, "group", 48, False, "float16", (6, 40, 192), True, None, None),
    ("w4_g40_asym_fp16_gather", 4, "group", 40, False, "float16", (6, 40, 200), True, None, None),
    ("w4_g8_asym_fp32_gather", 4, "group", 8, False, "float32", (2, 24, 96), False, None, None),
    ("w4_g32_asym_fp16_bm64", 4, "group", 32, False, "float16", (70, 24, 128), True, (64, 16, 32), None),
    ("w4_g32_asym_fp16_splitk", 4, "group", 32, False, "float16", (3, 40, 256), True, (16, 16, 32), 3),
    ("w4_channel_asym_fp32_splitk", 4, "channel", None, False, "float32", (17, 24, 200), True, (16, 16, 64), 4),
    ("w4_channel_asym_bf16_bias", 4, "channel", None, False, "bfloat16", (9, 40, 200), True, None, None),
    ("w4_g32_asym_bf16_bm64", 4, "group", 32, False, "bfloat16", (9, 40, 192), False, (64, 32, 64), None),
    ("w3_channel_asym_fp16", 3, "channel", None, False, "float16", (4, 40, 96), False, None, None),
    ("w2_g32_asym_fp16", 2, "group", 32, False, "float16", (4, 40, 96), True, None, None),
    ("w8_channel_asym_fp16_bias", 8, "channel", None, False, "float16", (19, 40, 200), True, None, None),
    ("w8_tensor_sym_fp32", 8, "tensor", None, True, "float32", (5, 40, 96), False, None, None),
    ("w8_g32_asym_fp16", 8, "group", 32, False, "float16", (19, 40, 192), True, None, None),
    ("w8_g32_sym_fp16_bm64", 8, "group", 32, True, "float16", (65, 24, 96), False, (64, 16, 32), None),
    ("w8_g40_asym_fp32_gather", 8, "group", 40, False, "float32", (3, 40, 200), True, None, None),
    ("w8_channel_asym_bf16", 8, "channel", None, False, "bfloat16", (9, 40, 200), True, None, None),
    ("w8_g32_asym_bf16_splitk", 8, "group", 32, False, "bfloat16", (5, 40, 256), True, (16, 32, 32), 2),
    ("w6_g32_asym_fp16", 6, "group", 32, False, "float16", (4, 40, 128), False, None, None),
]

# Exactness: integer activations in [-3, 3], scales powers of two, so every product and the fp32
# accumulation are exact and only the final rounding to the output dtype remains: fp16/fp32
# outputs must equal the correctly rounded exact result bit for bit; bf16 outputs within one unit
# in the last place, because the interpreter truncates fp32 -> bf16 (a GPU rounds).
EXACT = [
    ("exact_w4_channel_fp16", 4, "channel", None, False, "float16", (5, 40, 200), True, None, None),
    ("exact_w4_g32_fp16_bm16", 4, "group", 32, False, "float16", (5, 40, 192), True, None, None),
    ("exact_w4_g32_fp16_bm64", 4, "group", 32, False, "float16", (5, 40, 192), False, (64, 16, 32), None),
    ("exact_w4_g40_fp32", 4, "group", 40, False, "float32", (5, 40, 200), False, None, None),
    ("exact_w8_channel_fp16", 8, "channel", None, False, "float16", (5, 40, 200), True, None, None),
    ("exact_w8_g32_bf16", 8, "group", 32, False, "bfloat16", (5, 40, 192), False, None, None),
    ("exact_w4_g32_bf16_splitk", 4, "group", 32, True, "bfloat16", (5, 40, 256), True, (16, 16, 32), 4),
]


# -- the worker (child process, TRITON_INTERPRET=1) --------------------------------------------
def _make(case, exact: bool, seed: int):
    from fxkernels.format import QuantSpec, as_grouped, pack, quantize_rtn

    name, bits, gran, gs, sym, dtype, (m, n, k), has_bias, cfg, split = case
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, granularity=gran, group_size=gs, symmetric=sym)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, scale, zero = quantize_rtn(w, spec)
    if not sym:  # random codes and zeros over the whole range (rtn rarely hits the extremes)
        q = torch.randint(0, spec.qmax + 1, (n, k), generator=gen)
        zero = torch.randint(0, spec.qmax + 1, tuple(zero.shape), generator=gen, dtype=torch.int32)
    if exact:
        scale = 2.0 ** torch.randint(-3, 1, tuple(scale.shape), generator=gen).float()
        x = torch.randint(-3, 4, (m, k), generator=gen).to(dt)
        bias = torch.randint(-4, 5, (n,), generator=gen).float() if has_bias else None
    else:
        x = torch.randn(m, k, generator=gen).to(dt)
        bias = torch.randn(n, generator=gen) if has_bias else None
    return x, pack(q, spec), as_grouped(scale, spec, n), as_grouped(zero, spec, n), bias, bits, k


def _run_case(case, exact: bool) -> dict:
    import fxkernels
    from fxkernels import dispatch, reference
    from fxkernels.backends import triton as tb

    name, bits, gran, gs, sym, dtype, shape, has_bias, cfg, split = case
    x, qw, s, z, b, bits, k = _make(case, exact, seed=zlib.crc32(name.encode()))
    if cfg is None:
        with fxkernels.use_backend("triton"):
            kernel = dispatch.select("dequant_linear", x, qw, s, z, b, bits, k).name
            y = fxkernels.ops.dequant_linear(x, qw, s, z, b, bits, k)
    else:
        kernel = "launch"
        y = tb.launch(x, qw, s, z, b, bits, k, tb.Config(*cfg, 4, 1), split_k=split)
    w64 = reference.dequant_weight(qw, s, z, bits, k).double()
    ref = x.double() @ w64.t() + (b.double() if b is not None else 0)
    base = (x @ reference.dequant_weight(qw, s, z, bits, k).to(x.dtype).t()).double()
    if b is not None:
        base = (base.float() + b).to(x.dtype).double()
    # one ulp of the output dtype at the largest |ref|
    top = ref.abs().max().item()
    ulp = float(torch.finfo(x.dtype).eps) * 2.0 ** max(0, int(torch.tensor(top).log2().floor().item()))
    plan = tb.make_plan(tb.Config(*(cfg or (16, 32, 32)), 4, 1), shape[0], shape[1], k, s.shape[1], bits,
                        x.dtype, 4, split)
    # per-element distance in units of the output dtype's spacing at the exact result
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[x.dtype]
    expo = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(x.dtype).tiny)))
    ulps = ((y.double() - ref).abs() / torch.exp2(expo - mant)).max().item()
    return dict(kernel=kernel, out_dtype=str(y.dtype), out_shape=list(y.shape),
                err=(y.double() - ref).abs().max().item(), torch_err=(base - ref).abs().max().item(),
                ulp=ulp, rounded_exact=bool(torch.equal(y, ref.to(x.dtype))), ulps=ulps,
                scale_mode=plan.scale_mode, split_k=plan.split_k)


def _refusals() -> dict:
    """can_implement answers and dispatch behaviour under the interpreter."""
    import fxkernels
    from fxkernels import dispatch
    from fxkernels.backends import triton as tb

    x, qw, s, z, b, bits, k = _make(CASES[0], False, 0)
    out = {"not_forced": tb.can_implement(x, qw, s, z, b, bits, k),
           "default_pick": dispatch.select("dequant_linear", x, qw, s, z, b, bits, k).backend}
    with fxkernels.use_backend("triton"):
        out["forced"] = tb.can_implement(x, qw, s, z, b, bits, k)
        out["fp64"] = tb.can_implement(x.double(), qw, s, z, b, bits, k)
        try:
            fxkernels.ops.dequant_linear(x.double(), qw, s, z, b, bits, k)
            out["fp64_error"] = ""
        except (ValueError, RuntimeError) as e:
            out["fp64_error"] = str(e)
        # M = 0 and a QuantLinear forward go through the same kernel
        out["empty_shape"] = list(fxkernels.ops.dequant_linear(x[:0], qw, s, z, b, bits, k).shape)
        lin = torch.nn.Linear(64, 24)
        ql = fxkernels.QuantLinear.from_linear(lin, fxkernels.QuantSpec(bits=4, granularity="group", group_size=32))
        xi = torch.randn(2, 3, 64)
        y = ql(xi)
        with fxkernels.use_backend("reference"):
            y_ref = ql(xi)
        out["qlinear_shape"] = list(y.shape)
        out["qlinear_err"] = (y - y_ref).abs().max().item()
    return out


def _worker(path: str) -> None:
    results = {}
    for exact, cases in ((False, CASES), (True, EXACT)):
        for case in cases:
            try:
                results[case[0]] = _run_case(case, exact)
            except Exception as e:  # reported per case by the parent
                results[case[0]] = {"error": f"{type(e).__name__}: {e}"}
    try:
        results["_refusals"] = _refusals()
    except Exception as e:
        results["_refusals"] = {"error": f"{type(e).__name__}: {e}"}
    Path(path).write_text(json.dumps(results))


# -- the tests (parent process) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FXK_FORCE_BACKEND", None)
    env.pop("FXK_DISABLED_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def _get(results, name):
    r = results[name]
    if "error" in r:
        pytest.fail(f"{name}: {r['error']}")
    return r


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(results, case):
    r = _get(results, case[0])
    dtype, (m, n, _) = case[5], case[6]
    assert r["out_shape"] == [m, n] and r["out_dtype"] == f"torch.{dtype}"
    if case[8] is None:
        assert r["kernel"] in ("triton_dequant_linear", "triton_decode_linear")
    factor = 4.0 if dtype == "bfloat16" else 2.0
    assert r["err"] <= factor * r["torch_err"] + 0.5 * r["ulp"], (
        f"{case[0]}: max error {r['err']:.3g} vs torch {dtype} matmul {r['torch_err']:.3g} "
        f"(ulp {r['ulp']:.3g}, scale_mode {r['scale_mode']}, split_k {r['split_k']})")


def test_cases_cover_every_path(results):
    """The case list must reach every scale mode and split-K, or the tests above prove less."""
    seen = {(_get(results, c[0])["scale_mode"], _get(results, c[0])["split_k"] > 1) for c in CASES + EXACT}
    modes = {m for m, _ in seen}
    assert modes == {0, 1, 2, 3}, modes
    assert any(sk for _, sk in seen)


@pytest.mark.parametrize("case", EXACT, ids=[c[0] for c in EXACT])
def test_exact_on_integer_data(results, case):
    r = _get(results, case[0])
    if case[5] == "bfloat16":
        assert r["ulps"] < 1.0, f"{case[0]}: {r['ulps']:.3g} ulps from the exact result"
    else:
        assert r["rounded_exact"], f"{case[0]}: max error {r['err']} ({r['ulps']:.3g} ulps) on exact data"


def test_dispatch_and_refusals(results):
    r = _get(results, "_refusals")
    ok, why = r["not_forced"]
    assert not ok and "forced" in why
    assert r["default_pick"] != "triton"  # CPU tensors never reach the interpreter unless forced
    assert r["forced"][0] is True
    ok, why = r["fp64"]
    assert not ok and "float64" in why
    assert "x.dtype" in r["fp64_error"]  # ops validation names the argument
    assert r["empty_shape"] == [0, 40]
    assert r["qlinear_shape"] == [2, 3, 24]
    assert r["qlinear_err"] < 1e-4


def test_refuses_cpu_without_interpreter(monkeypatch):
    """In this (non-interpreter) process the backend must refuse CPU tensors with a reason."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from fxkernels.backends import triton as tb
    from fxkernels.format import QuantSpec, pack

    x = torch.randn(2, 32)
    qw = pack(torch.zeros(8, 32, dtype=torch.int32), QuantSpec(bits=4))
    ok, why = tb.can_implement(x, qw, torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.int32), None, 4, 32)
    assert not ok and "TRITON_INTERPRET" in why


def test_plan_choices():
    """Launch planning: group tiles aligned with K steps, split-K only when tiles are scarce."""
    from fxkernels.backends import triton as tb

    cfg = tb.Config(16, 64, 256, 4, 4)
    p = tb.make_plan(cfg, 1, 4096, 4096, 32, 4, torch.float16, num_sms=132)  # g128 < BK 256
    assert (p.bk, p.scale_mode) == (128, 1)
    assert p.split_k > 1 and p.k_per_split % p.bk == 0 and p.split_k * p.k_per_split >= 4096
    assert (p.split_k - 1) * p.k_per_split < 4096  # no empty split
    p = tb.make_plan(cfg, 1, 4096, 11008, 86, 4, torch.float16, num_sms=132)  # g128, K not a multiple of BK
    assert (p.bk, p.scale_mode) == (128, 1)
    p = tb.make_plan(tb.Config(128, 128, 64, 8, 3), 1024, 11008, 4096, 1, 4, torch.float16, num_sms=132)
    assert (p.scale_mode, p.split_k) == (0, 1)
    p = tb.make_plan(tb.Config(128, 128, 64, 8, 3), 1024, 4096, 4096, 32, 8, torch.bfloat16, num_sms=132)
    assert p.scale_mode == 2 and not p.magic  # bf16 cannot hold 128 + q exactly for 8-bit codes
    p = tb.make_plan(cfg, 1, 4096, 4800, 100, 4, torch.float16, num_sms=132)  # g48: K step 16
    assert (p.bk, p.scale_mode) == (16, 1)
    p = tb.make_plan(cfg, 1, 4096, 4000, 100, 4, torch.float16, num_sms=132)  # g40: gather
    assert (p.bk, p.scale_mode, p.stages) == (tb.MODE3_MAX_BK, 3, tb.MODE3_MAX_STAGES)
    p = tb.make_plan(cfg, 64, 4096, 4096, 1, 4, torch.float16, num_sms=132)  # enough tiles
    assert p.split_k == 1
    for m in (1, 16, 17, 64, 65, 256, 257, 4096):
        assert tb.bucket_configs(m)[0] in tb.shipped_configs()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
