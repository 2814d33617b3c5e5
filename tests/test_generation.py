"""fxkernels.Generator: the static-cache engine against Hugging Face on tiny random models of
every family it claims, eager and compiled, batch with left padding, sampling and stop tokens."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fxkernels import QuantSpec, replace_linears  # noqa: E402
from fxkernels.generation import Generator, Sampling, UnsupportedModelError  # noqa: E402

VOCAB = 128


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=5)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)  # q/k/v carry biases
    if family == "qwen3":
        return transformers.Qwen3Config(**common)  # q/k norms
    if family == "gemma":
        return transformers.GemmaConfig(**common)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, sliding_window=4, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=3.0, query_pre_attn_scalar=24)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**dict(common, num_hidden_layers=3), sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             query_pre_attn_scalar=24, final_logit_softcapping=3.0)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


def _model(family: str, quantize: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for p in model.parameters():  # large random weights: logits far apart, greedy choices stable
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    if quantize:
        replace_linears(model, QuantSpec(4, "channel"), skip=("lm_head",))
    # no end-of-sequence token: with one, generate()'s min_new_tokens masks it out of the greedy
    # choice, and a model whose argmax is that token would differ from the engine by design
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(autouse=True)
def eager_layers_at_the_engines_digits():
    """The engine decodes with activation_digits="auto" unless told otherwise; the Hugging Face
    side of each comparison runs the same CPU kernels at the same setting."""
    try:
        from fxkernels.backends import cpu
    except ImportError:
        yield
        return
    with cpu.activation_digits("auto"):
        yield


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_step_logits_equal_hf_forward(family):
    """Every step's logits (prefill, then decode) equal the HF model's on the whole sequence."""
    model = _model(family)
    ids = torch.randint(0, VOCAB, (1, 6))
    out = Generator(copy.deepcopy(model), compile=False).generate(ids, max_new_tokens=8)
    full = out.sequences
    want = _hf_logits(model, full)[0, ids.shape[1] - 1:-1]
    got = torch.stack([_engine_logits(model, full[:, :n]) for n in range(ids.shape[1], full.shape[1])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _engine_logits(model, ids):
    """The engine's last-token logits for ``ids`` (prefill only)."""
    g = Generator(model, compile=False, fuse=False)
    captured = []
    orig = g.decoder.forward
    g.decoder.forward = lambda *a: captured.append(orig(*a)) or captured[-1]
    g.generate(ids, max_new_tokens=1)
    logits, _ = captured[0]
    return logits[0].float()


def _greedy_by_full_forward(model, ids, n):
    seq = ids
    for _ in range(n):
        seq = torch.cat([seq, _hf_logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_hf(family):
    """Greedy tokens equal the model's own definition (its full forward, re-run per token) and,
    except for Gemma 3, Hugging Face generate(): with a sliding window shorter than the sequence
    (4 here), generate()'s sliding cache for Gemma 3 diverges from the model's full forward."""
    model = _model(family)
    ids = torch.randint(0, VOCAB, (1, 5))
    got = Generator(model, compile=False).generate(ids, max_new_tokens=12).tokens
    assert torch.equal(got, _greedy_by_full_forward(model, ids, 12))
    if family != "gemma3":
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[:, 5:]
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batch_with_left_padding_equals_each_row_alone(family):
    model = _model(family)
    g = Generator(model, compile=False)
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 3))
    pad = g.pad_token
    ids = torch.cat([a, torch.cat([torch.full((1, 4), pad), b], dim=1)])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    both = g.generate(ids, attention_mask=mask, max_new_tokens=6).tokens
    assert torch.equal(both[0], g.generate(a, max_new_tokens=6).tokens[0])
    assert torch.equal(both[1], g.generate(b, max_new_tokens=6).tokens[0])
    if family != "gemma3":  # see test_greedy_tokens_equal_hf
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(both, want[:, 7:])


def test_compiled_step_equals_eager_and_hf():
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (2, 5))
    eager = Generator(copy.deepcopy(model), compile=False).generate(ids, max_new_tokens=10)
    comp = Generator(model, compile=True).generate(ids, max_new_tokens=10)
    assert torch.equal(eager.tokens, comp.tokens)
    assert comp.compile_seconds > 0
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[:, 5:]
    assert torch.equal(comp.tokens, want)


@pytest.mark.parametrize("digits", [2, 4])
def test_compiled_step_with_its_activation_digits_equals_hf_under_the_same_setting(digits):
    """Generator(activation_digits=n) reaches both the compiled step (pinned when it is prepared)
    and the eager prefill, so the engine reproduces Hugging Face's tokens under the same setting;
    the process's own setting is back once generate() returns."""
    cpu = pytest.importorskip("fxkernels.backends.cpu")
    model = _model("qwen2")
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    gen = Generator(copy.deepcopy(model), activation_digits=digits)
    got = gen.generate(ids, max_new_tokens=10).tokens
    assert cpu.activation_digits_in_use() == "auto"  # this module's fixture
    with cpu.activation_digits(digits), torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[:, 5:]
    assert torch.equal(got, want)
    if cpu.active_isa() in cpu.LIMB_ISAS:
        layer = gen.decoder.layers[0]
        if layer.fused_args is not None:  # the pinned count: 0 is "auto"
            assert [int(p[5]) for p in layer.fused_args[4:12:2]] == [digits] * 4


