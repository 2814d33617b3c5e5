"""Layers while learning and after export, one class per layer kind over one weight view.

A :class:`QuantLayer` holds a rounding module (:mod:`quantizer.rounding`) on the layer's weight
seen as ``[N, K]``, an optional LSQ activation quantizer on its input, and the float bias; its
forward is ``op(aq(x), wq(), bias)``. The kinds differ only in ``op`` and in what the rounding
sees: :class:`LinearQuant` may rotate its input by a block Hadamard transform (the rounding then
quantizes ``W H^T``); :class:`Conv2dQuant` calls ``F.conv2d``. :class:`FrozenLayer` is an
exported layer simulated in fp32, bit-identical to the rounding's last hard forward.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxkernels.conv import QuantConv2d
from fxkernels.format import QuantSpec
from fxkernels.nn import QuantLinear
from fxkernels.rotation import hadamard_transform

from .act_quant import ActFakeQuant, ActQuantizer, fake_quant
from .rounding import WeightQuantizer, make_quantizer


class QuantLayer(nn.Module):
    """A layer during learning: ``op(aq(input_transform(x)), weight(), bias)``.

    Odd ``K`` (3x3 depthwise weights have 9 columns) cannot be nibble-packed, so with a packed
    spec the rounding learns ``[N, K + 1]`` with a zero pad column: its code is the zero point,
    dequantizing to exactly 0, and its scale factors are inert. For a depthwise conv FlexRound's
    per-input-channel ``s4`` would be a single scalar duplicating ``s1``, so nothing is lost by
    learning that weight as a 2-D matrix."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], method: str, spec: QuantSpec,
                 options: Optional[dict] = None, aq: Optional[ActQuantizer] = None):
        super().__init__()
        w = weight.detach()
        self.weight_shape = tuple(w.shape)
        self.k = w[0].numel()
        self.pad = spec.packed and self.k % 2 == 1
        if self.pad:
            w = torch.cat([w.float().reshape(w.shape[0], -1), w.new_zeros(w.shape[0], 1, dtype=torch.float32)], 1)
        self.wq: WeightQuantizer = make_quantizer(method, w, spec, options)
        self.spec, self.aq = spec, aq
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.record: Optional[List[torch.Tensor]] = None  # inputs collected for the activation grid's start
        # True: while learning, the fake-quantized weight and the op are recomputed in the backward
        # pass (activation checkpointing) instead of keeping what they save (the weight-sized
        # W_hat, the rounding's masks) for every layer of the unit: less memory, one more forward
        # of the layer per step, the same values and gradients bit for bit.
        self.recompute = False

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight in the layer's own shape (differentiable)."""
        w = self.wq()
        if self.pad:
            w = w[:, :self.k]
        return w.reshape(self.weight_shape)

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        x = self.input_transform(x)
        if self.record is not None:
            self.record.append(x.detach())
        if self.aq is not None:
            x = self.aq(x)
        if self.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._op_of_weight, x, use_reentrant=False)
        return self.op(x, self.weight())

    def _op_of_weight(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight())

    @torch.no_grad()
    def export(self) -> nn.Module:
        """The deployable layer built from the rounding's codes; below 8-bit activations an
        :class:`ActFakeQuant` in front simulates the input grid (the kernels run int8 only)."""
        codes, scale, zero = self.wq.export()
        if self.pad:
            codes = codes[:, :self.k]
        spec, act_scale, act_zero, pre = self.spec, None, None, None
        if self.aq is not None:
            s, z = self.aq.export()
            if self.aq.bits == 8:
                spec = dataclasses.replace(spec, act_bits=8, act_mode="static")
                act_scale, act_zero = s, z
            else:
                pre = ActFakeQuant(self.aq.bits, s, z)
        layer = self.build(codes, scale, zero, spec, act_scale, act_zero)
        return layer if pre is None else nn.Sequential(pre, layer)

    def build(self, codes, scale, zero, spec, act_scale, act_zero) -> nn.Module:
        raise NotImplementedError


