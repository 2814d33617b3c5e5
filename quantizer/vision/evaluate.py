"""Fidelity of a quantized classifier to its float original: top-1 agreement and mean KL.

Top-1 agreement counts the images whose arg-max class is the same; mean KL is
``KL(p_fp || p_q)`` of the softmax outputs averaged over images (in nats). KL sees changes that
agreement hides (confidence lost without a flip), which matters with few evaluation photos.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[s:s + batch]).float() for s in range(0, images.shape[0], batch)])


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> Dict[str, float]:
    """``{"top1_agreement": fraction, "mean_kl": nats, "n": count}`` of ``test`` against ``ref``."""
    if ref.shape != test.shape or ref.dim() != 2:
        raise ValueError(f"compare_logits: shapes {tuple(ref.shape)} and {tuple(test.shape)}; expected equal [n, classes]")
    lp, lq = ref.log_softmax(-1), test.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    agree = (ref.argmax(-1) == test.argmax(-1)).float()
    return {"top1_agreement": float(agree.mean()), "mean_kl": float(kl.mean()), "n": int(ref.shape[0])}


def agreement(fp_model: nn.Module, q_model: nn.Module, images: torch.Tensor, batch: int = 32) -> Dict[str, float]:
    return compare_logits(logits(fp_model, images, batch), logits(q_model, images, batch))
