"""Per-tensor GGUF -> fp32 Hugging Face directory conversion (quantizer.gguf_convert).

Most tests use tiny LLaMA GGUF files written here with the ``gguf`` package's writer (random
weights, llama.cpp's q/k row permutation, a small byte-level BPE vocabulary), so they run in
seconds; the real SmolLM2 and Gemma-3-270M GGUF files are compared under ``-m slow``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from quantizer import gguf_convert, models  # noqa: E402

_TOKENS = (["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)]
           + [chr(ord("A") + i) for i in range(26)] + [str(i) for i in range(8)] + ["ab"])
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
HEADS, KV_HEADS = 4, 2


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k projections (the converter must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: str, tied: bool, qtype=None, arch: str = "llama", seed: int = 0):
    """Write a 2-layer LLaMA (hidden 64, 4 heads, 2 kv heads, vocab 64) as GGUF; return the HF model.

    Matrices are stored as ``qtype`` (default Q8_0; F32 stores everything exactly); with ``tied``
    the file has no ``output.weight``, as llama.cpp writes tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    qtype = gguf.GGMLQuantizationType.Q8_0 if qtype is None else qtype
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(_TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong offset or a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_file_type(int(qtype))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(_TOKENS) - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        a = t.detach().numpy().astype(np.float32)
        if name in fixed:
            g = fixed[name]
        else:
            _, _, block, rest = name.split(".", 3)
            g = f"blk.{block}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
            if rest.startswith("self_attn.q_proj"):
                a = _llama_cpp_permute(a, HEADS)
            elif rest.startswith("self_attn.k_proj"):
                a = _llama_cpp_permute(a, KV_HEADS)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _whole_model(gguf_path: str):
    """What the GGUF loads as through transformers itself, whole, in fp32."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _load_dir(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _file_tensors(directory: str) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as h:
                for k in h.keys():
                    assert k not in out, f"{k} is stored twice"
                    out[k] = h.get_tensor(k)
    return out


def _assert_same_model(ref, new, directory: str) -> None:
    rs, ns = ref.state_dict(), new.state_dict()
    assert rs.keys() == ns.keys()
    unequal = [k for k in rs if not torch.equal(rs[k], ns[k])]
    assert not unequal, f"tensors differ from transformers' whole-model load: {unequal}"
    stored = _file_tensors(directory)
    assert stored, "no tensors written"
    for k, t in stored.items():
        assert t.dtype == torch.float32, k
        assert torch.equal(t, rs[k]), k
    ids = torch.tensor([[1, 3, 4, 5, 63, 30, 7, 2]]) % ref.config.vocab_size
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, new(ids).logits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    files = {}
    for tied in (True, False):
        path = str(d / f"tiny-{'tied' if tied else 'untied'}.gguf")
        files[tied] = (path, write_tiny_llama_gguf(path, tied=tied, seed=int(tied)))
    return files


@pytest.mark.parametrize("tied", [True, False])
def test_equal_to_transformers_whole_model_load(tiny, tmp_path, tied):
    path, _ = tiny[tied]
    out = str(tmp_path / "out")
    gguf_convert.gguf_to_hf_dir(path, out, log=lambda s: None)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    new, ref = _load_dir(out), _whole_model(path)
    _assert_same_model(ref, new, out)
    stored = _file_tensors(out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is tied
    assert "quantization_config" not in config  # plain fp32 weights, not a GGUF-quantized model
    if tied:
        assert "lm_head.weight" not in stored
        assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in stored
        assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])


def test_undoes_llama_cpp_permutation_exactly(tmp_path):
    """With every tensor stored as F32 the converted weights are the original model's, bit for bit:
    an independent check of the q/k row order (not only agreement with transformers)."""
    path = str(tmp_path / "f32.gguf")
    original = write_tiny_llama_gguf(path, tied=False, qtype=gguf.GGMLQuantizationType.F32, seed=3)
    out = str(tmp_path / "out")
    gguf_convert.gguf_to_hf_dir(path, out, log=lambda s: None)
    stored = _file_tensors(out)
    want = original.state_dict()
    assert set(stored) == set(want)
    for k, t in stored.items():
        assert torch.equal(t, want[k]), k


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_chunked_dequantize_equals_whole_tensor_call(qtype):
    """Row slabs (here 3 rows per call, the last slab short) give the values of one whole-tensor call."""
    t = getattr(gguf.GGMLQuantizationType, qtype)
    a = np.random.default_rng(0).standard_normal((10, 96)).astype(np.float32)
    data = a if t == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(a, t)
    whole = gguf.quants.dequantize(data, t)
    chunked = gguf_convert._dequantize(data, t, chunk_elements=3 * 96)
    assert chunked.dtype == np.float32 and chunked.shape == (10, 96) and chunked.flags.writeable
    assert np.array_equal(chunked, whole)
    assert t == gguf.GGMLQuantizationType.F32 or not np.array_equal(chunked, a)  # it did de-quantize


def test_shards_follow_hugging_face_convention(tiny, tmp_path):
    path, _ = tiny[False]
    out = str(tmp_path / "sharded")
    gguf_convert.gguf_to_hf_dir(path, out, max_shard_size="20KB", log=lambda s: None)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    stored = _file_tensors(out)
    assert set(index["weight_map"]) == set(stored)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in stored.values())
    _assert_same_model(_whole_model(path), _load_dir(out), out)


def test_failure_midway_leaves_no_output(tiny, tmp_path):
    path, _ = tiny[False]
    out = tmp_path / "out"
    seen = []

    def boom(name):
        seen.append(name)
        if len(seen) == 5:
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        gguf_convert.gguf_to_hf_dir(path, str(out), max_shard_size="20KB", _after_tensor=boom, log=lambda s: None)
    assert len(seen) == 5
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary sibling left behind either

    # an existing directory stays as it was when a later conversion fails
    out.mkdir()
    (out / "config.json").write_text("{}")
    seen.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        gguf_convert.gguf_to_hf_dir(path, str(out), _after_tensor=boom, log=lambda s: None)
    assert sorted(os.listdir(out)) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_truncated_gguf_names_the_file(tiny, tmp_path):
    path, _ = tiny[False]
    data = open(path, "rb").read()
    for cut in (len(data) - 100, len(data) // 2, 40):
        bad = tmp_path / f"cut-{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut-%d\.gguf.*(truncated|corrupt)" % cut):
            gguf_convert.gguf_to_hf_dir(str(bad), str(tmp_path / "out"), log=lambda s: None)
        assert not (tmp_path / "out").exists()


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"NOTGGUF!" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"garbage\.gguf.*not a readable GGUF"):
        gguf_convert.gguf_to_hf_dir(str(bad), str(tmp_path / "out"), log=lambda s: None)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        gguf_convert.gguf_to_hf_dir(str(tmp_path / "missing.gguf"), str(tmp_path / "out"), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_file_and_architecture(tmp_path):
    path = str(tmp_path / "odd.gguf")
    write_tiny_llama_gguf(path, tied=True, arch="flexroundtoy")
    with pytest.raises(ValueError, match=r"odd\.gguf.*'flexroundtoy'.*supported: .*llama"):
        gguf_convert.gguf_to_hf_dir(path, str(tmp_path / "out"), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_bad_shard_size_is_rejected_before_work(tiny, tmp_path):
    path, _ = tiny[True]
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        gguf_convert.gguf_to_hf_dir(path, str(tmp_path / "out"), max_shard_size="lots", log=lambda s: None)


def test_load_model_caches_and_old_directories_still_load(tiny, tmp_path, monkeypatch):
    """``load_model(x.gguf)`` converts once into the same cache key as before, and a directory written
    by the whole-model conversion (the format of existing caches) loads to the same model."""
    monkeypatch.setenv("FLEXROUND_CACHE", str(tmp_path / "cache"))
    path, _ = tiny[True]
    model, tok = models.load_model(path, log=lambda s: None)
    key = os.path.splitext(os.path.basename(path))[0] + f"-{os.path.getsize(path)}-fp32"
    cached = tmp_path / "cache" / key
    assert (cached / "config.json").exists()
    assert tok("ab").input_ids == [63]
    mtime = os.path.getmtime(cached / "config.json")
    models.load_model(path, log=lambda s: None)
    assert os.path.getmtime(cached / "config.json") == mtime  # not converted again

    old = str(tmp_path / "old")
    gguf_convert.whole_model_convert(path, old)
    old_model, old_tok = models.load_model(old, log=lambda s: None)
    _assert_same_model(old_model, model, str(cached))
    assert old_tok("abc").input_ids == tok("abc").input_ids
    shutil.rmtree(old)


def _real_gguf(which: str) -> str:
    if which == "smollm2":
        try:
            return models.smollm2_gguf_path()
        except FileNotFoundError as e:
            pytest.skip(str(e))
    path = os.path.join(os.path.expanduser("~"), ".cache", "gemma3dl", "gemma-3-270m-q4_k_m.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not downloaded")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3-270m"])
def test_real_gguf_equals_transformers_load(tmp_path, which):
    """Bundled SmolLM2 (Q4_1, LLaMA, tied) and Gemma-3-270M (Q4_K_M, norm offsets, tied), if present."""
    path = _real_gguf(which)
    out = str(tmp_path / which)
    gguf_convert.gguf_to_hf_dir(path, out, max_shard_size="200MB", log=lambda s: None)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    _assert_same_model(_whole_model(path), _load_dir(out), out)
