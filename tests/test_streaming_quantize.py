"""quantize_pretrained: a model quantized block by block from its (sharded) safetensors files
writes the checkpoint that quantize() + save_quantized() write for the whole model, holding at
most one block's float weights; missing or truncated shards are named; resume works."""

import json
import os

import pytest
import torch

from fxkernels.checkpoint import load_quantized, save_quantized
from fxkernels.layers import CheckpointError
from quantizer import MemoryBudgetError, quantize, quantize_pretrained
from quantizer.resume import model_fingerprint
from quantizer.streaming import MetaParameters, SafetensorsSource, _skeleton, streamed_fingerprint

from .conftest import quiet_log as quiet
from .conftest import tiny_calibration as calib
from .conftest import tiny_quantize_config as cfg

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

STAT_KEYS = {"unit", "label", "loss_before", "loss_after", "seconds", "rss_bytes", "rss_peak_bytes", "loss_choice",
             "rss_peak_delta_bytes", "need_bytes", "device", "device_peak_bytes", "cpu_seconds"}


def save_tiny(directory, tied, layers=3, norm_gains=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg)
    if norm_gains:  # norms that are not all ones, so that the "norm" loss differs from "token"
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.2, 2.0)
    model.save_pretrained(directory, max_shard_size="40KB")
    return directory



def whole(src):
    return transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_checkpoint_equals_the_whole_model_path(tmp_path, tied):
    src = save_tiny(str(tmp_path / "src"), tied)
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    result = quantize_pretrained(src, str(tmp_path / "stream"), calib(), cfg(), max_shard_size="30KB", log=quiet)
    assert [s["unit"] for s in result.stats] == [0, 1, 2] and result.complete and result.blocks == 3
    assert all(STAT_KEYS <= set(s) and s["seconds"] > 0 and s["rss_bytes"] > 0 and s["cpu_seconds"] > 0
               for s in result.stats)
    assert os.path.exists(tmp_path / "stream" / "model.safetensors.index.json")  # written shard by shard

    ref = whole(src)
    quantize(ref, calib(), cfg(), log=quiet)
    save_quantized(ref, str(tmp_path / "ref"))
    a = load_quantized(str(tmp_path / "stream")).state_dict()
    b = load_quantized(str(tmp_path / "ref")).state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    with open(tmp_path / "stream" / "quant_config.json") as f, open(tmp_path / "ref" / "quant_config.json") as g:
        qa, qb = json.load(f), json.load(g)
    assert qa == qb and (qa["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}) == tied

    # the Hugging Face loader reads it too (fxkernels registers quant_method "flexround" on import)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "stream"))
    with torch.no_grad():
        torch.testing.assert_close(m(calib()[:2]).logits, load_quantized(str(tmp_path / "ref"))(calib()[:2]).logits)


def test_streamed_norm_loss_reads_the_later_norms_like_the_whole_model_path(tmp_path):
    """With the "norm" loss each block's gains come from the later blocks' residual norms and the
    final norm, which the streamed run reads from the files for the moment it needs them: its
    checkpoint equals the whole-model path's, and differs from the "token" loss's."""
    src = save_tiny(str(tmp_path / "src"), False, norm_gains=True)
    quantize_pretrained(src, str(tmp_path / "stream"), calib(), cfg(loss="norm"), log=quiet)
    ref = whole(src)
    quantize(ref, calib(), cfg(loss="norm"), log=quiet)
    save_quantized(ref, str(tmp_path / "ref"))
    a = load_quantized(str(tmp_path / "stream")).state_dict()
    b = load_quantized(str(tmp_path / "ref")).state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    token = whole(src)
    quantize(token, calib(), cfg(loss="token"), log=quiet)
    c = token.state_dict()
    assert any(not torch.equal(b[k], c[k]) for k in b if k.endswith("qweight"))


def test_at_most_one_block_of_float_weights_is_held(tmp_path, monkeypatch):
    """Peak of the float parameters read from the files at once: one block, or one tensor outside
    the blocks, never the model (measured by counting materialized bytes, not by timing)."""
    src = save_tiny(str(tmp_path / "src"), tied=False, layers=4)
    live_peak = {"bytes": 0}
    original = MetaParameters.materialize

    def counting(self, names):
        original(self, names)
        held = sum(self.holders[n][0][0]._parameters[self.holders[n][0][1]].numel() * 4 for n in self.live)
        live_peak["bytes"] = max(live_peak["bytes"], held)

    monkeypatch.setattr(MetaParameters, "materialize", counting)
    quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(iters=2), max_shard_size=None, log=quiet)
    model = whole(src)
    total = sum(p.numel() * 4 for p in model.parameters())
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    embed = model.model.embed_tokens.weight.numel() * 4
    assert 0 < live_peak["bytes"] <= max(block, embed) < total / 3


def test_missing_and_truncated_shards_are_named(tmp_path):
    src = save_tiny(str(tmp_path / "src"), tied=False)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    victim = os.path.join(src, shards[1])
    data = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=shards[1]):
        quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(), log=quiet)
    os.remove(victim)
    with pytest.raises(CheckpointError, match=f"{shards[1]} is missing"):
        quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(), log=quiet)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="source=.*expected a Hugging Face model directory"):
        quantize_pretrained(str(tmp_path), str(tmp_path / "out"), calib(), cfg(), log=quiet)