def test_two_generators_in_one_process_each_run_their_own_model():
    """The step skips guards on the model's modules, so dynamo must still tell two engines apart:
    the second model has the same shapes but other constants baked into a graph (its norms' eps)."""
    ids = torch.randint(0, VOCAB, (1, 5))
    models = [_model("llama", seed=1), _model("llama", seed=2)]
    models[1].config.rms_norm_eps = 0.5
    for m in models[1].modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.5
    got = [Generator(copy.deepcopy(m)).generate(ids, max_new_tokens=8).tokens for m in models]
    for m, tokens in zip(models, got):
        with torch.no_grad():
            want = m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, 5:]
        assert torch.equal(tokens, want)


def test_warm_up_compiles_the_graph_the_real_steps_run():
    """The warm-up call is the step's only compilation for a shape: no real step recompiles (one
    did, for 2 s, while the warm-up passed one tensor as both token ids and positions)."""
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    g = Generator(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = g.generate(ids, max_new_tokens=6)
    assert out.compile_seconds > 0 and out.tokens.shape == (2, 6)


def test_compiled_step_follows_new_batch_and_cache_shapes():
    """The compiled step skips guards on the model's modules; its own inputs still carry the batch
    size and cache length, so each new shape gets its own graph with the right results."""
    model = _model("qwen2")
    eager = Generator(copy.deepcopy(model), compile=False)
    comp = Generator(model, compile=True)
    for batch, prompt, new in ((1, 4, 6), (3, 4, 6), (1, 150, 4), (1, 5, 6)):
        ids = torch.randint(0, VOCAB, (batch, prompt))
        assert torch.equal(comp.generate(ids, new).tokens, eager.generate(ids, new).tokens), (batch, prompt)


def test_stop_tokens_and_streamer():
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (2, 4))
    g = Generator(model, compile=False)
    free = g.generate(ids, max_new_tokens=10).tokens
    stop = int(free[0, 2])  # row 0 stops at its third token
    seen = []
    out = g.generate(ids, max_new_tokens=10, stop_tokens=[stop], streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out.tokens)
    first = (out.tokens[0] == stop).nonzero()[0, 0]
    assert torch.equal(out.tokens[0, :first + 1], free[0, :first + 1])
    assert bool((out.tokens[0, first + 1:] == g.pad_token).all())
    hits = (free[1] == stop).nonzero()
    if hits.numel() == 0:  # row 1 never stops: the run goes to max_new_tokens, row 1 unchanged
        assert torch.equal(out.tokens[1], free[1])


def test_sampling_is_seeded_and_respects_top_k():
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (1, 4))
    g = Generator(model, compile=False)
    s = Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=3)
    a, b = g.generate(ids, 12, sampling=s).tokens, g.generate(ids, 12, sampling=s).tokens
    assert torch.equal(a, b)
    c = g.generate(ids, 12, sampling=Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=4)).tokens
    greedy = g.generate(ids, 12).tokens
    assert not (torch.equal(a, c) and torch.equal(a, greedy))
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(g.generate(ids, 12, sampling=Sampling(temperature=2.0, top_k=1, seed=0)).tokens, greedy)


def test_filtered_logits_top_p_keeps_the_crossing_token():
    from fxkernels.generation.sampling import filtered_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filtered_logits(logits, Sampling(temperature=1.0, top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filtered_logits(logits, Sampling(temperature=1.0, top_k=3)))
    assert kept.tolist() == [[True, True, True, False]]


def test_bad_input_errors():
    model = _model("llama")
    g = Generator(model, compile=False, max_length=16)
    ids = torch.randint(0, VOCAB, (1, 10))
    with pytest.raises(ValueError, match="max_length=16"):
        g.generate(ids, max_new_tokens=7)
    with pytest.raises(ValueError, match="int64"):
        g.generate(ids.int(), max_new_tokens=2)
    with pytest.raises(ValueError, match="left padding"):
        g.generate(ids, attention_mask=torch.cat([torch.ones(1, 9), torch.zeros(1, 1)], 1).long(), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        g.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Generator(model, compile=False).generate(ids, max_new_tokens=300)
    with pytest.raises(ValueError, match="meta"):
        g.generate(ids.to("meta"), max_new_tokens=2)
    for bad in (3, "4", 4.0, True):
        with pytest.raises(ValueError, match=rf"activation_digits={bad!r}; expected 2, 4 or 'auto'"):
            Generator(model, activation_digits=bad)


def test_unknown_architecture_names_itself_and_the_way_back():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2'.*model.generate\(\)"):
        Generator(model)
