"""The fxk:: ops: opcheck, argument validation, and dispatch behaviour."""

import subprocess
import sys

import pytest
import torch

import fxkernels
from fxkernels import dispatch, ops, reference
from fxkernels.format import QuantSpec, pack, quantize_rtn


def weight_args(bits=4, n=24, k=64, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, "group", k // groups) if groups > 1 else QuantSpec(bits, "channel")
    q, s, z = quantize_rtn(torch.randn(n, k, generator=g), spec)
    return pack(q, spec), s.reshape(n, -1).contiguous(), z.reshape(n, -1).contiguous()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_dequant_linear(bits, dtype):
    qw, s, z = weight_args(bits)
    x = torch.randn(3, 64).to(dtype)
    torch.library.opcheck(ops.dequant_linear, (x, qw, s, z, torch.randn(24), bits, 64))
    torch.library.opcheck(ops.dequant_linear, (x, qw, s, z, None, bits, 64))


def test_opcheck_quantize_act():
    x = torch.randn(5, 32)
    torch.library.opcheck(ops.quantize_act, (x, None, None))
    torch.library.opcheck(ops.quantize_act, (x, torch.tensor([0.03]), torch.tensor([4], dtype=torch.int32)))


@pytest.mark.parametrize("bits, groups", [(8, 1), (4, 2), (8, 4)])
def test_opcheck_qact_linear(bits, groups):
    qw, s, z = weight_args(bits, groups=groups)
    xq, sa, za = reference.quantize_act(torch.randn(3, 64))
    wsum = reference.weight_sums(qw, bits, 64, groups)
    for out in (torch.float32, torch.float16):
        torch.library.opcheck(ops.qact_linear, (xq, sa, za, qw, s, z, wsum, torch.randn(24), bits, out))


def test_qact_linear_integer_core_is_exact():
    # With unit scales the result is the integer accumulation itself: compare with int64 math.
    qw, _, z = weight_args(8, n=8, k=32, groups=1)
    g = torch.Generator().manual_seed(3)
    xq = torch.randint(-128, 128, (4, 32), generator=g, dtype=torch.int8)
    za = torch.randint(-20, 20, (4,), generator=g, dtype=torch.int32)
    one = torch.ones(8, 1)
    y = ops.qact_linear(xq, torch.ones(4), za, qw, one, z, reference.weight_sums(qw, 8, 32, 1), None, 8, torch.float32)
    c = reference.stored_codes(qw, 8, 32).long()
    exact = (xq.long() - za.long()[:, None]) @ (c - (z.long() - 128)).t()
    assert torch.equal(y.double(), exact.double())


def test_dynamic_activation_quantization_round_trip():
    x = torch.randn(6, 40) * 3 + 1
    xq, sa, za = ops.quantize_act(x, None, None)
    back = (xq.float() - za[:, None]) * sa[:, None]
    assert ((back - x).abs() <= sa[:, None] * 0.5 * (1 + 1e-5)).all()
    assert xq.min() == -128 or xq.max() == 127  # the grid spans each row's range


@pytest.mark.parametrize("call, match", [
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 63), qw, s, z, None, 4, 64),
     r"x.shape: got \(3, 63\); expected \[M, 64\]"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64).double(), qw, s, z, None, 4, 64),
     "x.dtype: got torch.float64"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64), qw.to(torch.int8), s, z, None, 4, 64),
     "qweight.dtype: got torch.int8; expected torch.uint8"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64), qw, s, z, None, 9, 64), "bits: got 9"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64), qw, s[:, :1].repeat(1, 3), z[:, :1].repeat(1, 3), None,
                                         4, 64),
     r"scale.shape\[1\]: got 3; expected a divisor of in_features=64"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64), qw, s, z.float(), None, 4, 64),
     "zero: got torch.float32"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64), qw, s, z, torch.randn(5), 4, 64),
     r"bias: got torch.float32 \(5,\)"),
    (lambda qw, s, z: ops.dequant_linear(torch.randn(3, 64, device="meta"), qw, s, z, None, 4, 64), "device"),
    (lambda qw, s, z: ops.quantize_act(torch.randn(3, 8), torch.tensor([0.1]), None), "both"),
    (lambda qw, s, z: ops.quantize_act(torch.randn(3, 8), torch.tensor([-0.1]), torch.tensor([0], dtype=torch.int32)),
     "positive"),
])
def test_bad_arguments_name_the_argument(call, match):
    qw, s, z = weight_args(4)
    with pytest.raises(ValueError, match=match):
        call(qw, s, z)


def test_forced_backend_refusal_lists_reasons(monkeypatch):
    qw, s, z = weight_args(4)
    monkeypatch.setenv("FXK_FORCE_BACKEND", "no_such_backend")
    with pytest.raises(RuntimeError, match="no kernel can run dequant_linear .forced backend 'no_such_backend'"):
        ops.dequant_linear(torch.randn(2, 64), qw, s, z, None, 4, 64)


def test_disabling_every_kernel_explains_why(monkeypatch):
    qw, s, z = weight_args(4)
    names = ",".join(k.name for k in dispatch.candidates("dequant_linear"))
    monkeypatch.setenv("FXK_DISABLED_KERNELS", names)
    with pytest.raises(RuntimeError, match="reference_dequant_linear: disabled by FXK_DISABLED_KERNELS"):
        ops.dequant_linear(torch.randn(2, 64), qw, s, z, None, 4, 64)


def test_available_kernels_lists_every_backend_with_a_reason():
    rows = fxkernels.available_kernels()
    backends = {r["backend"] for r in rows}
    assert {"reference", "cpu", "triton", "cuda"} <= backends
    assert all(r["reason"] for r in rows)
    assert any(r["backend"] == "reference" and r["usable"] for r in rows)


def test_missing_extension_does_not_break_import():
    # Simulate a wheel whose compiled module is missing: import must work and explain itself.
    code = ("import sys; sys.modules['fxkernels._C'] = None\n"
            "import warnings; warnings.simplefilter('always')\n"
            "import torch, fxkernels\n"
            "from fxkernels import QuantLinear, QuantSpec\n"
            "l = QuantLinear.from_linear(torch.nn.Linear(16, 8), QuantSpec(4, 'channel'))\n"
            "print(l(torch.randn(2, 16)).shape)\n"
            "rows = [r for r in fxkernels.available_kernels() if r['backend'] == 'cpu']\n"
            "print('CPU', all(not r['usable'] for r in rows), rows[0]['reason'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 8])" in out.stdout
    assert "CPU True" in out.stdout and "_C" in out.stdout
    warning_lines = [line for line in out.stderr.splitlines() if "compiled CPU kernels unavailable" in line]
    assert len(warning_lines) == 1, out.stderr
