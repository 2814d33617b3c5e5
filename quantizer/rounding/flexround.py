"""FlexRound (Lee et al., ICML 2023): learnable rounding by element-wise division.

``W_hat = s1 * (clamp(round(W / (s1 * S2 * s3 [* s4])) + zero, 0, qmax) - zero)``

* ``s1``: the grid size that ships (scalar per tensor, vector per channel, matrix per group);
* ``S2``: one positive factor per weight, the element-wise divisor that lets each weight move
  across a rounding boundary with a step proportional to its own magnitude (large weights are
  the ones allowed to change code most, the paper's key property);
* ``s3``: one per output channel; ``s4``: one per input channel (convolutions only).

All four are stored as logs (positive by construction, scale-free step sizes for Adam) and start
at the RTN grid with ``S2 = s3 = s4 = 1``, so step 0 reproduces RTN exactly. ``zero`` is the
integer zero point of the initial grid and stays fixed: learning it would make the grid's
origin move by fractions of a step that cannot ship. At export ``S2, s3, s4`` fold into the codes.
"""

from __future__ import annotations

import torch
from torch import nn

from fxkernels.format import QuantSpec

from .base import WeightQuantizer, init_grid, round_ste
from .registry import register_method


def flexround_default_lr(bits: int) -> float:
    """FlexRound's default Adam step for ``bits``-bit weights.

    Within 100-200 steps the log-scales must travel far enough to move small codes by a whole
    step, hence 6e-3 rather than the paper's smaller rates (measured on SmolLM2: W3 per-channel
    39.85 -> 31.88 at 100 steps, 31.30 -> 28.57 at 200; W4 21.34 -> 21.07). A weight whose code
    sits ``c`` steps from the zero point moves by about ``c * d(log S2)`` grid steps, so one Adam
    step moves 8-bit weights (``|c|`` up to 128) 16x further than 4-bit ones (up to 8). Measured on
    SmolLM2 (docs/RESULTS.md): 6e-3 is best at 3-4 bits; at W8A8, 6e-3 left several blocks no
    better than their initial grid while 1e-3 cut block losses 2-3x. Between 4 and 8 bits the
    step is interpolated geometrically."""
    if bits <= 4:
        return 6e-3
    if bits >= 8:
        return 1e-3
    return 6e-3 * (1e-3 / 6e-3) ** ((bits - 4) / 4)