class LinearQuant(QuantLayer):
    """``F.linear``; with ``input_rotation=b`` the input is first rotated (``x H^T``, block ``b``)
    and the rounding quantizes the rotated weight ``W H^T`` (H is symmetric)."""

    def __init__(self, layer: nn.Linear, method: str, spec: QuantSpec, options: Optional[dict] = None,
                 aq: Optional[ActQuantizer] = None, input_rotation: int = 0):
        weight = layer.weight.detach()
        if input_rotation:
            weight = hadamard_transform(weight.float(), input_rotation)
        super().__init__(weight, layer.bias, method, spec, options, aq)
        self.input_rotation = input_rotation

    def input_transform(self, x):
        return hadamard_transform(x, self.input_rotation) if self.input_rotation else x

    def op(self, x, weight):
        return F.linear(x, weight, self.bias)

    def build(self, codes, scale, zero, spec, act_scale, act_zero):
        return QuantLinear.from_codes(codes, scale, zero, spec, bias=self.bias, act_scale=act_scale,
                                      act_zero=act_zero, input_rotation=self.input_rotation)


def _conv_args(layer) -> Dict[str, object]:
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


class Conv2dQuant(QuantLayer):
    """``F.conv2d`` with the layer's stride, padding, dilation and groups."""

    def __init__(self, layer: nn.Conv2d, method: str, spec: QuantSpec, options: Optional[dict] = None,
                 aq: Optional[ActQuantizer] = None):
        super().__init__(layer.weight.detach().float(), layer.bias, method, spec, options, aq)
        self.conv_args = _conv_args(layer)
        self.in_channels = layer.in_channels

    def op(self, x, weight):
        return F.conv2d(x, weight, self.bias, **self.conv_args)

    def build(self, codes, scale, zero, spec, act_scale, act_zero):
        a = self.conv_args
        return QuantConv2d.from_codes(codes, scale, zero, spec, self.in_channels, self.weight_shape[2:],
                                      a["stride"], a["padding"], a["dilation"], a["groups"], self.bias,
                                      act_scale, act_zero)


def quant_layer(layer: nn.Module, method: str, spec: QuantSpec, options: Optional[dict] = None,
                aq: Optional[ActQuantizer] = None, input_rotation: int = 0) -> QuantLayer:
    """The learning wrapper of ``layer``'s kind (``nn.Linear`` or ``nn.Conv2d``)."""
    if isinstance(layer, nn.Linear):
        return LinearQuant(layer, method, spec, options, aq, input_rotation)
    if isinstance(layer, nn.Conv2d):
        if input_rotation:
            raise ValueError(f"input_rotation={input_rotation}: only nn.Linear inputs can be rotated")
        return Conv2dQuant(layer, method, spec, options, aq)
    raise TypeError(f"layer: got {type(layer).__name__}; expected nn.Linear or nn.Conv2d")


class FrozenLayer(nn.Module):
    """An exported layer (QuantLinear / QuantConv2d, possibly behind an ActFakeQuant) simulated in
    fp32: the dequantized codes, equal bit for bit to the rounding's last hard forward, with
    ``F.linear``/``F.conv2d`` and the exported activation grid. The engine pushes ``x_q`` through
    finished units with it, in a fresh run and after resuming alike (the kernels would give the
    same numbers up to summation order, slower)."""

    def __init__(self, exported: nn.Module):
        super().__init__()
        pre, layer = (exported[0], exported[1]) if isinstance(exported, nn.Sequential) else (None, exported)
        self.pre = pre
        w = layer.dequantized_weight()
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            w = w.reshape(layer.weight_shape)
            self.conv_args = _conv_args(layer)
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        static = layer.act_scale is not None
        self.register_buffer("act_scale", layer.act_scale.clone() if static else None)
        self.register_buffer("act_zero", layer.act_zero.float().clone() if static else None)
        self.input_rotation = getattr(layer, "input_rotation", 0)

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        if self.input_rotation:
            x = hadamard_transform(x, self.input_rotation)
        if self.act_scale is not None:
            x = fake_quant(x, self.act_scale, self.act_zero)
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.linear(x, self.weight, self.bias)

