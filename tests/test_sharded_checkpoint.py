"""Sharded checkpoints (Hugging Face convention): ShardedWriter, save_quantized(max_shard_size=),
and every reader (load_quantized, from_pretrained, the GPTQ export, inspect) on shards."""

import json
import os
import re
import shutil

import pytest
import torch

from fxkernels import QuantLinear, QuantSpec, load_quantized, replace_linears, save_quantized
from fxkernels.checkpoint import (CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, CheckpointError, CheckpointTensors,
                                  ShardedWriter, ShardSink, _dedup_state, parse_shard_size, quant_layers)

from .conftest import tiny_llama

SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _quantized():
    model = tiny_llama()
    replace_linears(model, QuantSpec(4, "group", 32), overrides={"*.down_proj": QuantSpec(8, "channel")})
    return model


@pytest.fixture(scope="module")
def model():
    return _quantized()


def _shards(path):
    return sorted(f for f in os.listdir(path) if SHARD.fullmatch(f))


def _all_tensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_parse_shard_size():
    assert parse_shard_size(None) is None and parse_shard_size(123) == 123
    assert parse_shard_size("2GB") == 2 * 10**9 and parse_shard_size("500MB") == 500 * 10**6
    assert parse_shard_size("1.5GiB") == int(1.5 * 2**30) and parse_shard_size("20kb") == 20_000
    for bad in (0, -5, "lots", "2 GBs", True, 1.5, ""):
        with pytest.raises(ValueError, match=r"max_shard_size=.*expected a positive int \(bytes\) or a string"):
            parse_shard_size(bad)


def test_save_quantized_rejects_a_bad_shard_size(model, tmp_path):
    with pytest.raises(ValueError, match=r"max_shard_size='2 bananas'; expected"):
        save_quantized(model, str(tmp_path / "x"), max_shard_size="2 bananas")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("size", ["20KB", 50_000, "90kB"])
def test_sharded_round_trip_equals_single_file(model, tmp_path, size):
    single = save_quantized(model, str(tmp_path / "single"))
    sharded = save_quantized(model, str(tmp_path / "sharded"), max_shard_size=size)
    files = _shards(sharded)
    assert len(files) >= 2 and WEIGHTS_NAME not in os.listdir(sharded)
    assert [SHARD.fullmatch(f).groups() for f in files] == [(f"{i:05d}", f"{len(files):05d}")
                                                           for i in range(1, len(files) + 1)]
    limit = parse_shard_size(size)
    sizes = {f: os.path.getsize(os.path.join(sharded, f)) for f in files}
    index = json.load(open(os.path.join(sharded, WEIGHTS_INDEX_NAME)))
    # each shard's tensor bytes stay under the limit unless it holds one tensor larger than it
    for f in files:
        names = [n for n, g in index["weight_map"].items() if g == f]
        assert sizes[f] < limit + 4096 or len(names) == 1, (f, sizes[f], names)
    a, b = _all_tensors(single), _all_tensors(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.load(open(os.path.join(single, CONFIG_NAME))) == json.load(open(os.path.join(sharded, CONFIG_NAME)))
    l1, l2 = load_quantized(single), load_quantized(sharded)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(l1(ids).logits, l2(ids).logits) and torch.equal(model(ids).logits, l2(ids).logits)
    assert l2.lm_head.weight.data_ptr() == l2.model.embed_tokens.weight.data_ptr() or \
        torch.equal(l2.lm_head.weight, l2.model.embed_tokens.weight)


def test_index_lists_every_stored_tensor_and_the_total_size(model, tmp_path):
    path = save_quantized(model, str(tmp_path / "s"), max_shard_size="30KB")
    index = json.load(open(os.path.join(path, WEIGHTS_INDEX_NAME)))
    tensors, tied = _dedup_state(model)
    assert set(index["weight_map"]) == set(tensors) and "lm_head.weight" in tied
    assert set(index["weight_map"].values()) == set(_shards(path))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    from safetensors import safe_open
    for name, f in index["weight_map"].items():
        with safe_open(os.path.join(path, f), "pt") as h:
            assert name in h.keys()
            assert h.metadata()["quant_method"] == "flexround"


def test_one_shard_keeps_the_single_file_layout(model, tmp_path):
    path = save_quantized(model, str(tmp_path / "s"), max_shard_size="1GB")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "quant_config.json"]


def test_sharded_writer_streams_and_matches_save_quantized(model, tmp_path):
    tensors, tied = _dedup_state(model)
    target = str(tmp_path / "w")
    with ShardedWriter(target, max_shard_bytes="25KB",
                       metadata_config={"tied": tied, "model": {"class": type(model).__name__}},
                       hf_config=model.config.to_dict()) as w:
        for name, t in tensors.items():
            w.add(name, t)
            # a shard never outgrows the limit by more than one tensor, and it is on disk, not in memory
            assert w._sink._shard_bytes <= 25_000 or len(w._sink._entries) == 1
        assert not os.path.exists(target)  # nothing visible until the with block exits
        w.set_config(layers=quant_layers(model))  # the layer table may be known only at the end
    assert len(w.files) >= 2
    ref = save_quantized(model, str(tmp_path / "ref"), max_shard_size="25KB")
    assert json.load(open(os.path.join(target, CONFIG_NAME))) == json.load(open(os.path.join(ref, CONFIG_NAME)))
    assert json.load(open(os.path.join(target, "config.json")))["quantization_config"]["quant_method"] == "flexround"
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_quantized(target)(ids).logits, model(ids).logits)


