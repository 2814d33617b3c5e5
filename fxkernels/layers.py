"""The layer kinds a checkpoint can hold, and the one place that turns an entry into a module.

Every entry of ``quant_config.json``'s ``layers`` table names its ``kind``; a :class:`LayerKind`
says which module class stores that kind, which float modules it stands in for, how a module
describes itself as an entry and how an empty module is rebuilt from one. Every loader goes
through :func:`install_layers` / :func:`layer_from_entry`: ``fxkernels.load_quantized`` (language
models and CNNs alike), the transformers quantizer of :mod:`fxkernels.hf`, and the quantizer's
resume files. A new quantized module is one :func:`register_layer_kind` call.

Built-in kinds (docs/FORMAT.md): ``"linear"`` (:class:`~fxkernels.nn.QuantLinear`), ``"conv2d"``
(:class:`~fxkernels.conv.QuantConv2d`) and ``"channel_clipped_relu"``
(:class:`~fxkernels.conv.ChannelClippedReLU`, the per-channel clip of an equalized network).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .conv import ChannelClippedReLU, QuantConv2d
from .nn import QuantLinear, set_submodule


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (missing, corrupt, mismatched, too new)."""


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one kind of checkpoint entry maps to a module.

    name: the entry's ``"kind"`` string.
    cls: the module class that holds the stored tensors.
    replaces: the float module classes a skeleton holds where this kind goes.
    build: ``(entry, device) -> module`` with every buffer allocated (values are loaded after).
    describe: ``module -> entry`` without the ``"kind"`` key.
    mismatch: ``(float module, entry) -> None or a reason`` why the entry does not fit it.
    weight_shape: ``entry -> (N, K)`` of the stored weight matrix, or None for a kind without one.
    """

    name: str
    cls: type
    replaces: Tuple[type, ...]
    build: Callable[[dict, object], nn.Module]
    describe: Callable[[nn.Module], dict]
    mismatch: Callable[[nn.Module, dict], Optional[str]]
    weight_shape: Optional[Callable[[dict], Tuple[int, int]]] = None


_KINDS: Dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> None:
    """Add (or replace, for the same class) a kind; two kinds may not share one class."""
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_layer_kind: kind is {type(kind).__name__}; expected a LayerKind")
    clash = next((k for k in _KINDS.values() if k.cls is kind.cls and k.name != kind.name), None)
    if clash is not None:
        raise ValueError(f"register_layer_kind: {kind.cls.__name__} is already registered as kind {clash.name!r}; "
                         f"expected one kind per module class, got {kind.name!r}")
    _KINDS[kind.name] = kind


def layer_kinds() -> Dict[str, LayerKind]:
    """A copy of the registry: kind name -> :class:`LayerKind`."""
    return dict(_KINDS)


def get_layer_kind(name: str) -> LayerKind:
    kind = _KINDS.get(name)
    if kind is None:
        raise CheckpointError(f"layer kind={name!r} is unknown to this fxkernels; expected one of {sorted(_KINDS)} "
                              "(a newer writer's kind: upgrade flexround)")
    return kind


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The registered kind whose class is exactly ``type(module)``, else None."""
    return next((k for k in _KINDS.values() if type(module) is k.cls), None)


def layer_entry(module: nn.Module) -> dict:
    """The checkpoint entry of a module of a registered kind: ``{"kind": name, ...}``."""
    kind = kind_of(module)
    if kind is None:
        raise ValueError(f"layer_entry: {type(module).__name__} is not a registered layer kind; expected one of "
                         f"{sorted(k.cls.__name__ for k in _KINDS.values())}")
    return {"kind": kind.name, **kind.describe(module)}


def layer_entries(model: nn.Module) -> Dict[str, dict]:
    """``{dotted name: entry}`` for every module of ``model`` of a registered kind."""
    return {name: layer_entry(m) for name, m in model.named_modules() if kind_of(m) is not None}


def entry_kind(entry: dict, name: Optional[str] = None) -> LayerKind:
    """The kind of an entry; entries without ``"kind"`` (format versions 1 and 2, resume files
    written before the registry) are linear layers. ``name`` (the layer's) goes into errors."""
    if not isinstance(entry, dict):
        where = "" if name is None else f"layer {name!r}: "
        raise CheckpointError(f"{where}layer entry is a {type(entry).__name__}; expected a JSON object")
    return get_layer_kind(entry.get("kind", "linear"))


@contextlib.contextmanager
def _float32_default():
    # The format stores bias and activation scales in fp32; transformers builds models under the
    # requested dtype as torch's default, which would otherwise allocate (and round into) bf16 buffers.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def layer_from_entry(entry: dict, device=None) -> nn.Module:
    """An empty module for ``entry`` (buffers allocated on ``device``, values loaded after)."""
    kind = entry_kind(entry)
    with _float32_default():
        return kind.build(entry, device)


