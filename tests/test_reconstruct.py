"""The reconstruction engine and quantize() on tiny synthetic models (seconds on 2 cores)."""

import json
import os

import pytest
import torch
from torch import nn

from fxkernels import QuantLinear, QuantSpec
from quantizer.api import prepare_calibration, quantize
from quantizer.blocks import find_blocks
from quantizer.config import QuantizeConfig
from quantizer.reconstruct import QuantizationError

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib(n=8, length=24, seed=0):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def base_cfg(**kw):
    d = dict(method="flexround", weight=QuantSpec(bits=3, granularity="channel"), iters=25, nsamples=8,
             seqlen=24, batch_size=2, progress=False, lr=1e-2)
    d.update(kw)
    return QuantizeConfig(**d)


def quiet(msg):
    pass


@torch.no_grad()
def logits_err(model, ref, ids):
    return float((model(ids).logits - ref).pow(2).mean())


# Tiny ops: thread hand-offs cost more than the work (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref_model():
    m = tiny_llama()
    ids = calib(8, 24, seed=1)
    with torch.no_grad():
        ref = m(ids).logits
    return m.state_dict(), ids, ref


def fresh(state):
    m = tiny_llama()
    m.load_state_dict(state)
    return m


def logits_err_by_method(ref_model, methods=("rtn", "flexround"), **cfg):
    """``{method: logits error of the fresh reference model quantized by it}`` under ``base_cfg(**cfg)``."""
    state, ids, ref = ref_model
    errs = {}
    for method in methods:
        m = fresh(state)
        quantize(m, calib(), base_cfg(method=method, **cfg), log=quiet)
        errs[method] = logits_err(m, ref, ids)
    return errs


def test_flexround_beats_rtn_and_exports_quantlinear(ref_model):
    state, ids, ref = ref_model
    errs = {}
    for method in ("rtn", "flexround"):
        m = fresh(state)
        quantize(m, calib(), base_cfg(method=method), log=quiet)
        errs[method] = logits_err(m, ref, ids)
        q = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
        assert len(q) == 14 and "lm_head" not in q
        assert isinstance(m.lm_head, nn.Linear)
    assert errs["flexround"] < 0.9 * errs["rtn"], errs


def test_token_normalized_loss(ref_model):
    """Each token's error is divided by its target's mean square: a token scaled 1000x weighs the
    same as before, and learning with this loss still beats RTN."""
    from quantizer.engine import reconstruction_loss

    t = torch.randn(2, 5, 16)
    y = t + 0.1 * torch.randn(2, 5, 16)
    base = reconstruction_loss(y, t, "token")
    t2, y2 = t.clone(), y.clone()
    t2[:, 0] *= 1000
    y2[:, 0] *= 1000
    torch.testing.assert_close(reconstruction_loss(y2, t2, "token"), base)
    assert reconstruction_loss(y2, t2, "mse") > 1e4 * reconstruction_loss(y, t, "mse")

    errs = logits_err_by_method(ref_model, loss="token")
    assert errs["flexround"] < 0.9 * errs["rtn"], errs


