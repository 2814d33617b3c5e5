import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-op tests: on a loaded 2-core machine, thread
    hand-offs cost more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128):
    """A randomly initialised LLaMA-architecture model small enough for unit tests."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_calibration():
    """Token ids ``[8, 24]`` inside :func:`tiny_llama`'s vocabulary (96 of its ids), fixed seed."""
    return torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))


def tiny_quantize_config(**overrides):
    """A few FlexRound steps over :func:`tiny_calibration`, W4 per-channel: seconds per model."""
    from fxkernels import QuantSpec
    from quantizer.config import QuantizeConfig

    d = dict(method="flexround", weight=QuantSpec(bits=4, granularity="channel"), iters=6, nsamples=8, seqlen=24,
             batch_size=2, progress=False, qdrop=0.5)
    d.update(overrides)
    return QuantizeConfig(**d)


def quiet_log(msg):
    """A ``log=`` callback that drops the engine's progress lines."""


def run_interpreter_worker(test_file, tmp, full: bool, timeout: int) -> dict:
    """Run ``test_file --worker OUT FULL`` in a fresh process under Triton's interpreter (the Triton
    test files compute every case in one such worker) and return the JSON results it wrote."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    out = Path(tmp) / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FXK_FORCE_BACKEND", None)
    env.pop("FXK_DISABLED_KERNELS", None)
    proc = subprocess.run([sys.executable, str(test_file), "--worker", str(out), str(int(full))], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


# the most shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), by sm arch
SMEM_LIMIT = {80: 166912, 90: 232448}


def run_compile_worker(script: str, full: bool, timeout: int) -> list:
    """Run a Triton compile-only script (``FULL`` set to ``full``) in a fresh process without the
    interpreter and return the JSON rows it printed last (the static SASS checks of the Triton
    test files)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", f"FULL = {full}\n" + script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"compile worker failed:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_result(results: dict, name: str) -> dict:
    """One case of an interpreter worker's results; a case that raised there fails here."""
    r = results[name]
    if "error" in r:
        pytest.fail(f"{name}: {r['error']}")
    return r
