"""Fidelity of a quantized classifier to its float original: top-1 agreement and mean KL.

Top-1 agreement counts the images whose arg-max class is the same; mean KL is
``KL(p_fp || p_q)`` of the softmax outputs averaged over images (in nats). KL sees changes that
agreement hides (confidence lost without a flip), which matters with few evaluation photos.

Without labels, an image on which the float network itself nearly ties between two classes
flips under any perturbation (on the project's evaluation crops 23 % have a top-2 softmax margin
below 0.05, and 8-bit round-to-nearest keeps only ~80 % agreement). So the agreement is also
reported on the *decided* images: those whose float top-2 margin is at least ``margin``. The
subset depends on the float network only, never on the quantized one, so every method is scored
on the same images.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[s:s + batch]).float() for s in range(0, images.shape[0], batch)])


def compare_logits(ref: torch.Tensor, test: torch.Tensor, margin: float = 0.1) -> Dict[str, Optional[float]]:
    """Agreement of ``test`` logits with ``ref`` ones ([n, classes] each):
    ``top1_agreement`` (fraction), ``mean_kl`` (nats), ``n``, and the agreement on the images whose
    ``ref`` top-2 softmax margin is at least ``margin``: ``decided_top1_agreement`` (None when
    there are none) and ``decided_n``."""
    if ref.shape != test.shape or ref.dim() != 2 or ref.shape[1] < 2:
        raise ValueError(f"compare_logits: shapes {tuple(ref.shape)} and {tuple(test.shape)}; "
                         "expected equal [n, classes] with classes >= 2")
    if not 0 <= margin < 1:
        raise ValueError(f"compare_logits: margin={margin!r}; expected a softmax-probability gap in [0, 1)")
    lp, lq = ref.log_softmax(-1), test.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    agree = (ref.argmax(-1) == test.argmax(-1)).float()
    top2 = lp.exp().topk(2, -1).values
    decided = (top2[:, 0] - top2[:, 1]) >= margin
    return {"top1_agreement": float(agree.mean()), "mean_kl": float(kl.mean()), "n": int(ref.shape[0]),
            "decided_top1_agreement": float(agree[decided].mean()) if bool(decided.any()) else None,
            "decided_n": int(decided.sum()), "margin": float(margin)}


def agreement(fp_model: nn.Module, q_model: nn.Module, images: torch.Tensor,
              batch: int = 32) -> Dict[str, Optional[float]]:
    return compare_logits(logits(fp_model, images, batch), logits(q_model, images, batch))