def test_norm_weighted_loss_gains_and_readers(ref_model):
    """The "norm" loss weighs each output channel by the squared gains of the norms that read the
    block's output on the residual stream (every later block's input and pre-MLP norms, the final
    norm): they are found for LLaMA, Gemma (whose post-attention norm reads no residual) and OPT,
    their gains read for w, 1 + w and LayerNorm parametrizations, a channel with gain 0 does not
    count, and learning with it beats RTN."""
    from quantizer.blocks import find_blocks, norm_gain, output_readers
    from quantizer.engine import norm_channel_weight, reconstruction_loss

    m = fresh(ref_model[0])
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            layer.input_layernorm.weight.copy_(torch.linspace(0.5, 2.0, 64) * (i + 1))
    readers = output_readers(m, find_blocks(m))
    second = m.model.layers[1]
    assert readers == [[second.input_layernorm, second.post_attention_layernorm, m.model.norm], [m.model.norm]]
    torch.testing.assert_close(norm_gain(readers[0][0]), torch.linspace(0.5, 2.0, 64) * 2, rtol=1e-4, atol=0)
    gemma = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64))
    with torch.no_grad():
        gemma.model.norm.weight.fill_(0.25)
    g_readers = output_readers(gemma, find_blocks(gemma))
    g1 = gemma.model.layers[1]
    assert g_readers == [[g1.input_layernorm, g1.pre_feedforward_layernorm, gemma.model.norm], [gemma.model.norm]]
    torch.testing.assert_close(norm_gain(g_readers[-1][0]), torch.full((64,), 1.25), rtol=1e-4, atol=0)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64))
    o1, dec = opt.model.decoder.layers[1], opt.model.decoder
    assert output_readers(opt, find_blocks(opt)) == [[o1.self_attn_layer_norm, o1.final_layer_norm,
                                                      dec.final_layer_norm], [dec.final_layer_norm]]
    assert norm_gain(o1.final_layer_norm) is not None

    gain = torch.ones(16)
    gain[3] = 0.0
    w = norm_channel_weight([gain, 2 * gain])  # each norm's squared gains scaled to mean 1, then averaged
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w, norm_channel_weight([gain]))
    assert norm_channel_weight([]) is None
    t = torch.randn(2, 5, 16)
    y = t.clone()
    y[..., 3] += 5.0  # an error only where the next norm's gain is 0
    assert float(reconstruction_loss(y, t, "norm", w)) == 0.0 and float(reconstruction_loss(y, t, "token")) > 0
    torch.testing.assert_close(reconstruction_loss(y, t, "norm", None), reconstruction_loss(y, t, "token"))

    errs = logits_err_by_method(ref_model, loss="norm")
    assert errs["flexround"] < 0.9 * errs["rtn"], errs


def _massive_channel_model(state, damp):
    """The reference model with channel 0 of the embeddings 200x larger, so that it holds most of
    the residual stream's energy, and (``damp``) every norm's gain on that channel 0.01."""
    m = fresh(state)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] *= 200
        if damp:
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p[0] = 0.01
    return m


def test_auto_loss_weighs_by_the_gains_only_where_they_damp_the_streams_energy(ref_model):
    """``loss="auto"`` (the default) picks the "norm" weighting for a block whose readers damp the
    channels holding the stream's energy (Gemma 3) and the "token" loss where they do not
    (SmolLM2): the checkpoint equals the one of the loss it chose, and the choice is logged."""
    from quantizer.engine import AUTO_NORM_BELOW, auto_channel_weight, energy_through_gains

    assert QuantizeConfig().loss == "auto"
    t = torch.randn(4, 6, 16)
    uniform = torch.ones(16)
    assert energy_through_gains(t, uniform) == pytest.approx(1.0, abs=1e-6)
    t[..., 5] = 100.0  # channel 5 holds nearly all the energy
    damped = torch.full((16,), 16 / 15.001)
    damped[5] = 0.001 * 16 / 15.001  # mean 1
    assert energy_through_gains(t, damped) < 0.01 < AUTO_NORM_BELOW
    assert energy_through_gains(t, uniform) == pytest.approx(1.0, abs=1e-6)
    w, why = auto_channel_weight(t, damped)
    assert w is damped and why.startswith("norm loss")
    assert auto_channel_weight(t, uniform)[0] is None
    assert auto_channel_weight(t, None) == (None, "token loss (no norm reads this output)")

    state = ref_model[0]

    def qweights(loss, damp, log=quiet):
        m = _massive_channel_model(state, damp)
        quantize(m, calib(), base_cfg(loss=loss), log=log)
        return {k: v for k, v in m.state_dict().items() if k.endswith("qweight")}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    lines = []
    auto_damped = qweights("auto", True, lines.append)
    assert [ln.split("; ")[-1].split(" ")[0] for ln in lines if ln.startswith("block ")] == ["norm", "norm"], lines
    assert same(auto_damped, qweights("norm", True)) and not same(auto_damped, qweights("token", True))
    assert same(qweights("auto", False), qweights("token", False))


