"""Per-tensor static int8 activation fake-quantization with learned step size and zero (LSQ+).

Forward is the kernels' rule exactly (fxkernels.reference.quantize_act with a static grid):
``xq = clamp(round(x * (1/sa)) + za, -128, 127)`` with ``1/sa`` rounded to fp32 first, then
``x_hat = (xq - za) * sa``. So the codes seen while learning are the codes the int8 GEMM gets.
``sa`` is learned as a log (positive, scale-free Adam steps); ``za`` as a float rounded with a
straight-through estimator, so the exported integer is the one used in the last forward.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .rounding.base import round_ste

QMIN, QMAX = -128, 127


def act_grid(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int8 grid ``(scale, zero)`` covering ``[lo, hi]`` (always containing 0)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
    zero = torch.clamp(torch.round(QMIN - lo / scale), QMIN, QMAX)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / scale
    xq = torch.clamp(torch.round(x * inv) + zero, QMIN, QMAX)
    return (xq - zero) * scale


@torch.no_grad()
def search_range(x: torch.Tensor, grid: int = 80, max_shrink: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale, zero)`` minimizing the squared quantization error of the samples ``x``
    over ranges ``[f*min, f*max]``. Min-max wastes the 8-bit range on a few outlier channels;
    the error-optimal range clips them, and LSQ refines the trade-off against the block output."""
    x = x.detach().float().reshape(-1)
    lo, hi = x.min(), x.max()
    best, best_err = act_grid(lo, hi), float("inf")
    for i in range(int(max_shrink * grid) + 1):
        f = 1 - i / grid
        s, z = act_grid(lo * f, hi * f)
        err = float((fake_quant(x, s, z) - x).pow(2).mean())
        if err < best_err:
            best, best_err = (s, z), err
    return best


class ActQuantizer(nn.Module):
    """LSQ+ per-tensor static activation quantizer; ``enabled=False`` passes inputs through."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.zero = nn.Parameter(torch.zeros(1))
        self.enabled = True

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str = "mse") -> None:
        if method == "minmax":
            s, z = act_grid(x.min(), x.max())
        elif method == "mse":
            s, z = search_range(x)
        else:
            raise ValueError(f"activation init method={method!r}; expected 'mse' or 'minmax'")
        self.log_scale.copy_(s.log().reshape(1))
        self.zero.copy_(z.reshape(1))

    def scale_zero(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = self.log_scale.exp()
        zero = torch.clamp(round_ste(self.zero), QMIN, QMAX)
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        scale, zero = self.scale_zero()
        inv = 1.0 / scale
        xq = torch.clamp(round_ste(x * inv) + zero, QMIN, QMAX)
        return (xq - zero) * scale

    @torch.no_grad()
    def export(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(act_scale fp32 [1], act_zero int32 [1])`` as QuantLinear stores them."""
        scale, zero = self.scale_zero()
        return scale.detach().float().clone(), zero.detach().to(torch.int32).clone()