def test_too_small_budget_and_bad_device(tmp_path):
    src = save_tiny(str(tmp_path / "src"), tied=False)
    with pytest.raises(MemoryBudgetError, match="block 1/3: needs about .* memory_budget=4096 bytes"):
        quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(memory_budget=4096), log=quiet)
    assert not os.path.exists(tmp_path / "out")  # nothing half-written
    with pytest.raises(ValueError, match="device='cuda:7'"):
        quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(), device="cuda:7", log=quiet)


def test_streamed_fingerprint_equals_the_in_memory_one(tmp_path):
    src = save_tiny(str(tmp_path / "src"), tied=True)
    model = _skeleton(src)
    assert streamed_fingerprint(model, MetaParameters(model, SafetensorsSource(src))) == model_fingerprint(whole(src))


def test_resume_continues_a_streamed_run(tmp_path):
    src = save_tiny(str(tmp_path / "src"), tied=False)
    full = quantize_pretrained(src, str(tmp_path / "full"), calib(), cfg(), max_shard_size=None, log=quiet)

    class Interrupt(Exception):
        pass

    def die_after_first(msg):
        if msg.startswith("block 1/3: loss"):
            raise Interrupt

    resume = str(tmp_path / "resume")
    with pytest.raises(Interrupt):
        quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(resume_dir=resume), log=die_after_first)
    assert not os.path.exists(tmp_path / "out")
    lines = []
    # continued with another memory budget (as on another device): not part of the run's identity
    quantize_pretrained(src, str(tmp_path / "out"), calib(), cfg(resume_dir=resume, memory_budget=2**30),
                        max_shard_size=None, log=lines.append)
    assert any("block 1/3: loaded from resume_dir" in x for x in lines)
    a = load_quantized(full.directory).state_dict()
    b = load_quantized(str(tmp_path / "out")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_stream_writes_what_the_in_memory_cli_writes(tmp_path):
    """`flexround quantize --stream` (block by block) and without (whole model) write the same tensors."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from quantizer.cli import main

    src = save_tiny(str(tmp_path / "src"), tied=False, layers=2)
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(src)
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(2, 96, (400,), generator=g)))
    common = ["quantize", "--model", src, "--method", "flexround", "--iters", "3", "--nsamples", "4", "--seqlen", "16",
              "--batch-size", "2", "--calibration", str(text), "--device", "cpu", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert main(common + ["--out", str(tmp_path / "stream"), "--stream", "--max-shard-size", "30KB",
                          "--memory-budget", "1GB"]) == 0
    assert os.path.exists(tmp_path / "stream" / "model.safetensors.index.json")
    a = load_quantized(str(tmp_path / "whole")).state_dict()
    b = load_quantized(str(tmp_path / "stream")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(common + ["--out", str(tmp_path / "x"), "--device", "cuda:9"]) == 2


def test_max_blocks_learns_the_first_blocks_and_writes_nothing(tmp_path):
    src = save_tiny(str(tmp_path / "src"), False)
    out = tmp_path / "out"
    full = quantize_pretrained(src, str(tmp_path / "full"), calib(), cfg(), log=quiet)
    part = quantize_pretrained(src, str(out), calib(), cfg(), max_blocks=2, log=quiet)
    assert part.directory is None and not part.complete and part.blocks == 3
    assert [s["unit"] for s in part.stats] == [0, 1]
    # the blocks it did are the full run's first blocks (same losses: same codes)
    assert [s["loss_after"] for s in part.stats] == [s["loss_after"] for s in full.stats[:2]]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["full", "src"]  # no partial checkpoint
    assert quantize_pretrained(src, str(out), calib(), cfg(), max_blocks=3, log=quiet).complete
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_blocks"):
            quantize_pretrained(src, str(tmp_path / "bad"), calib(), cfg(), max_blocks=bad, log=quiet)


@pytest.mark.parametrize("method", ["flexround", "adaround", "signround"])
def test_recomputing_layers_give_the_same_gradients_and_save_less(method):
    from fxkernels import QuantSpec
    from quantizer.layers import LinearQuant

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    grads, saved = [], []
    for recompute in (False, True):
        torch.manual_seed(1)
        layer = LinearQuant(base, method, QuantSpec(4, "channel"))
        layer.recompute = recompute
        x = torch.randn(3, 5, 64, requires_grad=True)
        nbytes = []

        def pack(t):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        grads.append([y.detach()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None] + [x.grad])
        saved.append(sum(nbytes))
    assert len(grads[0]) == len(grads[1]) >= 3
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert saved[1] < saved[0] - 48 * 64 * 4  # at least the fake-quantized weight is not kept
