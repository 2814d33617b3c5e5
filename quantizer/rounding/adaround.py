"""AdaRound (Nagel et al., ICML 2020): learn, for every weight, whether to round down or up.

``W_hat = s * (clamp(floor(W / s) + h(V) + zero, 0, qmax) - zero)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``. While learning ``h`` is soft; the
regularizer ``sum(1 - |2h - 1|^beta)`` with ``beta`` annealed from ``beta_start`` to ``beta_end``
(after a warm-up without it) pushes every ``h`` to 0 or 1. The hard rounding ``h = [V >= 0]`` is
what ships and what ``forward`` computes once ``hard`` is set (the engine sets it for its final
loss and export). The grid ``s, zero`` is the RTN init and is not learned, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from fxkernels.format import QuantSpec

from .base import WeightQuantizer, init_grid
from .registry import register_method

ZETA, GAMMA = 1.1, -0.1


@register_method
class AdaRoundQuantizer(WeightQuantizer):
    """AdaRound: learned up/down rounding of each weight on the fixed initial grid (Adam)."""

    method = "adaround"
    takes_init = True
    soft_while_learning = True
    regularizer_weight = 0.1

    @classmethod
    def default_learning_rate(cls, bits, iters):
        return 1e-2

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, init: str = "mse",
                 beta_start: float = 20.0, beta_end: float = 2.0, warmup: float = 0.2):
        super().__init__(weight, spec)
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup={warmup!r}; expected a fraction in [0, 1)")
        scale, zero = init_grid(self.weight, spec, init)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero.float())
        self.beta_start, self.beta_end, self.warmup = beta_start, beta_end, warmup
        w3 = self.grid.w3(self.weight) / self.grid.s3(scale)
        self.register_buffer("floor", torch.floor(w3))
        # Start from the fractional part so that the soft weight equals W (before clamping):
        # h(V0) = rest  <=>  V0 = -log((zeta - gamma) / (rest - gamma) - 1).
        rest = (w3 - self.floor).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.V >= 0).float()
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def scale_zero(self):
        return self.scale, self.zero

    def codes_float(self, scale, zero):
        return torch.clamp(self.floor + self.h() + self.grid.s3(zero), 0, self.spec.qmax)

    def beta(self, progress: float) -> float:
        t = (progress - self.warmup) / (1 - self.warmup)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1 - t)

    def regularizer(self, progress: float):
        if progress < self.warmup or self.hard:
            return None
        h = torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)
        # Mean instead of the paper's sum: the engine scales it by the block's initial loss.
        return (1 - (2 * h - 1).abs().pow(self.beta(progress))).mean()