def upgrade_entries(config: dict) -> Dict[str, dict]:
    """The ``layers`` table of a ``quant_config.json`` of any readable version as current entries.

    Version 3 entries carry their ``kind``. Versions 1 and 2 listed linear layers in ``layers``
    (no kind), and CNN checkpoints added ``conv_layers`` (QuantConv2d geometry) and ``clip_layers``
    (name -> channels); both become entries of their kinds here. Returns fresh dicts.
    """
    out = {}
    for name, e in config.get("layers", {}).items():
        # a malformed entry is passed on as is: entry_kind refuses it with its type
        out[name] = ({"kind": "linear", **e} if "kind" not in e else dict(e)) if isinstance(e, dict) else e
    for name, g in config.get("conv_layers", {}).items():
        out[name] = {"kind": "conv2d", **g}
    for name, channels in config.get("clip_layers", {}).items():
        out[name] = {"kind": "channel_clipped_relu", "channels": int(channels)}
    return out


def install_layers(model: nn.Module, entries: Dict[str, dict], device=None, who: str = "load_quantized") -> nn.Module:
    """Replace each named module of ``model`` by an empty module of its entry's kind (in place).

    Each target must exist and be a float module of the kind's ``replaces`` classes (or already
    the kind's class) whose shape matches the entry; ``device`` None takes the device of the
    replaced module's first parameter (meta for a skeleton built on meta). ``who`` prefixes errors.
    """
    for name, entry in entries.items():
        kind = entry_kind(entry, name)
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{who}: layer {name!r} of the checkpoint is not in the model "
                                  f"({type(model).__name__}); the checkpoint belongs to another architecture") from e
        if not isinstance(old, kind.replaces + (kind.cls,)):
            raise CheckpointError(f"{who}: layer {name!r} is a {type(old).__name__} in the model; the checkpoint "
                                  f"stores it as kind {kind.name!r}, which replaces "
                                  f"{' or '.join(c.__name__ for c in kind.replaces)}")
        problem = None if isinstance(old, kind.cls) else kind.mismatch(old, entry)
        if problem:
            raise CheckpointError(f"{who}: layer {name!r} {problem}")
        where = device
        if where is None:
            where = next(iter(old.parameters()), next(iter(old.buffers()), torch.empty(0))).device
        set_submodule(model, name, layer_from_entry(entry, device=where))
    return model


# -- built-in kinds ------------------------------------------------------------------------------
def _linear_mismatch(old: nn.Linear, e: dict) -> Optional[str]:
    if (old.in_features, old.out_features) != (e["in_features"], e["out_features"]):
        return (f"is {old.in_features}->{old.out_features} in the model but {e['in_features']}->"
                f"{e['out_features']} in the checkpoint")
    return None


def _conv_geometry(g) -> tuple:
    def pair(v):
        return tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    if isinstance(g, dict):
        return (g["in_channels"], g["out_channels"], pair(g["kernel_size"]), pair(g["stride"]), pair(g["padding"]),
                pair(g["dilation"]), g["groups"])
    return (g.in_channels, g.out_channels, pair(g.kernel_size), pair(g.stride), pair(g.padding), pair(g.dilation),
            g.groups)


def _conv_mismatch(old: nn.Conv2d, e: dict) -> Optional[str]:
    fields = "(in, out, kernel, stride, padding, dilation, groups)"
    if _conv_geometry(old) != _conv_geometry(e):
        return f"is {_conv_geometry(old)} {fields} in the model but {_conv_geometry(e)} in the checkpoint"
    return None


def _clip_build(e: dict, device) -> ChannelClippedReLU:
    layer = ChannelClippedReLU(int(e["channels"]))
    return layer.to(device) if device is not None else layer


register_layer_kind(LayerKind(
    "linear", QuantLinear, (nn.Linear,), build=lambda e, device: QuantLinear.from_entry(e, device=device),
    describe=lambda m: m.entry(), mismatch=_linear_mismatch,
    weight_shape=lambda e: (e["out_features"], e["in_features"])))
register_layer_kind(LayerKind(
    "conv2d", QuantConv2d, (nn.Conv2d,), build=lambda e, device: QuantConv2d.from_entry(e, device=device),
    describe=lambda m: m.entry(), mismatch=_conv_mismatch,
    weight_shape=lambda e: (e["out_channels"], e["in_channels"] // e["groups"] * e["kernel_size"][0]
                            * e["kernel_size"][1])))
register_layer_kind(LayerKind(
    "channel_clipped_relu", ChannelClippedReLU, (nn.ReLU6, nn.ReLU, nn.Hardtanh), build=_clip_build,
    describe=lambda m: {"channels": m.upper.numel()}, mismatch=lambda old, e: None))