class _FlexRoundFn(torch.autograd.Function):
    """The fake-quantized weight and its straight-through gradients in one pass each way.

    Autograd through the composed ops keeps ~20 weight-sized temporaries per step; on a 2-core
    CPU that costs as much as the block's own matmuls. With ``d = s1 * exp(log_S2 + log_s3
    [+ log_s4])``, ``v = W / d``, ``q = clamp(round(v) + zero, 0, qmax)`` and
    ``W_hat = (q - zero) * s1``, the straight-through gradients are (``m``: unclamped mask)

    * ``dL/dlog d = -s1 * m * g * v`` (shared by ``log_S2``, and summed for ``log_s3``/``log_s4``),
    * ``dL/ds1 = sum(g * (q - zero)) + sum(dL/dlog d) / s1``.
    """

    @staticmethod
    def forward(ctx, w3, s1, log_S2, log_row, log_col, zero, qmax):
        # in place on ``v``'s storage, op for op what round(v) + zero, clamp(r, 0, qmax) - zero give
        r = _divided(w3, s1, log_S2, log_row, log_col).round_().add_(zero)
        inside = (r >= 0) & (r <= qmax)
        qz = r.clamp_(0, qmax).sub_(zero)
        # Saved for backward: the inputs (no new memory), the unclamped mask (1 byte per weight)
        # and the integer codes minus zero in the narrowest exact integer type; ``v`` is recomputed
        # there (bit for bit the same). Saving ``v`` and ``qz`` in fp32 held two more weight-sized
        # tensors per layer through the block's forward and backward: ~0.4 GB per block of a 1B model.
        small = torch.int8 if qmax <= 127 else torch.int16
        ctx.save_for_backward(w3, s1, log_S2, log_row, log_col, inside, qz.to(small), zero)
        return qz * s1

    @staticmethod
    def backward(ctx, g):
        w3, s1, log_S2, log_row, log_col, inside, qz, zero = ctx.saved_tensors

        def reduce_to(t, like):
            dims = [d for d in range(t.dim()) if like.shape[d] == 1 and t.shape[d] != 1]
            return t.sum(dim=dims, keepdim=True) if dims else t

        glog = torch.where(inside, g, 0.0)
        n, k = w3.shape[0], w3[0].numel()
        step = max(1, _BACKWARD_BLOCK_ELEMENTS // k)
        if s1.shape[0] == n and k % 64 == 0 and n > step:
            # By blocks of rows, so that the recomputed ``v`` and ``g * qz`` are never weight-sized
            # (the backward pass of a large block's widest layer is where its learning peaks).
            # Row lengths that are a multiple of 64 keep the vectorized loops free of scalar tails,
            # and each row's sums are its own: the same values bit for bit as the whole-weight ops.
            g_q = []
            for r in range(0, n, step):
                c = slice(r, r + step)
                glog[c].mul_(_divided(w3[c], s1[c], log_S2[c], log_row[c], log_col)).mul_(-s1[c])
                g_q.append(reduce_to(g[c] * qz[c], s1[c]))
            g_q = torch.cat(g_q)
        else:
            v = _divided(w3, s1, log_S2, log_row, log_col)
            glog.mul_(v).mul_(-s1)
            del v
            g_q = reduce_to(g * qz, s1)
        g_row = reduce_to(glog, torch.empty(glog.shape[0], 1, 1))
        g_col = glog.sum(dim=0, keepdim=True) if log_col is not None else None
        g_s1 = g_q + reduce_to(glog, s1) / s1
        g_zero = None
        if ctx.needs_input_grad[5]:
            # W_hat = s1 * (clamp(v + zero) - zero): inside the grid it does not depend on zero, and a
            # clamped weight moves by -s1 per unit of zero (the grid's window slides past it)
            g_zero = reduce_to(torch.where(inside, 0.0, g), zero) * -s1
        return None, g_s1, glog, g_row, g_col, g_zero, None


# Weights per block of rows in FlexRound's backward pass (1M fp32: 4 MiB per temporary).
_BACKWARD_BLOCK_ELEMENTS = 1 << 20


def _divided(w3, s1, log_S2, log_row, log_col):
    """``W / (s1 * S2 * s3 [* s4])`` with the scales as logs: the value FlexRound rounds."""
    logs = log_S2 + log_row
    if log_col is not None:
        logs.add_(log_col)
    # one weight-sized tensor instead of four alive at once (the values are those of
    # w3 / (s1 * logs.exp()): each op is the same, in place)
    d = logs.exp_().mul_(s1)
    return torch.div(w3, d, out=d)


@register_method
class FlexRoundQuantizer(WeightQuantizer):
    """FlexRound: learned element-wise division of the weights by a grid of positive scales (Adam)."""

    method = "flexround"
    takes_init = True

    @classmethod
    def default_learning_rate(cls, bits, iters):
        return 6e-3 if bits is None else flexround_default_lr(bits)

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, init: str = "mse",
                 learn_s1: bool = True, learn_s3: bool = True, learn_s4: bool = True,
                 s1_lr_scale: float = 0.3, learn_zero: bool = False, zero_lr_scale: float = 10.0):
        super().__init__(weight, spec)
        scale, zero = init_grid(self.weight, spec, init)
        n, k = self.grid.n, self.grid.k
        # s1 = s1_init * exp(log_s1) with log_s1 = 0 at start: exp(0) == 1 exactly, so step 0 is
        # RTN bit for bit (exp(log(s)) would not round-trip in fp32).
        self.register_buffer("s1_init", scale)
        self.log_s1 = nn.Parameter(torch.zeros_like(scale), requires_grad=learn_s1)
        self.log_S2 = nn.Parameter(torch.zeros(n, k))
        self.log_s3 = nn.Parameter(torch.zeros(n, 1), requires_grad=learn_s3)
        self.is_conv = len(self.weight_shape) > 2
        if self.is_conv:
            # One factor per input channel, shared by its kh*kw taps.
            self.log_s4 = nn.Parameter(torch.zeros(self.weight_shape[1]), requires_grad=learn_s4)
        else:
            self.register_parameter("log_s4", None)
        self.register_buffer("zero", zero.float())
        # The zero point as the initial one plus a learned shift, rounded (straight-through) so the
        # grid that learns is the integer grid that ships: with s1 it sets both ends of the clipping
        # range, not only its width.
        if learn_zero:
            self.zero_shift = nn.Parameter(torch.zeros_like(self.zero))
        else:
            self.register_parameter("zero_shift", None)
        self.s1_lr_scale = float(s1_lr_scale)
        self.zero_lr_scale = float(zero_lr_scale)

    def scale_zero(self):
        scale = self.s1_init * self.log_s1.exp()
        if self.zero_shift is None:
            return scale, self.zero
        return scale, round_ste(self.zero + self.zero_shift).clamp(0, self.spec.qmax)

    def codes_float(self, scale, zero):
        """Codes only (export path); same arithmetic as :class:`_FlexRoundFn`."""
        logs = self.grid.w3(self.log_S2) + self.log_s3.reshape(-1, 1, 1)
        col = self._log_col()
        if col is not None:
            logs = logs + col
        v = self.grid.w3(self.weight) / (self.grid.s3(scale) * logs.exp())
        return torch.clamp(torch.round(v) + self.grid.s3(zero), 0, self.spec.qmax)

    def _log_col(self):
        """``log_s4`` per weight column as ``[1, G, K/G]`` (each input channel covers kh*kw taps)."""
        if self.log_s4 is None:
            return None
        taps = self.grid.k // self.weight_shape[1]
        return self.log_s4.repeat_interleave(taps).reshape(1, self.grid.groups, -1)

    def forward(self):
        scale, zero = self.scale_zero()
        w_hat = _FlexRoundFn.apply(self.grid.w3(self.weight), self.grid.s3(scale), self.grid.w3(self.log_S2),
                                   self.log_s3.reshape(-1, 1, 1), self._log_col(), self.grid.s3(zero),
                                   self.spec.qmax)
        return w_hat.reshape(self.weight_shape)

    def param_groups(self, lr: float):
        # s1 moves every weight of its row/group at once; s1_lr_scale < 1 tempers it.
        groups = [{"params": [p for p in (self.log_S2, self.log_s3, self.log_s4)
                              if p is not None and p.requires_grad], "lr": lr}]
        if self.log_s1.requires_grad:
            groups.append({"params": [self.log_s1], "lr": lr * self.s1_lr_scale})
        if self.zero_shift is not None:
            groups.append({"params": [self.zero_shift], "lr": lr * self.zero_lr_scale})
        return groups
