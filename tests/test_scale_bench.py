"""bench/scale_quantize.py's model writer: a tiny random LLaMA, written tensor by tensor as
sharded safetensors, loads in transformers and runs; the FLOP model adds up. The bench itself
(minutes to hours) is not run here."""

import importlib.util
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scale_quantize", os.path.join(REPO, "bench", "scale_quantize.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.LlamaShape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256)


def test_tiny_model_is_sharded_loadable_and_runs(bench, tiny, tmp_path):
    from safetensors import safe_open

    path = bench.write_random_llama(str(tmp_path / "m"), tiny, seed=3, max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) >= 2 and "model.safetensors.index.json" in os.listdir(path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    names = [n for n, _, _ in bench.tensor_plan(tiny)]
    assert sorted(index["weight_map"]) == sorted(names)
    stored = 0
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:  # every shard is valid safetensors
            for k in h.keys():
                assert index["weight_map"][k] == f
                stored += h.get_tensor(k).numel()
    assert stored == tiny.params()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == tiny.params()
    assert not tiny.tied and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    assert w.shape == (64, 128) and abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 12))).logits
    assert logits.shape == (2, 12, 256) and torch.isfinite(logits).all()


def test_writer_is_deterministic_and_seeded(bench, tiny, tmp_path):
    from safetensors.torch import load_file

    a = bench.write_random_llama(str(tmp_path / "a"), tiny, seed=1, max_shard_bytes=None)
    b = bench.write_random_llama(str(tmp_path / "b"), tiny, seed=1, max_shard_bytes=30_000)
    c = bench.write_random_llama(str(tmp_path / "c"), tiny, seed=2, max_shard_bytes=None)
    ta = load_file(os.path.join(a, "model.safetensors"))
    tb = {}
    for f in os.listdir(b):
        if f.endswith(".safetensors"):
            tb.update(load_file(os.path.join(b, f)))
    tc = load_file(os.path.join(c, "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])


def test_sizes_and_flops(bench):
    assert 120e6 < bench.SIZES["135m"].params() < 150e6
    assert 340e6 < bench.SIZES["360m"].params() < 380e6
    assert 0.9e9 < bench.SIZES["1b"].params() < 1.2e9
    assert 2.6e9 < bench.SIZES["3b"].params() < 3.4e9
    assert 6.4e9 < bench.LLAMA_7B.params() < 7.0e9
    s = bench.LLAMA_7B
    w = sum(n * k for n, k in s.block_linears().values())
    assert w == 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert bench.block_forward_flops(s, 10, 256) == 10 * (2 * w + 2 * 256 * 4096)
    pred = bench.predict_flexround_gpu_seconds(s, steps=200, nsamples=64, seqlen=256, batch_size=1)
    assert pred["seconds_total"] == pytest.approx(pred["seconds_per_block"] * 32)
    assert 10 < pred["seconds_total"] < 3600  # minutes, not days


def test_bad_options_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "7b"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="std=0"):
        bench.write_random_llama("/nonexistent/x", bench.SIZES["135m"], std=0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--max-blocks", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--max-blocks", "2", "--engine", "in-memory"])


def test_a_run_of_the_first_blocks_is_marked_partial(bench):
    blocks = [{"label": f"block {i + 1}/28", "seconds": 10.0 + i, "cpu_seconds": 19.0 + i, "rss_peak_bytes": 2**30}
              for i in range(2)]
    run = {"engine": "streaming", "blocks": blocks, "quantize_seconds": 30.0, "wall_seconds": 40.0,
           "peak_rss_bytes": 2 * 10**9, "partial": True, "first_blocks_only": True, "cpu_seconds": 45.0}
    row = bench.summarize("3b", "flexround", 10, run, None, None)
    assert row["blocks_done"] == 2 and row["partial"] and row["first_blocks_only"]
    assert row["seconds_per_block"] == 10.5 and row["cpu_seconds_per_block"] == 19.5
    line = bench.markdown_table([row]).splitlines()[-1]
    assert "PARTIAL: first 2/28 blocks only" in line and "| 10.50 | 19.50 |" in line and "2.00 (1.86)" in line
