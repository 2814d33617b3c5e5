"""Quality metrics: perplexity by the project's protocol (../shared/data/README.md)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .data import eval_text


@torch.no_grad()
def perplexity(model, tokenizer, text: Optional[str] = None, windows: int = 12, seqlen: int = 512,
               progress: bool = True) -> float:
    """exp(mean cross-entropy) over ``windows`` consecutive ``seqlen``-token windows from the start
    of the evaluation text (no special tokens; fp32 logits). ``windows=0`` uses every full window."""
    text = eval_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"perplexity: text has {ids.numel()} tokens; expected at least seqlen={seqlen}")
    n = available if windows in (0, None) else min(windows, available)
    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    it = range(n)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="perplexity", unit="window", leave=False)
    for i in it:
        chunk = ids[i * seqlen:(i + 1) * seqlen][None].to(device)
        logits = model(chunk).logits.float()
        loss = F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total += float(loss)
        count += seqlen - 1
    return math.exp(total / count)
