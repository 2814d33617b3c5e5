"""Per-weight caches for kernels that repack once at load (never per call)."""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Hashable, Tuple

import torch

# Keyed by id(weight) with a weak reference to check identity: a WeakKeyDictionary cannot hold
# tensors, because on a hash match it compares keys with ``==``, which for tensors is
# elementwise and raises "Boolean value of Tensor ... is ambiguous" on the second lookup.
_cache: Dict[int, Tuple["weakref.ref[torch.Tensor]", Dict[Hashable, tuple]]] = {}


def _forget(key: int, ref: "weakref.ref") -> None:
    slot = _cache.get(key)
    if slot is not None and slot[0] is ref:
        del _cache[key]


def version_of(t: torch.Tensor) -> int:
    """``t._version``, or -1 for an inference tensor (made under ``torch.inference_mode``), which
    keeps no version counter. Cache keys use it to notice in-place writes; inference tensors are
    only written in place inside inference mode, which quantized weights never are."""
    return -1 if t.is_inference() else t._version


def cached_repack(weight: torch.Tensor, tag: Hashable, make: Callable[[], object]):
    """``make()`` once per (weight tensor, tag); redone only if the tensor is written in place."""
    key = id(weight)
    slot = _cache.get(key)
    if slot is None or slot[0]() is not weight:
        ref = weakref.ref(weight, lambda r, key=key: _forget(key, r))
        slot = _cache[key] = (ref, {})
    entries = slot[1]
    hit = entries.get(tag)
    if hit is not None and hit[0] == version_of(weight):
        return hit[1]
    value = make()
    entries[tag] = (version_of(weight), value)
    return value
