"""Sibling projections that read the same input, run as one kernel call.

A decoder block calls ``q_proj``, ``k_proj`` and ``v_proj`` on the same hidden state, then
``gate_proj`` and ``up_proj`` on the same normalized input. At batch 1 each of these is a short
weight stream (55-440 KB for SmolLM2-135M), so fixed per-call costs (Python, argument conversion,
thread fork/join, prefetch ramp-up) take a large share of the time: one call over the
concatenated weight streams all of it at once (measured: SmolLM2 decode 1.86x -> ~2.2x fp32).

:func:`fuse_projections` rewires such siblings without changing the module tree or the checkpoint:

* the siblings' ``qweight``/``scale``/``zero``/``bias`` buffers are concatenated once into a fused
  :class:`~fxkernels.nn.QuantLinear` (not a registered submodule), and each sibling's buffers become
  row views of it, so no weight is held twice and ``state_dict``/``save_quantized`` see the same
  names and values as before (views share the base's version counter, so an in-place write to a
  sibling, e.g. ``load_state_dict``, also invalidates the fused layer's repacked weight);
* the first sibling called on an input runs the fused layer and keeps the others' slices; a
  sibling called on *that same tensor object* takes its slice. The outputs are bit-identical to
  the unfused layers (every output channel is computed the same way; the activation quantization
  is per row of the shared input).

Contract: siblings must read the same, unmodified input tensor (true of Hugging Face attention and
gated-MLP blocks). A sibling called on another tensor while outputs are still waiting (e.g.
cross-attention, where ``q_proj`` reads another input than ``k_proj``) switches the group back
to separate calls for good, and so does replacing a sibling's buffers (``.to()``, assignment). An
input modified *in place* between the sibling calls is not detected; do not fuse such models.
Only channel- and group-scaled layers with weight-only or dynamic int8 activations are fused
(per-tensor scales and static activation grids differ between siblings).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

# Sibling names of the common decoder families (Llama, Mistral, Qwen2, Gemma, ...; BERT/ViT).
DEFAULT_GROUPS: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                               ("query", "key", "value"))
_FIELDS = ("qweight", "scale", "zero", "bias")


def _incompatibility(layers: Sequence[nn.Module]) -> Optional[str]:
    """Why ``layers`` cannot share one fused call (None if they can)."""
    from .nn import QuantLinear
    first = layers[0]
    for m in layers:
        if type(m) is not QuantLinear:
            return f"{type(m).__name__} is not a QuantLinear"
        if m._fusion is not None:
            return "already fused"
    spec = first.spec
    if spec.granularity == "tensor":
        return "per-tensor scales differ between layers"
    if spec.act_bits and spec.act_mode == "static":
        return "static activation grids differ between layers"
    for m in layers[1:]:
        if (m.spec, m.in_features, m.input_rotation, m.bias is None) != \
                (spec, first.in_features, first.input_rotation, first.bias is None):
            return "spec, in_features, input rotation or bias presence differ"
        if any(getattr(m, f) is not None and getattr(m, f).device != first.qweight.device for f in _FIELDS):
            return "buffers on different devices"
    return None


class FusedGroup:
    """One fused layer and the bookkeeping that hands each sibling its slice of the output."""

    __slots__ = ("layer", "sizes", "members", "views", "state")

    def __init__(self, members: List[nn.Module]):
        from .nn import QuantLinear
        first = members[0]
        self.sizes = [m.out_features for m in members]
        fused = QuantLinear(first.in_features, sum(self.sizes), first.spec, bias=first.bias is not None,
                            device="meta", input_rotation=first.input_rotation)
        self.members = members
        self.views = []
        with torch.no_grad():
            for f in _FIELDS:
                parts = [getattr(m, f) for m in members]
                if parts[0] is None:
                    continue
                setattr(fused, f, torch.cat(parts, dim=0))
            for i, m in enumerate(members):
                a = sum(self.sizes[:i])
                for f in _FIELDS:
                    base = getattr(fused, f)
                    if base is not None:
                        setattr(m, f, base[a:a + self.sizes[i]])
                m._kernels.clear()
                m._fusion, m._fusion_index = self, i
                self.views.append(tuple(m._buffers[f] for f in _FIELDS))
        self.layer = fused
        # (input, per-sibling outputs still to hand out) as one tuple, so that a reader never pairs
        # one call's input with another call's outputs, even with threads sharing the model
        self.state: Optional[Tuple[torch.Tensor, List[Optional[torch.Tensor]]]] = None

    def dissolve(self) -> None:
        """Back to separate calls (each sibling keeps its row views, which stay correct)."""
        for m in self.members:
            m._fusion = None
            m._kernels.clear()
        self.state = None

    def output(self, member: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``member``'s output for ``x`` (from the fused call), or None if ``member`` must run on
        its own (the group was dissolved)."""
        i = member._fusion_index
        b = member._buffers
        v = self.views[i]
        if b["qweight"] is not v[0] or b["scale"] is not v[1] or b["zero"] is not v[2] or b["bias"] is not v[3]:
            self.dissolve()  # a sibling's buffers were replaced: the fused copy is stale
            return None
        state = self.state
        if state is not None:
            seen, outs = state
            if x is seen:
                y = outs[i]
                if y is not None:
                    outs[i] = None
                    if outs.count(None) == len(outs):
                        self.state = None  # all handed out: do not keep the input alive
                    return y
            elif outs.count(None) != len(outs):
                self.dissolve()  # siblings read different inputs: fusing only wastes work
                return None
        y = self.layer.forward(x)
        outs = list(y.split(self.sizes, dim=-1))
        if y.numel() > y.shape[-1]:
            outs = [o.contiguous() for o in outs]  # several rows: slices would be strided views
        mine = outs[i]
        outs[i] = None
        self.state = (x, outs)
        return mine


def fuse_projections(model: nn.Module, groups: Iterable[Sequence[str]] = DEFAULT_GROUPS) -> int:
    """Fuse sibling :class:`~fxkernels.nn.QuantLinear` layers that read the same input (see the
    module docstring for the contract); returns how many groups were fused.

    groups: tuples of child names; every module of ``model`` holding all names of a tuple as
    compatible QuantLinear children gets them fused (default: ``q/k/v_proj``, ``gate/up_proj``,
    ``query/key/value``). Groups whose layers are incompatible are left as they are.
    """
    groups = [tuple(g) for g in groups]
    for g in groups:
        if len(g) < 2 or not all(isinstance(n, str) and n for n in g):
            raise ValueError(f"fuse_projections: groups entry {g!r}; expected a tuple of two or more child names")
    count = 0
    for parent in list(model.modules()):
        children = parent._modules
        for names in groups:
            layers = [children.get(n) for n in names]
            if any(m is None for m in layers) or _incompatibility(layers) is not None:
                continue
            FusedGroup(layers)
            count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections` (siblings run separately again); returns the groups dissolved."""
    seen = set()
    for m in model.modules():
        g = getattr(m, "_fusion", None)
        if g is not None and id(g) not in seen:
            seen.add(id(g))
            g.dissolve()
    return len(seen)
