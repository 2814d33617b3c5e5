"""Every decoder/encoder family the engine claims: its blocks, run the way the engine runs them
(block 0's captured inputs, the keyword arguments the engine hands each block, one block after
another), reproduce the full model's own hidden states in fp32.

A block run with the wrong arguments teaches the quantizer the wrong target: Gemma 2/3 and Qwen2
alternate sliding-window and global attention layers, and Gemma 3's local layers use another rotary
base, so each block needs the mask and position embeddings of its own layer type, not block 0's.
The tiny models have sliding windows shorter than the calibration windows (else the two masks
agree) and larger-than-default random weights (else attention is near uniform and a wrong mask or
rotary base changes little).
"""

import pytest
import torch

from quantizer.blocks import BlockLayout, find_blocks
from quantizer.config import QuantizeConfig
from quantizer.engine import run_stream
from quantizer.reconstruct import BlockFamily, capture_inputs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, LAYERS, WINDOW, SEQ = 128, 64, 6, 8, 32
INIT = 0.2   # initializer_range: weights large enough that attention is far from uniform


def _decoder(**kw):
    d = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=INIT)
    d.update(kw)
    return d


SLIDING_FIRST = ["sliding_attention", "sliding_attention", "full_attention"] * (LAYERS // 3)


def build(family: str):
    t = transformers
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**_decoder()))
    if family == "smollm3":  # per-layer NoPE layers (decided inside the layer) and a sliding window
        return t.SmolLM3ForCausalLM(t.SmolLM3Config(**_decoder(no_rope_layers=[1, 1, 1, 0] * (LAYERS // 4 + 1),
                                                               pad_token_id=0, use_sliding_window=True,
                                                               sliding_window=WINDOW, max_window_layers=2)))
    if family == "mistral":  # one sliding window for every layer
        return t.MistralForCausalLM(t.MistralConfig(**_decoder(sliding_window=WINDOW)))
    if family == "qwen2":  # global layers below max_window_layers, sliding above
        return t.Qwen2ForCausalLM(t.Qwen2Config(**_decoder(use_sliding_window=True, sliding_window=WINDOW,
                                                           max_window_layers=2)))
    if family == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**_decoder(pad_token_id=0)))
    if family == "gemma2":  # alternating sliding/global, soft-capped attention logits, 1 + w norms
        return t.Gemma2ForCausalLM(t.Gemma2Config(**_decoder(head_dim=16, sliding_window=WINDOW)))
    if family == "gemma3":  # five local layers per global one in the real model; local rotary base 10k vs 1M
        cfg = t.Gemma3TextConfig(**_decoder(head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_FIRST))
        base = cfg.rope_parameters
        assert base["sliding_attention"]["rope_theta"] != base["full_attention"]["rope_theta"]
        return t.Gemma3ForCausalLM(cfg)
    if family == "opt":
        return t.OPTForCausalLM(t.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN,
                                            num_hidden_layers=LAYERS, num_attention_heads=4,
                                            max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                                            init_std=INIT))
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                              n_positions=128, initializer_range=INIT))
    if family == "gpt_neo":  # alternating global/local (window inside the layer)
        return t.GPTNeoForCausalLM(t.GPTNeoConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                                                  num_heads=4, attention_types=[[["global", "local"], LAYERS // 2]],
                                                  window_size=WINDOW, max_position_embeddings=128,
                                                  initializer_range=INIT))
    if family == "bert":
        return t.BertForMaskedLM(t.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                              num_attention_heads=4, intermediate_size=2 * HIDDEN,
                                              max_position_embeddings=128, initializer_range=INIT))
    raise AssertionError(family)


FAMILIES = ["llama", "smollm3", "mistral", "qwen2", "phi3", "gemma2", "gemma3", "opt", "gpt2", "gpt_neo", "bert"]


def _model(family):
    torch.manual_seed(0)
    model = build(family).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def _reference(model, layout, ids):
    """Each block's output inside the model's own forward (one window at a time, as captured),
    and HF's ``hidden_states`` (whose last entry may have the final norm applied)."""
    outs = [[] for _ in layout.blocks]
    hidden = []

    def hook(i):
        def f(module, args, out):
            outs[i].append((out[0] if isinstance(out, (tuple, list)) else out)[0].clone())
        return f

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(layout.blocks)]
    try:
        for row in ids:
            hidden.append(model(row[None], output_hidden_states=True).hidden_states)
    finally:
        for h in handles:
            h.remove()
    per_block = [torch.stack(o) for o in outs]
    hf = [torch.cat([h[j] for h in hidden]) for j in range(len(hidden[0]))]
    return per_block, hf


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_blocks_reproduce_model_hidden_states(family):
    model = _model(family)
    if family == "gpt2":
        # GPT-2's blocks hold Conv1D, not nn.Linear: find_blocks rejects the model (nothing to
        # quantize); the capture and block runs are still checked on its block list.
        with pytest.raises(ValueError, match="Conv1D"):
            find_blocks(model)
        layout = BlockLayout("transformer.h", "decoder", list(model.transformer.h), [])
    else:
        layout = find_blocks(model)
    assert len(layout.blocks) == LAYERS
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    x, kw = capture_inputs(model, layout, ids)
    per_block, hf = _reference(model, layout, ids)
    # block 0's captured input is the model's embedding output (Gemma's sqrt(hidden) scale included)
    torch.testing.assert_close(x, hf[0], rtol=0, atol=0)

    family_ = BlockFamily(layout, kw, QuantizeConfig(method="rtn", progress=False), lambda m: None)
    units = list(family_.units())
    assert len(units) == LAYERS
    h = x
    worst = []
    for i, unit in enumerate(units):
        h = run_stream(unit.forward, h, 2)   # mini-batches of 2 windows, as the engine streams them
        ref = per_block[i]
        err = float((h - ref).abs().max() / ref.abs().max())
        worst.append(err)
        if i < LAYERS - 1:   # HF's last hidden state may be the final norm's output
            torch.testing.assert_close(ref, hf[i + 1], rtol=0, atol=0)
    bad = {i: f"{e:.1e}" for i, e in enumerate(worst) if e > 1e-6}
    assert not bad, f"{family}: blocks whose engine output differs from the model's (max rel. error): {bad}"


@pytest.mark.parametrize("family,distinct", [("llama", 1), ("mistral", 1), ("qwen2", 2), ("gemma2", 2), ("gemma3", 2),
                                             ("gpt_neo", 1), ("bert", 1)])
@torch.no_grad()
def test_one_kwargs_set_per_layer_type(family, distinct):
    """Blocks of one layer type share one captured dict (memory: one set per type), and a model
    with one layer type gives every block block 0's very arguments, as before per-block capture."""
    model = _model(family)
    layout = find_blocks(model)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    _, kw = capture_inputs(model, layout, ids)
    assert len(kw) == LAYERS and kw.distinct() == distinct
    types = getattr(model.config, "layer_types", None)
    if types and distinct > 1:
        for i in range(LAYERS):
            for j in range(LAYERS):
                assert (kw[i] is kw[j]) == (types[i] == types[j])
