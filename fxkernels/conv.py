"""QuantConv2d: packed INT2..8 convolution weights in the layout of QuantLinear.

A conv weight ``[O, I/groups, kh, kw]`` is stored as the 2-D ``[N, K] = [O, (I/groups)*kh*kw]``
matrix of :mod:`fxkernels.format` (row-major over ``(in channel, kh, kw)``, which is also the
column order of ``F.unfold``), so one QuantSpec, one pack/unpack and one dequantization serve
linears and convolutions. The layer adds the geometry (stride, padding, dilation, groups).

Execution, per shape:

* ``groups == 1``: the convolution is a GEMM. A 1x1 conv reads the (strided) pixels as rows
  ``[B*H*W, I]``; a kxk conv gathers patches with ``F.unfold`` (im2col) into ``[B*L, I*kh*kw]``.
  Both go through :func:`fxkernels.ops.dequant_linear` or, with int8 activations,
  :func:`fxkernels.ops.quantize_act` + :func:`fxkernels.ops.qact_linear`: the same kernels as
  QuantLinear.
* ``groups > 1`` (depthwise): no GEMM to speak of (K = kh*kw = 9 per output channel), so the
  weight is dequantized once (cached) and ``F.conv2d`` runs it; int8 activations are applied by
  the kernels' exact quantization rule followed by dequantization (same numbers as the GEMM path
  would see).

Odd ``K`` with nibble storage (a 3x3 depthwise conv has K = 9): the codes are padded with one
column holding the zero point (it dequantizes to 0) and ``qweight`` has ``ceil(K/2)`` columns,
exactly what :func:`fxkernels.format.packed_shape` and the kernel argument checks expect;
``unpack(..., in_features=K)`` drops the pad.

Checkpoints: QuantConv2d is the ``"conv2d"`` layer kind and ChannelClippedReLU the
``"channel_clipped_relu"`` kind of :mod:`fxkernels.layers`, so :func:`fxkernels.save_quantized` /
:func:`fxkernels.load_quantized` write and read CNNs like any other model;
:func:`save_quantized_cnn` / :func:`load_quantized_cnn` are those calls plus a check that the
model (checkpoint) holds convolutions.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .format import QuantSpec, as_grouped, check_weight, dequantize, pack, quantize_rtn, register_layer_buffers
from .nn import check_grid, replace_modules, store_grid
from .backends._cache import version_of
from .reference import weight_sums

IntPair = Union[int, Tuple[int, int]]


class ChannelClippedReLU(nn.Module):
    """``min(max(x, 0), upper[c])`` per channel of an ``[B, C, H, W]`` input.

    ReLU6 after cross-layer equalization: a channel whose producer was divided by ``s`` clips at
    ``6 / s``, which keeps the network's float function exactly that of the ReLU6 original
    (see ``quantizer.vision.equalize``). Checkpoints record these layers as kind
    ``"channel_clipped_relu"`` with their channel count; ``upper`` is a saved buffer."""

    def __init__(self, channels: int, upper: float = 6.0):
        super().__init__()
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"ChannelClippedReLU: channels={channels!r}; expected a positive int")
        self.register_buffer("upper", torch.full((channels,), float(upper)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.upper.view(1, -1, 1, 1).to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


def _pair(v: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) and a >= minimum for a in t):
        raise ValueError(f"QuantConv2d: {name}={v!r}; expected an int or a pair of ints >= {minimum}")
    return t  # type: ignore[return-value]


class QuantConv2d(nn.Module):
    """``y = conv2d(x, dequant(qweight).reshape(O, I/groups, kh, kw), bias)``, NCHW, zero padding.

    Buffers as QuantLinear (``qweight``, ``scale``, ``zero``, ``bias``, static ``act_scale`` /
    ``act_zero``), with ``in_features = (I/groups)*kh*kw`` and ``out_features = O``. Build with
    :meth:`from_codes` (learned codes) or :meth:`from_conv` (round to nearest)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, spec: QuantSpec,
                 stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                 bias: bool = True, device=None):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"QuantConv2d: spec is {type(spec).__name__}; expected a fxkernels.QuantSpec")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"QuantConv2d: {name}={v!r}; expected a positive integer")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"QuantConv2d: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.in_channels, self.out_channels, self.groups, self.spec = in_channels, out_channels, groups, spec
        self.in_features = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self.out_features = out_channels
        if spec.granularity == "group":
            spec.check_shape(out_channels, self.in_features)  # odd K is padded, groups must divide K
        register_layer_buffers(self, spec, out_channels, self.in_features, bias, device)
        self._derived_key = None
        self._derived: Tuple = ()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                   in_channels: int, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                   dilation: IntPair = 1, groups: int = 1, bias: Optional[torch.Tensor] = None,
                   act_scale: Optional[torch.Tensor] = None,
                   act_zero: Optional[torch.Tensor] = None) -> "QuantConv2d":
        """From unsigned codes ``[O, (I/groups)*kh*kw]`` (or ``[O, I/groups, kh, kw]``) and a grid of
        ``spec.scale_shape`` (the :meth:`quantizer.rounding.WeightQuantizer.export` triple)."""
        if codes.dim() == 4:
            codes = codes.reshape(codes.shape[0], -1)
        if codes.dim() != 2 or codes.dtype.is_floating_point:
            raise ValueError(f"QuantConv2d.from_codes: codes {codes.dtype} {tuple(codes.shape)}; expected integer "
                             "[out_channels, in_channels/groups*kh*kw]")
        layer = cls(in_channels, codes.shape[0], kernel_size, spec, stride, padding, dilation, groups,
                    bias=bias is not None, device=codes.device)
        if codes.shape[1] != layer.in_features:
            raise ValueError(f"QuantConv2d.from_codes: codes have {codes.shape[1]} columns; expected "
                             f"in_channels/groups*kh*kw = {layer.in_features}")
        # Same format, same rules as QuantLinear.
        static = check_grid("QuantConv2d.from_codes", spec, codes.shape[0], layer.in_features, scale, zero,
                            act_scale, act_zero)
        if bias is not None and tuple(bias.shape) != (codes.shape[0],):
            raise ValueError(f"QuantConv2d.from_codes: bias shape {tuple(bias.shape)}; expected ({codes.shape[0]},)")
        store_grid(layer, _pack_padded(codes, zero, spec), scale, zero, bias, act_scale if static else None,
                   act_zero if static else None)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: QuantSpec, mse: bool = False,
                  act_scale: Optional[torch.Tensor] = None,
                  act_zero: Optional[torch.Tensor] = None) -> "QuantConv2d":
        """Round-to-nearest quantization of an ``nn.Conv2d`` (zero padding only)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_conv: got {type(conv).__name__}; expected torch.nn.Conv2d")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"QuantConv2d.from_conv: padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; "
                             "expected explicit integer zero padding")
        w2 = conv.weight.detach().reshape(conv.out_channels, -1).float()
        check_weight(w2, "conv.weight")
        q, scale, zero = quantize_rtn(_pad_cols(w2), spec, mse=mse) if _needs_pad(w2, spec) else \
            quantize_rtn(w2, spec, mse=mse)
        if q.shape[1] != w2.shape[1]:
            # The pad column (zeros) cannot change a tensor/channel range that already contains 0.
            q = q[:, :w2.shape[1]]
        return cls.from_codes(q, scale, zero, spec, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, conv.bias, act_scale, act_zero)

    # -- running -----------------------------------------------------------------------------
    def _kernel_args(self):
        key = (self.qweight.data_ptr(), version_of(self.qweight), self.scale.data_ptr(), version_of(self.scale),
               self.zero.data_ptr(), version_of(self.zero), self.qweight.device)
        if key != self._derived_key:
            scale_g = as_grouped(self.scale, self.spec, self.out_features)
            zero_g = as_grouped(self.zero, self.spec, self.out_features)
            wsum = None
            if self.spec.act_bits and self.groups == 1:
                wsum = weight_sums(self.qweight, self.spec.bits, self.in_features, scale_g.shape[1])
            # Depthwise/grouped convs run F.conv2d on the dequantized weight: keep it, not codes.
            w4 = self.dequantized_weight().reshape(self.weight_shape) if self.groups > 1 else None
            self._derived = (scale_g, zero_g, wsum, w4)
            self._derived_key = key
        return self._derived

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _gemm(self, rows: torch.Tensor) -> torch.Tensor:
        scale_g, zero_g, wsum, _ = self._kernel_args()
        if self.spec.act_bits:
            xq, sa, za = ops.quantize_act(rows, self.act_scale, self.act_zero)
            return ops.qact_linear(xq, sa, za, self.qweight, scale_g, zero_g, wsum, self.bias, self.spec.bits,
                                   rows.dtype)
        return ops.dequant_linear(rows, self.qweight, scale_g, zero_g, self.bias, self.spec.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QuantConv2d: input shape {tuple(x.shape)}; expected [B, {self.in_channels}, H, W]")
        b = x.shape[0]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        hout = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wout = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.groups > 1:
            _, _, _, w4 = self._kernel_args()
            if self.spec.act_bits:
                x = self._fake_quant_act(x)
            return F.conv2d(x, w4.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                            self.stride, self.padding, self.dilation, self.groups)
        if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
            # 1x1: each output pixel is a GEMV over the input channels of one (strided) pixel.
            xs = x[:, :, ::sh, ::sw]
            rows = xs.permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        else:
            cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # [B, K, L]
            rows = cols.transpose(1, 2).reshape(-1, self.in_features)
        y = self._gemm(rows.contiguous())
        return y.reshape(b, hout, wout, self.out_channels).permute(0, 3, 1, 2).contiguous()

    def _fake_quant_act(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 grid of the kernels (``fxkernels.ops.quantize_act``, static), dequantized."""
        shape = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, shape[1])
        xq, sa, za = ops.quantize_act(rows.contiguous(), self.act_scale, self.act_zero)
        xd = (xq.to(torch.int32) - za[:, None]).float() * sa[:, None]
        return xd.to(x.dtype).reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[O, (I/groups)*kh*kw]`` (the 2-D format layout; ``.reshape(weight_shape)`` for conv2d)."""
        return dequantize(self.qweight, self.scale, self.zero, self.spec, self.in_features)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, spec={self.spec}, "
                f"bias={self.bias is not None}")

    @classmethod
    def from_entry(cls, entry: dict, device=None) -> "QuantConv2d":
        """An empty layer from its checkpoint entry (:meth:`entry`); buffers are loaded after."""
        return cls(entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]),
                   QuantSpec.from_dict(entry["spec"]), tuple(entry["stride"]), tuple(entry["padding"]),
                   tuple(entry["dilation"]), entry["groups"], bias=entry["bias"], device=device)

    def entry(self) -> dict:
        """This layer's checkpoint entry: geometry, bias flag and spec."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "spec": self.spec.to_dict()}


