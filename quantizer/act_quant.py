"""Per-tensor static activation fake-quantization with learned step size and zero (LSQ+).

Forward is the kernels' rule exactly (fxkernels.reference.quantize_act with a static grid):
``xq = clamp(round(x * (1/sa)) + za, qmin, qmax)`` with ``1/sa`` rounded to fp32 first, then
``x_hat = (xq - za) * sa``. So at 8 bits the codes seen while learning are the codes the int8 GEMM
gets. Widths below 8 use the same signed rule on a narrower range; the kernels cannot run them, so
the exported model simulates them with :class:`ActFakeQuant`. ``sa`` is learned as a log
(positive, scale-free Adam steps); ``za`` as a float rounded with a straight-through estimator,
so the exported integer is the one used in the last forward.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from .rounding.base import round_ste

QMIN, QMAX = -128, 127


def act_range(bits: int) -> Tuple[int, int]:
    """Signed code range, as the int8 kernels use it (``[-128, 127]`` at 8 bits)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid ``(scale, zero)`` covering ``[lo, hi]`` (always containing 0), signed domain."""
    qmin, qmax = act_range(bits)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``(clamp(round(x * (1/s)) + z) - z) * s``: at 8 bits the rule of ``fxkernels.ops.quantize_act``."""
    qmin, qmax = act_range(bits)
    inv = 1.0 / scale
    return (torch.clamp(torch.round(x * inv) + zero, qmin, qmax) - zero) * scale


@dataclasses.dataclass(frozen=True)
class RangeSearch:
    """How the initial clipping range is searched: ranges ``[f*min, f*max]`` for
    ``f = 1, 1 - 1/grid, ...`` down to ``1 - max_shrink``. ``max_samples``: search on a strided
    subsample of at most about that many values (None: all of them)."""

    grid: int = 80
    max_shrink: float = 0.95
    max_samples: Optional[int] = None


@torch.no_grad()
def search_range(x: torch.Tensor, bits: int = 8, search: RangeSearch = RangeSearch()
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale, zero)`` minimizing the squared quantization error of the samples ``x``.
    Min-max wastes the range on a few outlier channels (and the few levels of 4 bits on rare large
    activations); the error-optimal range clips them, and LSQ refines the trade-off against the
    unit's output."""
    x = x.detach().float().reshape(-1)
    if search.max_samples is not None and x.numel() > search.max_samples:
        x = x[:: x.numel() // search.max_samples + 1]  # strided: fast and unbiased enough
    lo, hi = x.min(), x.max()
    best, best_err = act_grid(lo, hi, bits), float("inf")
    for i in range(int(search.max_shrink * search.grid) + 1):
        f = 1 - i / search.grid
        s, z = act_grid(lo * f, hi * f, bits)
        err = float((fake_quant(x, s, z, bits) - x).pow(2).mean())
        if err < best_err:
            best, best_err = (s, z), err
    return best


class ActQuantizer(nn.Module):
    """LSQ+ per-tensor static activation quantizer of ``bits`` (2..8); ``enabled=False`` passes
    inputs through (while the engine records the statistics that start it)."""

    def __init__(self, bits: int = 8, search: RangeSearch = RangeSearch()):
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"ActQuantizer: bits={bits!r}; expected an integer in 2..8")
        self.bits, self.search = bits, search
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.zero = nn.Parameter(torch.zeros(1))
        self.enabled = True

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str = "mse") -> None:
        if method == "minmax":
            s, z = act_grid(x.min(), x.max(), self.bits)
        elif method == "mse":
            s, z = search_range(x, self.bits, self.search)
        else:
            raise ValueError(f"activation init method={method!r}; expected 'mse' or 'minmax'")
        self.log_scale.copy_(s.log().reshape(1))
        self.zero.copy_(z.reshape(1))

    def scale_zero(self) -> Tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = act_range(self.bits)
        return self.log_scale.exp(), torch.clamp(round_ste(self.zero), qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        qmin, qmax = act_range(self.bits)
        scale, zero = self.scale_zero()
        inv = 1.0 / scale
        xq = torch.clamp(round_ste(x * inv) + zero, qmin, qmax)
        return (xq - zero) * scale

    @torch.no_grad()
    def export(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(act_scale fp32 [1], act_zero int32 [1])`` as QuantLinear stores them."""
        scale, zero = self.scale_zero()
        return scale.detach().float().clone().reshape(1), zero.detach().to(torch.int32).clone().reshape(1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActFakeQuant(nn.Module):
    """A frozen exported activation grid of any width, simulated in fp32 (for widths the
    kernels cannot run, i.e. below 8 bits)."""

    def __init__(self, bits: int, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", scale.detach().float().reshape(1).clone())
        self.register_buffer("zero", zero.detach().float().reshape(1).clone())

    def forward(self, x):
        return fake_quant(x, self.scale, self.zero, self.bits)

    def extra_repr(self):
        return f"bits={self.bits}"
