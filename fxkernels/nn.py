"""QuantLinear: the drop-in replacement for ``nn.Linear`` that runs packed INT2..8 weights.

One class for every backend and every method: the module only holds the checkpoint's exact
tensors and calls :mod:`fxkernels.ops`; kernels are chosen per call by :mod:`fxkernels.dispatch`.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from . import dispatch, ops
from .format import QuantSpec, as_grouped, check_weight, pack, quantize_rtn, register_layer_buffers
from .backends._cache import version_of
from .reference import weight_sums
from .rotation import check_rotation_block, hadamard_transform



def check_grid(who: str, spec: QuantSpec, n: int, k: int, scale: torch.Tensor, zero: torch.Tensor,
               act_scale: Optional[torch.Tensor], act_zero: Optional[torch.Tensor]) -> bool:
    """Validate a learned grid for an ``[n, k]`` weight (shapes, positive scales, integer zeros in
    range, activation grid present exactly when ``spec`` has static activations); returns whether
    the activations are static. ``who`` prefixes the error messages."""
    shape = spec.scale_shape(n, k)
    if tuple(scale.shape) != shape or tuple(zero.shape) != shape:
        raise ValueError(f"{who}: scale {tuple(scale.shape)} / zero {tuple(zero.shape)}; expected {shape} for {spec}")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError(f"{who}: scale has non-positive or non-finite entries; expected positive finite scales")
    if zero.dtype.is_floating_point and not torch.equal(zero, zero.round()):
        raise ValueError(f"{who}: zero has fractional values; expected integer zero points")
    if (zero < 0).any() or (zero > spec.qmax).any():
        raise ValueError(f"{who}: zero spans [{int(zero.min())}, {int(zero.max())}]; expected [0, {spec.qmax}]")
    static = spec.act_bits is not None and spec.act_mode == "static"
    if static and (act_scale is None or act_zero is None):
        raise ValueError(f"{who}: {spec} needs act_scale and act_zero (static per-tensor activations)")
    if not static and (act_scale is not None or act_zero is not None):
        raise ValueError(f"{who}: act_scale/act_zero given but {spec} has no static activation grid")
    return static


@torch.no_grad()
def store_grid(layer: nn.Module, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bias: Optional[torch.Tensor], act_scale: Optional[torch.Tensor],
               act_zero: Optional[torch.Tensor]) -> None:
    """Copy validated codes and grids into a freshly built quantized layer's buffers."""
    layer.qweight.copy_(packed)
    layer.scale.copy_(scale.float())
    layer.zero.copy_(zero.to(torch.int32))
    if bias is not None:
        layer.bias.copy_(bias.detach().float())
    if act_scale is not None:
        layer.act_scale.copy_(act_scale.detach().float().reshape(1))
        layer.act_zero.copy_(act_zero.detach().to(torch.int32).reshape(1))


class _Plan:
    """A layer's call prepared once for inputs of one kind.

    ``stamp``: the buffer identities and write counters it was built for (see
    ``QuantLinear._stamp``); ``run``: the eager closure ``x2 -> y``; ``kernels``: what it runs
    (``backend`` names the last one's); ``steps``: the same calls as ``(torch operator, fixed
    arguments)`` pairs, applied in turn to the activation, for compiled graphs (None when a
    kernel has no operator form)."""

    __slots__ = ("stamp", "run", "kernels", "buffers", "steps")

    def __init__(self, stamp: tuple, run, kernels: tuple, layer: nn.Module, steps: Optional[tuple]):
        self.stamp, self.run, self.kernels, self.steps = stamp, run, kernels, steps
        # the stamp holds buffer ids: keeping the buffers alive keeps those ids from being reused
        self.buffers = tuple(layer._buffers.values())

    @property
    def backend(self) -> str:
        return self.kernels[-1].backend