def test_w8a8_static_activations_are_exported(ref_model):
    state, ids, ref = ref_model
    m = fresh(state)
    quantize(m, calib(), base_cfg(weight=QuantSpec(bits=8, granularity="tensor"), act_bits=8), log=quiet)
    layer = m.model.layers[1].mlp.down_proj
    assert layer.spec.act_bits == 8 and layer.spec.act_mode == "static"
    assert layer.act_scale.shape == (1,) and float(layer.act_scale) > 0
    # W8A8 on a random tiny model stays close to the float model.
    assert logits_err(m, ref, ids) < 0.05 * float(ref.pow(2).mean())


def test_deterministic_under_seed(ref_model):
    state, _, _ = ref_model
    runs = []
    for _ in range(2):
        m = fresh(state)
        quantize(m, calib(), base_cfg(iters=8, qdrop=0.5), log=quiet)
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_resume_continues_after_last_finished_block(ref_model, tmp_path):
    state, _, _ = ref_model
    full = fresh(state)
    quantize(full, calib(), base_cfg(iters=8), log=quiet)

    class Interrupt(Exception):
        pass

    def die_after_first(msg):
        if msg.startswith("block 1/2: loss"):
            raise Interrupt

    rd = str(tmp_path / "resume")
    with pytest.raises(Interrupt):
        quantize(fresh(state), calib(), base_cfg(iters=8, resume_dir=rd), log=die_after_first)
    man = json.load(open(os.path.join(rd, "manifest.json")))
    assert man["finished"] == 1 and os.path.exists(os.path.join(rd, "block_000.safetensors"))
    lines = []
    resumed = fresh(state)
    quantize(resumed, calib(), base_cfg(iters=8, resume_dir=rd), log=lines.append)
    assert any("resuming" in line for line in lines) and any("loaded from resume_dir" in line for line in lines)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="another configuration.*iters"):
        quantize(fresh(state), calib(), base_cfg(iters=9, resume_dir=rd), log=quiet)
    with pytest.raises(ValueError, match="another model"):
        quantize(tiny_llama(seed=5), calib(), base_cfg(iters=8, resume_dir=rd), log=quiet)


def test_resume_redoes_the_smoothing_of_loaded_blocks(ref_model, tmp_path):
    """SmoothQuant rescales a block's norms, which the resume files do not hold: a resumed W8A8
    run smooths the loaded blocks again and ends bit-identical to an uninterrupted one."""
    state, ids, _ = ref_model
    cfg = dict(weight=QuantSpec(bits=8, granularity="tensor"), act_bits=8, smooth=0.5, iters=3)
    full = fresh(state)
    quantize(full, calib(), base_cfg(**cfg), log=quiet)

    class Interrupt(Exception):
        pass

    def die_after_first(msg):
        if msg.startswith("block 1/2: loss"):
            raise Interrupt

    rd = str(tmp_path / "resume")
    with pytest.raises(Interrupt):
        quantize(fresh(state), calib(), base_cfg(**cfg, resume_dir=rd), log=die_after_first)
    lines = []
    resumed = fresh(state)
    quantize(resumed, calib(), base_cfg(**cfg, resume_dir=rd), log=lines.append)
    assert any("block 1/2: loaded from resume_dir" in line for line in lines)
    assert any("block 1/2: smoothed" in line for line in lines)
    a, b = full.state_dict(), resumed.state_dict()
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(a[norm], state[norm])  # smoothing did rescale it
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_calibration_and_config():
    m = tiny_llama()
    with pytest.raises(ValueError, match=r"too short.*nsamples=8 x seqlen=24"):
        quantize(m, calib(4, 24), base_cfg(), log=quiet)
    with pytest.raises(ValueError, match="too short"):
        quantize(m, [torch.arange(50)], base_cfg(), log=quiet)
    with pytest.raises(ValueError, match="vocab_size"):
        quantize(m, calib() + 1000, base_cfg(), log=quiet)
    with pytest.raises(ValueError, match="method='gptq'"):
        QuantizeConfig(method="gptq")
    with pytest.raises(ValueError, match="batch_size=9"):
        QuantizeConfig(nsamples=8, batch_size=9)
    with pytest.raises(ValueError, match="act_bits=1"):
        QuantizeConfig(act_bits=1)
    with pytest.raises(ValueError, match="act_bits=4.*language model"):  # the int8 kernels' width only
        quantize(m, calib(), base_cfg(act_bits=4), log=quiet)
    with pytest.raises(ValueError, match="first_last=W8.*language model"):
        quantize(m, calib(), base_cfg(first_last=QuantSpec(bits=8)), log=quiet)
    with pytest.raises(ValueError, match="first_last=.*weight-only"):
        QuantizeConfig(first_last=QuantSpec(bits=8, act_bits=8, act_mode="static"))
    with pytest.raises(ValueError, match="loss='l1'"):
        QuantizeConfig(loss="l1")
    ids = prepare_calibration([torch.arange(30), torch.arange(30)[None]], nsamples=2, seqlen=25)
    assert ids.shape == (2, 25) and int(ids[1, 0]) == 25


