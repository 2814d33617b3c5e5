"""Calibration images distilled from the network's own batch-norm statistics.

Only a few licensed photographs can ship, and block-wise reconstruction fitted to crops of 20
photos over-fits them (docs/RESULTS_VISION.md). The ImageNet training distribution is still
recorded in the official weights: every BatchNorm2d holds the running mean and variance of its
input over ImageNet. Optimizing images so that each BN layer sees those statistics, while the
classifier is pushed towards a chosen class per image, yields inputs spread over the 1000
classes (ZeroQ, Cai et al. 2020; DeepInversion, Yin et al. 2020). They are meant to be mixed with
the real crops, not to replace them.

Images are optimized in the ImageNet-normalized space, start from given crops (or noise), are
randomly shifted and flipped every step (so the result does not depend on exact pixel
positions), and are clamped to the valid pixel range. Deterministic for a seed on one machine.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize


def _pixel_bounds() -> tuple:
    """Normalized values of black and white pixels, ``[1, 3, 1, 1]`` each."""
    return normalize(torch.zeros(1, 3, 1, 1)), normalize(torch.ones(1, 3, 1, 1))


class _BNStatLoss:
    """Forward hooks on every BatchNorm2d summing ``|mean_batch - running_mean|_2 +
    |std_batch - running_std|_2`` over the layers (the norms, not their squares: each layer
    counts about equally however many channels it has)."""

    def __init__(self, model: nn.Module):
        self.terms: List[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.BatchNorm2d)]
        if not self.handles:
            raise ValueError("distill_images: model has no BatchNorm2d layers; pass the unfolded network "
                             "(quantizer.vision.mobilenetv2.load_mobilenet_v2)")

    def _hook(self, bn: nn.BatchNorm2d, inputs, _output):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        std = (x.var(dim=(0, 2, 3), unbiased=False) + bn.eps).sqrt()
        self.terms.append((mean - bn.running_mean).norm() + (std - (bn.running_var + bn.eps).sqrt()).norm())

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distill_images(model: nn.Module, n: int, steps: int = 30, batch_size: int = 16, lr: float = 0.05,
                   init: Optional[torch.Tensor] = None, class_weight: float = 1.0, jitter: int = 16,
                   seed: int = 0, size: int = 224) -> torch.Tensor:
    """``[n, 3, size, size]`` ImageNet-normalized images whose batch statistics match ``model``'s
    BatchNorm running statistics.

    model: the float network *with* its BatchNorm2d layers (eval mode; not modified). init:
    starting images (``[n, 3, size, size]``, normalized), e.g. real crops; None starts from
    Gaussian noise. class_weight: weight of a cross-entropy towards a random class per image
    (seeded; the classes are the last Linear's outputs), which spreads the images over the
    classifier's classes; 0 turns it off.
    steps/batch_size/lr: Adam on the pixels of each batch of ``batch_size`` images."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"distill_images: n={n!r}; expected a positive integer")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"distill_images: {name}={v!r}; expected a positive integer")
    if not lr > 0:
        raise ValueError(f"distill_images: lr={lr!r}; expected a positive number")
    if class_weight < 0:
        raise ValueError(f"distill_images: class_weight={class_weight!r}; expected >= 0")
    if init is not None and tuple(init.shape) != (n, 3, size, size):
        raise ValueError(f"distill_images: init shape {tuple(init.shape)}; expected {(n, 3, size, size)}")
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _pixel_bounds()
    start = init.float().clone() if init is not None else torch.randn(n, 3, size, size, generator=gen)
    start = torch.max(torch.min(start, hi), lo)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classes = linears[-1].out_features if linears else 1000
    labels = torch.randint(0, classes, (n,), generator=gen)
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    stats = _BNStatLoss(model)
    out = torch.empty_like(start)
    try:
        for b0 in range(0, n, batch_size):
            x = start[b0:b0 + batch_size].clone().requires_grad_(True)
            y = labels[b0:b0 + batch_size]
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                xin = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
                if bool(torch.rand((), generator=gen) < 0.5):
                    xin = xin.flip(-1)
                logits = model(xin)
                loss = stats.pop()
                if class_weight > 0:
                    loss = loss + class_weight * F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
            out[b0:b0 + batch_size] = x.detach()
    finally:
        stats.remove()
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
        model.train(was_training)
    return out
