"""`flexround bench kernels` hands the right grid and thread count to the CPU benchmark harness."""

import fxkernels.bench as bench
from quantizer.cli import main


def _record(monkeypatch):
    calls = []

    def fake_table(shapes, ms, methods, threads=2, **kw):
        calls.append((list(shapes), list(ms), list(methods), threads))

    monkeypatch.setattr(bench, "cpu_kernel_table", fake_table)
    return calls


def test_bench_kernels_runs_the_quick_subset(monkeypatch):
    calls = _record(monkeypatch)
    assert main(["bench", "kernels", "--threads", "1"]) == 0
    assert calls == [(list(bench.QUICK_SHAPES), list(bench.QUICK_MS), list(bench.METHODS), 1)]


def test_bench_kernels_full_grid(monkeypatch):
    calls = _record(monkeypatch)
    assert main(["bench", "kernels", "--full"]) == 0
    shapes, ms, _, threads = calls[0]
    assert shapes == list(bench.SHAPES) and ms == list(bench.MS) and threads == 2


def test_bench_applies_activation_digits(monkeypatch):
    from fxkernels.backends import cpu

    seen = []
    monkeypatch.setattr(bench, "cpu_kernel_table", lambda *a, **kw: seen.append(cpu.activation_digits_in_use()))
    try:
        assert main(["bench", "kernels", "--activation-digits", "2"]) == 0
    finally:
        cpu.set_activation_digits(cpu.DEFAULT_ACTIVATION_DIGITS)
    assert seen == [2]