def test_unsupported_architecture():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="unsupported architecture Sequential"):
        quantize(model, calib(), base_cfg(), log=quiet)


def test_non_finite_loss_stops_block_and_keeps_finished(ref_model):
    state, _, _ = ref_model
    m = fresh(state)

    def poison(module, args, out):
        return out * float("inf")

    m.model.layers[1].mlp.register_forward_hook(poison)
    with pytest.raises(QuantizationError, match=r"block 2/2: the loss became (nan|inf)"):
        quantize(m, calib(), base_cfg(iters=3), log=quiet)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)      # finished block kept
    assert isinstance(m.model.layers[1].mlp.down_proj, nn.Linear)        # failed block back to float


def test_skip_and_float_layers_warning(ref_model):
    state, _, _ = ref_model
    m = fresh(state)
    with pytest.warns(UserWarning, match="left in float.*lm_head"):
        quantize(m, calib(), base_cfg(iters=0, skip=("down_proj",)), log=quiet)
    assert isinstance(m.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    assert find_blocks(m).path == "model.layers"


@pytest.mark.parametrize("method", ["adaround", "signround"])
def test_baselines_lower_block_losses(ref_model, method):
    import re

    state, _, _ = ref_model
    lines = []
    options = {"reg_weight": 0.05} if method == "adaround" else {}
    quantize(fresh(state), calib(), base_cfg(method=method, lr=None, iters=40, options=options), log=lines.append)
    pairs = [tuple(map(float, m.groups())) for m in
             (re.search(r"loss ([0-9.e+-]+) -> ([0-9.e+-]+)", line) for line in lines) if m]
    assert len(pairs) == 2
    assert all(after <= before for before, after in pairs)
    assert any(after < 0.95 * before for before, after in pairs), pairs


def test_checkpoint_roundtrip(ref_model, tmp_path):
    import fxkernels

    state, ids, _ = ref_model
    m = fresh(state)
    quantize(m, calib(), base_cfg(iters=5, act_bits=8), log=quiet)
    with torch.no_grad():
        before = m(ids).logits
    fxkernels.save_quantized(m, str(tmp_path / "ckpt"))
    loaded = fxkernels.load_quantized(str(tmp_path / "ckpt"))
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_other_architectures(arch):
    torch.manual_seed(0)
    if arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    else:
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            word_embed_proj_dim=64))
    model.eval()
    ids = calib(8, 16)
    with torch.no_grad():
        ref = model(ids)[0]
    with pytest.warns(UserWarning, match="pooler.dense") if arch == "bert" else _no_warning():
        quantize(model, ids, base_cfg(weight=QuantSpec(bits=4), iters=5, seqlen=16), log=quiet)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 12
    with torch.no_grad():
        out = model(ids)[0]
    assert float((out - ref).pow(2).mean()) < 0.05 * float(ref.pow(2).mean())


def _no_warning():
    import contextlib
    return contextlib.nullcontext()