def _needs_pad(w2: torch.Tensor, spec: QuantSpec) -> bool:
    return spec.packed and w2.shape[1] % 2 == 1


def _pad_cols(w2: torch.Tensor) -> torch.Tensor:
    return torch.cat([w2, w2.new_zeros(w2.shape[0], 1)], dim=1)


def _pack_padded(codes: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """:func:`fxkernels.format.pack`, padding an odd K of nibble codes with the row's zero point."""
    codes = codes.to(torch.int32)
    if spec.packed and codes.shape[1] % 2:
        n = codes.shape[0]
        if spec.granularity == "group":
            raise ValueError(f"QuantConv2d: K={codes.shape[1]} is odd; group granularity needs an even K")
        z = zero.to(torch.int32).reshape(-1)
        pad = z.expand(n) if z.numel() == 1 else z
        codes = torch.cat([codes, pad.reshape(n, 1)], dim=1)
    return pack(codes, spec)


# -- checkpoints -----------------------------------------------------------------------------
def replace_convs(model: nn.Module, spec: QuantSpec, skip=(), overrides: Optional[Dict[str, QuantSpec]] = None,
                  mse: bool = False) -> nn.Module:
    """Replace every ``nn.Conv2d`` of ``model`` (in place) by an RTN :class:`QuantConv2d`;
    ``skip``/``overrides`` as in :func:`fxkernels.replace_linears`."""
    return replace_modules(model, nn.Conv2d, lambda m, sp: QuantConv2d.from_conv(m, sp, mse=mse), spec, skip,
                           overrides)


def save_quantized_cnn(model: nn.Module, directory: str, extra: Optional[dict] = None) -> str:
    """:func:`fxkernels.save_quantized` for a model holding QuantConv2d layers (and optionally
    QuantLinear and ChannelClippedReLU layers); refuses a model without convolutions."""
    from .checkpoint import save_quantized

    if not any(isinstance(m, QuantConv2d) for m in model.modules()):
        raise ValueError("save_quantized_cnn: model has no QuantConv2d layers; use fxkernels.save_quantized "
                         "for models with QuantLinear layers only")
    return save_quantized(model, directory, extra=extra)


def load_quantized_cnn(directory: str, model: nn.Module, device="cpu") -> nn.Module:
    """:func:`fxkernels.load_quantized` into ``model``, a float skeleton of the same architecture
    (its float weights are discarded; batch norms must already be folded the way the saved model
    was); refuses a checkpoint without convolutions."""
    from .checkpoint import CheckpointError, checkpoint_layers, load_quantized

    if not any(e["kind"] == "conv2d" for e in checkpoint_layers(directory).values()):
        raise CheckpointError(f"load_quantized_cnn: {directory} holds no conv2d layers; it is not a CNN "
                              "checkpoint (use fxkernels.load_quantized)")
    return load_quantized(directory, model=model, device=device)