def test_sharded_writer_rejects_bad_use(model, tmp_path):
    with pytest.raises(ValueError, match=r"max_shard_bytes=-1"):
        ShardedWriter(str(tmp_path / "a"), max_shard_bytes=-1)
    with pytest.raises(ValueError, match="metadata_config is a list"):
        ShardedWriter(str(tmp_path / "a"), metadata_config=[])
    with pytest.raises(ValueError, match="already added"):
        with ShardedWriter(str(tmp_path / "a"), metadata_config={"layers": quant_layers(model)}) as w:
            w.add("x", torch.zeros(2))
            w.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="no quantized layers"):
        with ShardedWriter(str(tmp_path / "a")) as w:
            w.add("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match="inside a `with` block"):
        ShardedWriter(str(tmp_path / "a")).add("x", torch.zeros(2))
    assert os.listdir(tmp_path) == []


def test_interrupted_write_leaves_nothing(model, tmp_path):
    tensors, _ = _dedup_state(model)
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(str(tmp_path / "ck"), max_shard_bytes="10KB",
                           metadata_config={"layers": quant_layers(model)}) as w:
            for i, (name, t) in enumerate(tensors.items()):
                w.add(name, t)
                if i == 20:
                    assert len(w._sink._shards) >= 1  # some shards were already on disk
                    raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    # an existing checkpoint survives an interrupted overwrite unchanged
    path = save_quantized(model, str(tmp_path / "ck"), max_shard_size="20KB")
    before = sorted(os.listdir(path))
    with pytest.raises(RuntimeError):
        with ShardedWriter(path, max_shard_bytes="10KB", metadata_config={"layers": quant_layers(model)}) as w:
            w.add("x", torch.zeros(4))
            raise RuntimeError("crash")
    assert sorted(os.listdir(path)) == before and sorted(os.listdir(tmp_path)) == ["ck"]
    load_quantized(path)


@pytest.fixture
def sharded(model, tmp_path):
    return save_quantized(model, str(tmp_path / "ck"), max_shard_size="20KB")


def test_missing_shard_is_named(sharded):
    victim = _shards(sharded)[1]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(CheckpointError, match=rf"shard .*{victim} is missing"):
        load_quantized(sharded)
    with pytest.raises(CheckpointError, match=rf"{victim} is missing"):
        CheckpointTensors(sharded)


def test_truncated_shard_is_named(sharded):
    victim = os.path.join(sharded, _shards(sharded)[-1])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(victim)} is corrupt or truncated"):
        load_quantized(sharded)


