"""Round to nearest: the baseline every learned rounding starts from and is compared with."""

from __future__ import annotations

import torch

from fxkernels.format import QuantSpec

from .base import WeightQuantizer, init_grid
from .registry import register_method


@register_method
class RTNQuantizer(WeightQuantizer):
    """Round to nearest on a min-max or MSE-searched grid; nothing to learn."""

    method = "rtn"
    learns = False
    takes_init = True

    @classmethod
    def default_learning_rate(cls, bits, iters):
        return 0.0

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, init: str = "minmax"):
        super().__init__(weight, spec)
        scale, zero = init_grid(self.weight, spec, init)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero.float())

    def scale_zero(self):
        return self.scale, self.zero

    def codes_float(self, scale, zero):
        w3 = self.grid.w3(self.weight)
        return torch.clamp(torch.round(w3 / self.grid.s3(scale)) + self.grid.s3(zero), 0, self.spec.qmax)