@pytest.mark.slow
def test_smollm2_flexround_w4_beats_rtn():
    """Real model, short schedule: FlexRound W4 per-channel must beat RTN on the same grid init."""
    from quantizer.data import calibration_ids
    from quantizer.evaluate import perplexity
    from quantizer.models import load_smollm2, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:  # pragma: no cover - setup_env.sh installs it
        pytest.skip(str(e))

    ppl = {}
    for method in ("rtn", "flexround"):
        model, tok = load_smollm2(log=quiet)
        ids = calibration_ids(tok, 8, 128, seed=0)
        quantize(model, ids, QuantizeConfig(method=method, weight=QuantSpec(bits=4, granularity="channel"),
                                            iters=20, nsamples=8, seqlen=128, eval_samples=2,
                                            progress=False), log=quiet)
        ppl[method] = perplexity(model, tok, windows=3, progress=False)
    assert ppl["flexround"] < ppl["rtn"], ppl


def test_smoothing_preserves_the_float_block_and_runs_w8a8(ref_model):
    from quantizer.smooth import smooth_block, smoothing_pairs

    state, ids, ref = ref_model
    m = fresh(state)
    block = m.model.layers[0]
    assert [c for _, _, cs in smoothing_pairs(block) for c in cs] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "self_attn.o_proj"]
    g = torch.Generator().manual_seed(0)
    absmax = {"self_attn.q_proj": torch.rand(64, generator=g) * 50, "self_attn.k_proj": torch.rand(64, generator=g),
              "self_attn.v_proj": torch.rand(64, generator=g), "mlp.gate_proj": torch.rand(64, generator=g) * 9,
              "mlp.up_proj": torch.rand(64, generator=g), "mlp.down_proj": torch.rand(128, generator=g) * 100,
              "self_attn.o_proj": torch.rand(64, generator=g) * 20}
    down_before = block.mlp.down_proj.weight.clone()
    o_before = block.self_attn.o_proj.weight.clone()
    assert len(smooth_block(block, absmax, 0.5)) == 7
    assert not torch.equal(block.mlp.down_proj.weight, down_before)
    # grouped-query attention (4 query heads, 2 value heads): the two query heads that read one
    # value head got the same column factors, which is what keeps the logits below unchanged
    ratio = (block.self_attn.o_proj.weight / o_before).mean(0).view(2, 2, 16)
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    torch.testing.assert_close(ratio[:, 0], ratio[:, 1])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha=1.5"):
        smooth_block(block, absmax, 1.5)
    with pytest.raises(ValueError, match="smooth=2"):
        QuantizeConfig(smooth=2)

    m = fresh(state)
    quantize(m, calib(), base_cfg(weight=QuantSpec(bits=8, granularity="tensor"), act_bits=8, smooth=0.5), log=quiet)
    assert logits_err(m, ref, ids) < 0.05 * float(ref.pow(2).mean())


def test_flexround_default_step_size_follows_weight_bits():
    lr = {b: QuantizeConfig(weight=QuantSpec(bits=b, granularity="channel")).learning_rate for b in (2, 3, 4, 6, 8)}
    assert lr[2] == lr[3] == lr[4] == 6e-3 and lr[8] == 1e-3 and 1e-3 < lr[6] < 6e-3
    assert QuantizeConfig(weight=QuantSpec(bits=8, granularity="tensor"), lr=5e-3).learning_rate == 5e-3
    assert QuantizeConfig(method="adaround", weight=QuantSpec(bits=8, granularity="tensor")).learning_rate == 1e-2


def test_config_round_trip_and_resume_identity():
    """``first_last`` survives to_dict/from_dict (as a dict in JSON); left at None it is not part of
    the resume identity, so directories written before the field existed still match."""
    cfg = base_cfg(first_last=QuantSpec(bits=8, granularity="tensor"))
    back = QuantizeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.first_last == QuantSpec(bits=8, granularity="tensor")
    assert "first_last" in cfg.fingerprint_dict()
    assert "first_last" not in base_cfg().fingerprint_dict()
    assert base_cfg(options={"reg_weight": 0.3, "s1_lr_scale": 0.5}).rounding_options() == \
        {"s1_lr_scale": 0.5, "init": "mse"}
    assert base_cfg(method="signround").rounding_options() == {}  # SignRound takes no init
