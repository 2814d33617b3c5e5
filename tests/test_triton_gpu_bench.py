"""bench/gpu_all.py, the one prepared GPU command, without a GPU: it imports, lists its plan
(``--dry-run``), refuses to time on a machine without CUDA, and its whole flow (checks, timed rows
checked against the reference, the markdown report) runs on tiny shapes in Triton's interpreter
(``--smoke-cpu``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, interpret=False, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FXK_FORCE_BACKEND",
                                                             "FXK_DISABLED_KERNELS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_all.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_the_plan():
    p = _run(["--dry-run"])
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "checks" in out and "L2 flushed" in out
    for name in ("cuBLAS fp16", "_int_mm + compiled epilogue", "_weight_int4pack_mm", "triton W4A8 g128",
                 "triton W8A8 ch", "cuda W8A8 ch", "A8 layer"):
        assert name in out, name
    assert out.count("  time ") == 4 * 5 * 11 and out.count("  check (") == 28
    quick = _run(["--dry-run", "--quick"]).stdout
    assert quick.count("  time ") == 2 * 3 * 11


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    p = _run([])
    assert p.returncode == 2 and "no CUDA device" in p.stdout


def test_smoke_run_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "report.md"
    p = _run(["--smoke-cpu", "--out", str(out)], interpret=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = out.read_text()
    assert "## Checks: all PASS" in md
    assert md.count("| 256 | 96 |") == 14  # 7 rows that run on CPU x 2 values of M
    assert "triton_qact_linear max err" in md and "triton_quantize_act+triton_qact_linear" in md
    assert "_int_mm (int32 out): RuntimeError: needs CUDA" in md  # GPU-only rows are reported, not hidden