def _in_graph() -> bool:
    """True while torch.compile / export / jit tracing runs the forward."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class QuantLinear(nn.Module):
    """``y = x @ dequant(qweight).T + bias`` with optional int8 activations.

    Buffers (all saved in the checkpoint; shapes fixed by ``spec``, see docs/FORMAT.md):
    ``qweight`` (uint8 ``[N, K/2]`` or int8 ``[N, K]``), ``scale`` fp32, ``zero`` int32,
    ``bias`` fp32 ``[N]`` (if any), and for ``act_mode="static"`` ``act_scale`` fp32 ``[1]`` and
    ``act_zero`` int32 ``[1]``. Build with :meth:`from_linear` (RTN) or :meth:`from_codes`.

    ``input_rotation=b`` (a power of two dividing ``in_features``; 0 = none): the stored weight is
    ``W H^T`` for the block-diagonal Hadamard ``H`` of block ``b`` and the layer computes
    ``(x H^T) dequant(qweight)^T``, which equals ``x W^T`` (see :mod:`fxkernels.rotation`).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 device=None, input_rotation: int = 0):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"QuantLinear: spec is {type(spec).__name__}; expected a fxkernels.QuantSpec")
        spec.check_shape(out_features, in_features)
        if input_rotation:
            check_rotation_block(input_rotation, in_features, "QuantLinear: input_rotation")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.input_rotation = int(input_rotation or 0)
        register_layer_buffers(self, spec, out_features, in_features, bias, device)
        self._kernels: Dict[tuple, "_Plan"] = {}  # prepared calls, see _plan
        self._graph: Optional[tuple] = None  # the plan compiled graphs call, see prepare
        self._grids: Optional[tuple] = None  # (stamp, grids), see _derived_grids
        self._fusion, self._fusion_index = None, 0  # set by fxkernels.fusion.fuse_projections

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                   bias: Optional[torch.Tensor] = None, act_scale: Optional[torch.Tensor] = None,
                   act_zero: Optional[torch.Tensor] = None, input_rotation: int = 0) -> "QuantLinear":
        """From learned integer codes: ``codes`` unsigned ``[N, K]`` in ``[0, 2**bits-1]``,
        ``scale``/``zero`` of ``spec.scale_shape`` (unsigned-domain integer zero). With
        ``input_rotation`` the codes quantize the rotated weight ``W H^T``."""
        if codes.dim() != 2:
            raise ValueError(f"from_codes: codes shape {tuple(codes.shape)}; expected [out_features, in_features]")
        n, k = codes.shape
        static = check_grid("from_codes", spec, n, k, scale, zero, act_scale, act_zero)
        layer = cls(k, n, spec, bias=bias is not None, device=codes.device, input_rotation=input_rotation)
        store_grid(layer, pack(codes, spec), scale, zero, bias, act_scale if static else None,
                   act_zero if static else None)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, mse: bool = False,
                    act_scale: Optional[torch.Tensor] = None,
                    act_zero: Optional[torch.Tensor] = None, input_rotation: int = 0) -> "QuantLinear":
        """Round-to-nearest quantization of an ``nn.Linear`` (``mse=True``: clipping search);
        with ``input_rotation`` the rotated weight ``W H^T`` is quantized."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: got {type(linear).__name__}; expected torch.nn.Linear")
        w = linear.weight.detach()
        check_weight(w, "linear.weight")
        if input_rotation:
            check_rotation_block(input_rotation, linear.in_features, "from_linear: input_rotation")
            w = hadamard_transform(w.float(), input_rotation)  # rows w -> w H^T (H is symmetric)
        q, scale, zero = quantize_rtn(w, spec, mse=mse)
        return cls.from_codes(q, scale, zero, spec, bias=linear.bias, act_scale=act_scale, act_zero=act_zero,
                              input_rotation=input_rotation)

    @classmethod
    def from_entry(cls, entry: dict, device=None) -> "QuantLinear":
        """An empty layer from its checkpoint entry (:meth:`entry`); buffers are loaded after."""
        return cls(entry["in_features"], entry["out_features"], QuantSpec.from_dict(entry["spec"]),
                   bias=entry["bias"], device=device, input_rotation=entry.get("input_rotation", 0))

    def entry(self) -> dict:
        """This layer's checkpoint entry: shapes, bias flag, spec and (if any) input rotation."""
        e = {"in_features": self.in_features, "out_features": self.out_features,
             "bias": self.bias is not None, "spec": self.spec.to_dict()}
        if self.input_rotation:
            e["input_rotation"] = self.input_rotation
        return e

    # -- running -----------------------------------------------------------------------------
    def _derive(self):
        """Grouped ``[N, G]`` scale/zero and (int8 activations) per-group code sums."""
        scale_g = as_grouped(self.scale, self.spec, self.out_features)
        zero_g = as_grouped(self.zero, self.spec, self.out_features)
        wsum = (weight_sums(self.qweight, self.spec.bits, self.in_features, scale_g.shape[1])
                if self.spec.act_bits else None)
        return scale_g, zero_g, wsum

    def _stamp(self) -> tuple:
        """Identity and write counters of every buffer a plan binds: a plan is rebuilt whenever
        one was replaced (``.to()``, assignment) or written in place (``load_state_dict``)."""
        b = self._buffers
        qw, sc, zr = b["qweight"], b["scale"], b["zero"]
        ids = (id(qw), id(sc), id(zr), id(b["bias"]), id(b.get("act_scale")), id(b.get("act_zero")))
        try:
            return ids + (qw._version, sc._version, zr._version)
        except RuntimeError:  # inference tensors keep no version counter (and are not written in place)
            return ids + (version_of(qw), version_of(sc), version_of(zr))

    def _derived_grids(self) -> tuple:
        """:meth:`_derive`, computed once per buffer stamp: every plan of the layer (one per M
        bucket, dtype, ...) binds the same grid tensors, so the kernels' repacked weights, which
        are cached per grid tensor, are made once per layer rather than once per plan."""
        stamp = self._stamp()
        if self._grids is None or self._grids[0] != stamp:
            self._grids = (stamp, self._derive())
        return self._grids[1]

    def _check_static_grid(self) -> None:
        """A static activation scale must be positive. Checked once per prepared plan (reading it
        on an accelerator is a device sync, which a forward must never do)."""
        act_scale = self._buffers.get("act_scale")
        if act_scale is not None and not bool((act_scale > 0).all()):
            raise ValueError(f"QuantLinear: act_scale={act_scale.tolist()}; expected a positive scale")

    def _make_plan(self, x2: torch.Tensor, out_dtype: torch.dtype) -> "_Plan":
        """Validate and select the kernels for inputs like ``x2`` once, and bind every argument
        but the activation, so an eager call is one Python closure around the kernel and a
        compiled graph one operator call per kernel."""
        scale_g, zero_g, wsum = self._derived_grids()
        b = self._buffers
        qw, bias, bits = b["qweight"], b["bias"], self.spec.bits
        if self.spec.act_bits:
            self._check_static_grid()
            act = (b.get("act_scale"), b.get("act_zero"))
            ops.check_args("quantize_act", x2, *act)
            qk = dispatch.select("quantize_act", x2, *act)
            xq, sa, za = qk.run(x2, *act)
            tail = (qw, scale_g, zero_g, wsum, bias, bits, out_dtype)
            ops.check_args("qact_linear", xq, sa, za, *tail)
            lk = dispatch.select("qact_linear", xq, sa, za, *tail)
            quant, linear = dispatch.bind(qk, (x2, *act)), dispatch.bind(lk, (xq, sa, za, *tail))
            steps = (dispatch.graph_call(qk, (x2, *act)), dispatch.graph_call(lk, (xq, sa, za, *tail)))
            return _Plan(self._stamp(), lambda x: linear(*quant(x)), (qk, lk), self,
                         None if None in steps else steps)
        args = (x2, qw, scale_g, zero_g, bias, bits, self.in_features)
        ops.check_args("dequant_linear", *args)
        kernel = dispatch.select("dequant_linear", *args)
        step = dispatch.graph_call(kernel, args)
        return _Plan(self._stamp(), dispatch.bind(kernel, args), (kernel,), self,
                     None if step is None else (step,))

    def _plan(self, x2: torch.Tensor, out_dtype: torch.dtype) -> "_Plan":
        """The prepared call for inputs like ``x2``: one per (dtype, device, M bucket, alignment,
        dispatch state), rebuilt whenever a buffer was replaced or written (see _stamp).

        The torch.library layer and per-call argument checks cost tens of microseconds, which at
        ~200 linears per decoded token of a small model is a large share of each step (measured:
        2.40x -> 2.8x decode speed-up over fp32 without them), so they run once per plan."""
        m = x2.shape[0]
        key = (x2.dtype, x2.device, m if m <= 16 else -1, x2.data_ptr() % 16 == 0, dispatch.selection_state())
        plan = self._kernels.get(key)
        if plan is None or plan.stamp != self._stamp():
            plan = self._kernels[key] = self._make_plan(x2, out_dtype)
        return plan

    @torch.no_grad()
    def prepare(self, dtype: torch.dtype = torch.float32, rows: int = 1) -> "QuantLinear":
        """Prepare the layer for compiled graphs (``torch.compile``, export, CUDA-graph capture):
        choose its kernels for ``dtype`` activations of ``rows`` rows on the layer's device, repack
        the weight, check the grid, and pin the result, so the traced forward is one registered
        operator call per kernel, with no Python, no host-device sync and no per-call preparation.
        The pin is dropped when the layer is moved or loaded (``.to()``, ``load_state_dict``) and
        ignored when a buffer is replaced; the traced forward then falls back to the generic
        ``fxk::`` ops. Eager calls need no preparation. Returns ``self``."""
        x2 = torch.zeros(rows, self.in_features, dtype=dtype, device=self.qweight.device)
        plan = self._plan(x2, dtype)
        self._graph = (self._buffers["qweight"], dtype, self._derived_grids(), plan.steps)
        return self

    def _graph_forward(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The traced forward: the pinned operators (see prepare) when they fit, else the generic
        registered ops, which graphs see as opaque, schema-checked nodes."""
        pinned = self._graph
        if pinned is not None and pinned[0] is self._buffers["qweight"] and pinned[1] == x2.dtype:
            derived, steps = pinned[2], pinned[3]
            if steps is not None:
                args = (x2,)
                for op, fixed in steps:
                    out = op(*args, *fixed)
                    args = out if isinstance(out, (tuple, list)) else (out,)
                return args[0]
        else:
            derived = self._derive()
        scale_g, zero_g, wsum = derived
        b = self._buffers
        if self.spec.act_bits:
            xq, sa, za = ops.quantize_act(x2, b.get("act_scale"), b.get("act_zero"))
            return ops.qact_linear(xq, sa, za, b["qweight"], scale_g, zero_g, wsum, b["bias"], self.spec.bits,
                                   out_dtype)
        return ops.dequant_linear(x2, b["qweight"], scale_g, zero_g, b["bias"], self.spec.bits, self.in_features)

    def _apply(self, fn, recurse=True):
        # moved or converted buffers: every prepared call binds the old ones
        self._kernels.clear()
        self._graph = self._grids = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._graph = None  # in-place writes: the pinned repack is stale (eager plans check stamps)
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusion is not None and not _in_graph():
            y = self._fusion.output(self, x)  # one kernel call shared with sibling layers
            if y is not None:
                return y
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"QuantLinear: input shape {tuple(x.shape)}; expected [..., {k}]")
        x2 = x.reshape(-1, k)
        if self.input_rotation:
            x2 = hadamard_transform(x2, self.input_rotation)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if _in_graph() or type(x2) is not torch.Tensor:
            y = self._graph_forward(x2, x.dtype)
        else:
            y = self._plan(x2, x.dtype).run(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The stored weight, dequantized (``W H^T`` for a layer with an input rotation)."""
        from .format import dequantize
        return dequantize(self.qweight, self.scale, self.zero, self.spec, self.in_features)

    def float_weight(self) -> torch.Tensor:
        """The weight the layer applies to its *unrotated* input: ``F.linear(x, float_weight())``
        equals the layer without activation quantization (up to fp32 rounding)."""
        w = self.dequantized_weight()
        return hadamard_transform(w, self.input_rotation) if self.input_rotation else w

    def extra_repr(self) -> str:
        rot = f", input_rotation={self.input_rotation}" if self.input_rotation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}, "
                f"bias={self.bias is not None}{rot}")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def replace_modules(model: nn.Module, kind: type, build, spec: QuantSpec, skip: Iterable[str] = (),
                    overrides: Optional[Dict[str, QuantSpec]] = None) -> nn.Module:
    """Replace every ``kind`` module of ``model`` (in place) by ``build(module, layer_spec)``.
    ``skip``/``overrides`` as in :func:`replace_linears` (an override wins over ``skip``)."""
    overrides = dict(overrides or {})
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, kind):
            continue
        layer_spec = next((s for p, s in overrides.items() if _matches(name, [p])), None)
        if layer_spec is None:
            if _matches(name, skip):
                continue
            layer_spec = spec
        set_submodule(model, name, build(mod, layer_spec))
    return model


def replace_linears(model: nn.Module, spec: QuantSpec, skip: Iterable[str] = ("lm_head",),
                    overrides: Optional[Dict[str, QuantSpec]] = None, mse: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an RTN :class:`QuantLinear`.

    skip: names or glob patterns (full dotted name or last component) left in float.
    overrides: pattern -> spec for layers that need another format (e.g. ``{"lm_head": W8}``);
    an override wins over ``skip``. Returns ``model``.
    """
    return replace_modules(model, nn.Linear, lambda m, sp: QuantLinear.from_linear(m, sp, mse=mse), spec, skip,
                           overrides)
