"""Calibration and evaluation text (shipped in quantizer/data, see its README for attribution)."""

from __future__ import annotations

import os
from typing import Optional

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
WIKI_PATH = os.path.join(DATA_DIR, "wiki_en.txt")
EVAL_CHARS = 400_000  # the last 10 articles: the fixed evaluation split


def _wiki() -> str:
    with open(WIKI_PATH, encoding="utf-8") as f:
        return f.read()


def calibration_text() -> str:
    """The calibration split: everything but the last 400,000 characters."""
    return _wiki()[:-EVAL_CHARS]


def eval_text() -> str:
    """The evaluation split: the last 400,000 characters (never used for calibration)."""
    return _wiki()[-EVAL_CHARS:]


DATASET_PREFIX = "dataset:"


def dataset_text(spec: str, max_chars: int = 5_000_000) -> str:
    """Text of a Hugging Face ``datasets`` dataset: ``dataset:NAME[:CONFIG[:SPLIT[:FIELD]]]``
    (split ``train`` and field ``text`` by default), rows joined by blank lines up to ``max_chars``."""
    parts = spec[len(DATASET_PREFIX):].split(":")
    if not parts[0]:
        raise ValueError(f"calibration: {spec!r}; expected dataset:NAME[:CONFIG[:SPLIT[:FIELD]]], "
                         "e.g. dataset:wikitext:wikitext-2-raw-v1:train:text")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else "text"
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"calibration: {spec!r} needs the `datasets` package (pip install datasets), or give a "
                         "text file or a directory of .txt files instead") from e
    ds = datasets.load_dataset(name, config, split=split)
    if field not in ds.column_names:
        raise ValueError(f"calibration: dataset {name!r} has columns {ds.column_names}; field {field!r} is not one")
    out, size = [], 0
    for row in ds:
        t = row[field]
        if t and t.strip():
            out.append(t)
            size += len(t)
            if size >= max_chars:
                break
    return "\n\n".join(out)


def read_text(path: str) -> str:
    """A text file, every .txt/.md file of a directory concatenated in name order, or a
    ``dataset:NAME[:CONFIG[:SPLIT[:FIELD]]]`` spec read with the ``datasets`` package."""
    if path.startswith(DATASET_PREFIX):
        return dataset_text(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".txt", ".md")))
        if not names:
            raise ValueError(f"calibration: directory {path!r} holds no .txt or .md files")
        return "\n\n".join(read_text(os.path.join(path, n)) for n in names)
    if not os.path.isfile(path):
        raise ValueError(f"text path {path!r} does not exist; expected a text file or a directory of them")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def calibration_ids(tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                    text: Optional[str] = None) -> torch.LongTensor:
    """``[nsamples, seqlen]`` token windows drawn at seeded random offsets of the calibration text."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"calibration_ids: nsamples={nsamples}, seqlen={seqlen}; expected positive integers")
    text = calibration_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < nsamples * seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens; nsamples={nsamples} x seqlen={seqlen} "
                         f"needs at least {nsamples * seqlen}: give more text or lower nsamples/seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
