"""SignRound (Cheng et al., 2023; the AutoRound algorithm): a learned rounding offset
``V`` in ``[-0.5, 0.5]`` per weight plus learned clipping of the grid's range.

``lo = min(row) * beta``, ``hi = max(row) * alpha`` (``alpha, beta`` in ``[clip_min, 1]``) give the
grid exactly as :func:`fxkernels.format.grid_from_range` builds it (zero rounded with a straight
through estimator, so it stays the integer that ships), and
``W_hat = s * (clamp(round(W / s + V) + zero, 0, qmax) - zero)``.

Optimized by signed gradient descent with a linearly decaying step (:class:`SignSGD`), keeping
the parameters of the best loss seen. ``V = 0, alpha = beta = 1`` is min-max RTN.
"""

from __future__ import annotations

import torch
from torch import nn

from fxkernels.format import QuantSpec

from .base import WeightQuantizer, round_ste
from .registry import register_method


class SignSGD:
    """``p -= lr_t * sign(grad)`` with ``lr_t`` decaying linearly to 0 (SignRound's optimizer)."""

    def __init__(self, params, lr: float, total_steps: int):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.total, self.t = lr, max(total_steps, 1), 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        lr = self.lr * (1 - self.t / self.total)
        for p in self.params:
            if p.grad is not None:
                p.add_(torch.sign(p.grad), alpha=-lr)
        self.t += 1


@register_method
class SignRoundQuantizer(WeightQuantizer):
    """SignRound: learned rounding offsets in [-0.5, 0.5] and range clipping (signed SGD)."""

    method = "signround"
    keep_best = True

    @classmethod
    def default_learning_rate(cls, bits, iters):
        # AutoRound's rule: over the whole schedule the offsets can travel about one grid step.
        return 1.0 / max(iters, 1)

    @classmethod
    def make_optimizer(cls, param_groups, lr, iters):
        return SignSGD([p for g in param_groups for p in g["params"]], lr, iters)

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, clip_min: float = 0.5):
        super().__init__(weight, spec)
        if not 0 < clip_min <= 1:
            raise ValueError(f"clip_min={clip_min!r}; expected a fraction in (0, 1]")
        rows = self.grid.rows(self.weight)
        shape = spec.scale_shape(self.grid.n, self.grid.k)
        self.register_buffer("row_min", torch.clamp(rows.min(dim=1).values, max=0).reshape(shape))
        self.register_buffer("row_max", torch.clamp(rows.max(dim=1).values, min=0).reshape(shape))
        self.V = nn.Parameter(torch.zeros(self.grid.n, self.grid.k))
        self.alpha = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.ones(shape))
        self.clip_min = clip_min

    @torch.no_grad()
    def project(self) -> None:
        """Keep parameters in their ranges (called after every optimizer step)."""
        self.V.clamp_(-0.5, 0.5)
        self.alpha.clamp_(self.clip_min, 1.0)
        self.beta.clamp_(self.clip_min, 1.0)

    def scale_zero(self):
        lo, hi = self.row_min * self.beta, self.row_max * self.alpha
        qmax = self.spec.qmax
        if self.spec.symmetric:
            half = 1 << (self.spec.bits - 1)
            scale = torch.maximum(-lo, hi) / (half - 1)
            scale = torch.clamp(scale, min=1e-8)
            return scale, torch.full_like(scale, float(half)).detach()
        scale = torch.clamp((hi - lo) / qmax, min=1e-8)
        zero = torch.clamp(round_ste(-lo / scale), 0, qmax)
        return scale, zero

    def codes_float(self, scale, zero):
        v = self.grid.w3(self.weight) / self.grid.s3(scale) + self.grid.w3(self.V)
        return torch.clamp(round_ste(v) + self.grid.s3(zero), 0, self.spec.qmax)
