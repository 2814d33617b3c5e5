"""What every learnable rounding shares: the weight's view on its scale grid, exact straight-through
rounding, and the export contract.

A quantizer owns one weight ``W`` (a Linear ``[N, K]`` or a Conv ``[O, I, kh, kw]``, seen as
``[N, K]`` with ``K = I*kh*kw``) and produces

* :meth:`forward` -> the fake-quantized weight ``W_hat`` (same shape as ``W``), differentiable in
  the learnable parameters, always of the form ``(q - zero) * scale`` with integer-valued float
  ``q`` in ``[0, qmax]``;
* :meth:`export` -> ``(codes int32 [N, K], scale fp32, zero int32)`` in ``spec.scale_shape``, such
  that ``fxkernels.format.dequantize(pack(codes), scale, zero)`` equals the last hard ``forward()``
  bit for bit (the invariant that ties the quantizer to the kernels; tests/test_invariant.py).

Bit-exactness rests on two facts: rounding uses :class:`RoundSTE`, whose forward is ``torch.round``
itself (the popular ``x + (round(x) - x).detach()`` trick is *not* exact in floating point), and
the dequantization is one fp32 multiply ``(q - zero) * scale`` of exactly the values that ship,
which is what ``dequantize`` computes too (a product of the same two fp32 numbers is the same
number whatever the broadcasting layout).
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from fxkernels.format import QuantSpec, check_weight, quantize_rtn


class RoundSTE(torch.autograd.Function):
    """``torch.round`` forward (ties to even, exact), identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


round_ste = RoundSTE.apply