def test_tensor_missing_from_its_shard_is_named(sharded):
    p = os.path.join(sharded, WEIGHTS_INDEX_NAME)
    index = json.load(open(p))
    name = next(iter(index["weight_map"]))
    wrong = next(f for f in _shards(sharded) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    json.dump(index, open(p, "w"))
    with pytest.raises(CheckpointError, match=rf"\['{re.escape(name)}'\] are assigned to .*{wrong}.* not in that file"):
        load_quantized(sharded)


def test_bad_index_is_reported(sharded):
    p = os.path.join(sharded, WEIGHTS_INDEX_NAME)
    open(p, "w").write("{nope")
    with pytest.raises(CheckpointError, match="index.json is not valid JSON"):
        load_quantized(sharded)
    json.dump({"weight_map": {"model.norm.weight": "../escape.safetensors"}}, open(p, "w"))
    with pytest.raises(CheckpointError, match="expected a file name in the checkpoint directory"):
        load_quantized(sharded)
    os.remove(p)
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_quantized(sharded)


def test_lazy_reader_reads_shards_tensor_by_tensor(model, sharded):
    tensors, _ = _dedup_state(model)
    lazy = CheckpointTensors(sharded)
    assert set(lazy) == set(tensors) and len(lazy) == len(tensors) and len(lazy.files) >= 2
    for name, t in tensors.items():
        assert lazy.shape(name) == tuple(t.shape) and torch.equal(lazy[name], t)


def test_from_pretrained_on_shards(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = save_quantized(model, str(tmp_path / "ck"), max_shard_size="20KB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert sum(isinstance(m, QuantLinear) for m in hf.modules()) == 14
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    shutil.copytree(path, tmp_path / "broken")
    os.remove(tmp_path / "broken" / _shards(path)[0])
    with pytest.raises(CheckpointError, match=rf"from_pretrained: shard .*{_shards(path)[0]} is missing"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "broken"))


def test_gptq_export_of_shards_equals_single_file(tmp_path):
    from fxkernels.export_gptq import export_gptq

    model = tiny_llama()
    replace_linears(model, QuantSpec(4, "group", 32, symmetric=True))
    single = save_quantized(model, str(tmp_path / "single"))
    sharded = save_quantized(model, str(tmp_path / "sharded"), max_shard_size="20KB")
    a = export_gptq(single, str(tmp_path / "ga"))
    b = export_gptq(sharded, str(tmp_path / "gb"))
    c = export_gptq(sharded, str(tmp_path / "gc"), max_shard_size="20KB")
    assert sorted(os.listdir(b)) == sorted(os.listdir(a)) == ["config.json", "model.safetensors",
                                                               "quantize_config.json"]
    assert len(_shards(c)) >= 2 and WEIGHTS_INDEX_NAME in os.listdir(c)
    ta, tb, tc = _all_tensors(a), _all_tensors(b), _all_tensors(c)
    assert ta.keys() == tb.keys() == tc.keys() and all(torch.equal(ta[k], tb[k]) and torch.equal(ta[k], tc[k])
                                                       for k in ta)
    assert json.load(open(os.path.join(a, "config.json"))) == json.load(open(os.path.join(c, "config.json")))
    victim = _shards(sharded)[0]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(CheckpointError, match=rf"export_gptq: shard .*{victim} is missing"):
        export_gptq(sharded, str(tmp_path / "gd"))
    assert not os.path.exists(tmp_path / "gd")


def test_inspect_reads_shard_headers(sharded, model):
    from quantizer.inspect_ckpt import format_report, inspect_checkpoint

    info = inspect_checkpoint(sharded)
    single = inspect_checkpoint(save_quantized(model, sharded + "-single"))
    assert info["layers"] == single["layers"]
    t = info["totals"]
    assert t["weight_files"] == len(_shards(sharded)) >= 2
    assert t["file_bytes"] == sum(os.path.getsize(os.path.join(sharded, f)) for f in _shards(sharded))
    assert f"the {t['weight_files']} weight shards are" in format_report(info)


SINK_TENSORS = {
    "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
    "f64": torch.randn(3).double(), "bool": torch.tensor([True, False, True]), "u8": torch.arange(9, dtype=torch.uint8),
    "i8": torch.arange(-3, 4, dtype=torch.int8), "i16": torch.arange(-2, 3, dtype=torch.int16),
    "i32": torch.arange(4, dtype=torch.int32), "i64": torch.arange(5), "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 4), "view": torch.randn(4, 6)[:, 1:3], "big": torch.randn(40, 10),
}


@pytest.mark.parametrize("limit", [None, 40, 10_000])
def test_sink_files_are_safetensors_with_every_dtype_and_shape(tmp_path, limit):
    from safetensors import safe_open
    from safetensors.torch import load_file

    sink = ShardSink(str(tmp_path), limit, metadata={"format": "pt", "quant_method": "flexround"})
    for name, t in SINK_TENSORS.items():
        sink.add(name, t)
    files = sink.finish()
    assert sorted(os.listdir(tmp_path)) == sorted(files + ([WEIGHTS_INDEX_NAME] if len(files) > 1 else []))
    assert (len(files) == 1) == (limit != 40)  # 40 bytes: nearly one shard per tensor, "big" on its own
    out = {}
    for f in files:
        out.update(load_file(str(tmp_path / f)))
        with safe_open(str(tmp_path / f), "pt") as h:
            assert h.metadata() == {"format": "pt", "quant_method": "flexround"}
    assert sorted(out) == sorted(SINK_TENSORS)
    for name, t in SINK_TENSORS.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t), name
    for f in files:  # every tensor starts at a multiple of its element size (zero-copy readers need it)
        raw = open(tmp_path / f, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        spans = sorted(e["data_offsets"] for k, e in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n  # contiguous, covering the data
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for k, e in header.items():
            if k != "__metadata__":
                assert e["data_offsets"][0] % SINK_TENSORS[k].element_size() == 0, k
    if len(files) > 1:
        index = json.load(open(tmp_path / WEIGHTS_INDEX_NAME))
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in SINK_TENSORS.values())


def test_sink_writes_at_once_and_keeps_no_tensor(tmp_path):
    sink = ShardSink(str(tmp_path), "1KB")
    t = torch.arange(6, dtype=torch.float32)
    sink.add("a", t)
    t.fill_(-1)  # changing the tensor after add does not change what was written
    sink.add("b", torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == [".shard-00001.data4"]  # data on disk, no finished shard yet
    sink.finish()
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / WEIGHTS_NAME))
    assert torch.equal(out["a"], torch.arange(6, dtype=torch.float32)) and torch.equal(out["b"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_NAME]  # the data files are gone


def test_sink_rejects_what_safetensors_cannot_store(tmp_path):
    sink = ShardSink(str(tmp_path))
    with pytest.raises(ValueError, match="complex64"):
        sink.add("c", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="__metadata__"):
        sink.add("__metadata__", torch.zeros(2))
    with pytest.raises(ValueError, match="dict of strings"):
        ShardSink(str(tmp_path), metadata={"format": 1})