def weight_2d(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` view of a Linear or Conv weight (conv: ``K = in_channels * kh * kw``)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() in (3, 4, 5):
        return weight.reshape(weight.shape[0], -1)
    raise ValueError(f"weight: shape {tuple(weight.shape)}; expected a 2-D Linear or 3/4/5-D Conv weight")


class GridView:
    """Reshapes between ``[N, K]`` and the ``[N, G, K/G]`` view in which a scale of
    ``spec.scale_shape`` broadcasts as ``[*, *, 1]`` (G = 1 for tensor/channel granularity)."""

    def __init__(self, spec: QuantSpec, n: int, k: int):
        self.spec, self.n, self.k = spec, n, k
        self.groups = spec.num_groups(k)
        self.shape = spec.scale_shape(n, k)

    def w3(self, w2: torch.Tensor) -> torch.Tensor:
        return w2.reshape(self.n, self.groups, self.k // self.groups)

    def s3(self, s: torch.Tensor) -> torch.Tensor:
        """A spec-shaped scale/zero as a broadcastable ``[N|1, G|1, 1]`` view."""
        if self.spec.granularity == "tensor":
            return s.reshape(1, 1, 1)
        if self.spec.granularity == "channel":
            return s.reshape(self.n, 1, 1)
        return s.reshape(self.n, self.groups, 1)

    def rows(self, w2: torch.Tensor) -> torch.Tensor:
        """One row per scale entry (for per-row min/max)."""
        if self.spec.granularity == "tensor":
            return w2.reshape(1, -1)
        return w2.reshape(self.n * self.groups, -1)


def init_grid(w2: torch.Tensor, spec: QuantSpec, init: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The RTN grid a learned method starts from: ``"minmax"`` or ``"mse"`` (clipping search)."""
    if init not in ("minmax", "mse"):
        raise ValueError(f"init={init!r}; expected 'minmax' or 'mse'")
    _, scale, zero = quantize_rtn(w2.detach().float(), spec, mse=(init == "mse"))
    return scale, zero


class WeightQuantizer(nn.Module):
    """Base class: subclasses implement :meth:`codes_float` (the integer-valued, differentiable
    codes) and :meth:`scale_zero` (the grid that ships), and state their learning policy in the
    class attributes below; :func:`quantizer.rounding.register_method` makes them a ``method``."""

    method = "base"
    # -- the learning policy the engine reads ------------------------------------------------
    #: False: the initial grid is the result and the engine learns nothing (RTN).
    learns = True
    #: The constructor has an ``init`` argument ("mse" or "minmax" initial grid) that the run's
    #: configuration fills in unless the method's options set it.
    takes_init = False
    #: Export the parameters of the lowest training loss seen instead of the last ones (a
    #: sign-gradient walk does not settle, so its last iterate is a random point near the optimum).
    keep_best = False
    #: The forward pass uses a soft relaxation while learning; the engine sets ``hard`` for its
    #: loss evaluations and the export (AdaRound). Other methods are always hard.
    soft_while_learning = False
    #: Weight of :meth:`regularizer` in the loss, relative to the unit's initial reconstruction
    #: loss (so one value suits every unit); ``options["reg_weight"]`` overrides it. None: no term.
    regularizer_weight: Optional[float] = None

    def __init__(self, weight: torch.Tensor, spec: QuantSpec):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec is {type(spec).__name__}; expected fxkernels.QuantSpec")
        w2 = weight_2d(weight.detach())
        check_weight(w2, "weight")
        n, k = w2.shape
        if spec.granularity == "group":
            spec.check_shape(n, k)
        self.spec = spec
        self.weight_shape = tuple(weight.shape)
        self.grid = GridView(spec, n, k)
        # The float weight is a buffer: it is the fixed input of the rounding, never learned.
        self.register_buffer("weight", w2.float().clone())
        self.hard = True  # AdaRound alone uses soft rounding while learning

    # -- to implement ------------------------------------------------------------------------
    def scale_zero(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale fp32, zero float-integer)`` in ``spec.scale_shape`` (differentiable scale)."""
        raise NotImplementedError

    def codes_float(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer-valued float codes ``[N, G, K/G]`` in ``[0, qmax]`` (differentiable)."""
        raise NotImplementedError

    def regularizer(self, progress: float) -> Optional[torch.Tensor]:
        """Extra loss term at training ``progress`` in [0, 1] (AdaRound); None for most methods."""
        return None

    def param_groups(self, lr: float) -> List[Dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def project(self) -> None:
        """Bring the parameters back into their domain after an optimizer step (default: nothing)."""

    # -- policy hooks (class level: they run before any instance exists) -----------------------
    @classmethod
    def default_learning_rate(cls, bits: Optional[int], iters: int) -> float:
        """The step size when the run's ``lr`` is None (``bits``: weight bits, if known)."""
        raise NotImplementedError(f"{cls.__name__} must define default_learning_rate")

    @classmethod
    def make_optimizer(cls, param_groups: List[Dict], lr: float, iters: int):
        """The optimizer of the rounding parameters (default: Adam; a ``torch.optim.Optimizer``
        gets the engine's linear learning-rate decay when the run asks for it)."""
        return torch.optim.Adam(param_groups, lr=lr, fused=True)

    @classmethod
    def check_policy(cls) -> None:
        """``TypeError``/``ValueError`` naming the attribute when the declared policy is malformed."""
        for name in ("learns", "takes_init", "keep_best", "soft_while_learning"):
            if not isinstance(getattr(cls, name), bool):
                raise TypeError(f"{cls.__name__}.{name}={getattr(cls, name)!r}; expected True or False")
        if cls.default_learning_rate.__func__ is WeightQuantizer.default_learning_rate.__func__:
            raise ValueError(f"{cls.__name__} does not define default_learning_rate(bits, iters); expected the "
                             "step size a run uses when its lr is None")
        w = cls.regularizer_weight
        if w is not None and not (isinstance(w, (int, float)) and w >= 0):
            raise ValueError(f"{cls.__name__}.regularizer_weight={w!r}; expected None or a number >= 0")
        takes = "init" in inspect.signature(cls.__init__).parameters
        if takes != cls.takes_init:
            raise ValueError(f"{cls.__name__}.takes_init={cls.takes_init!r} but its constructor "
                             f"{'has' if takes else 'has no'} an init argument")

    # -- shared ------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        scale, zero = self.scale_zero()
        s3, z3 = self.grid.s3(scale), self.grid.s3(zero)
        q = self.codes_float(scale, zero)
        w_hat = (q - z3) * s3
        return w_hat.reshape(self.weight_shape)

    @torch.no_grad()
    def export(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes int32 [N, K], scale fp32, zero int32)``: what the hard forward computes."""
        was = self.hard
        self.hard = True
        try:
            scale, zero = self.scale_zero()
            q = self.codes_float(scale, zero)
        finally:
            self.hard = was
        codes = q.reshape(self.grid.n, self.grid.k).to(torch.int32)
        return codes, scale.detach().float().clone(), zero.detach().to(torch.int32).clone()

    def extra_repr(self) -> str:
        return f"{self.method}, weight={self.weight_shape}, spec={self.spec}"
