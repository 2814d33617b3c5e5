"""Per-weight caches for kernels that repack once at load (never per call)."""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Hashable

import torch

_cache: "weakref.WeakKeyDictionary[torch.Tensor, Dict[Hashable, tuple]]" = weakref.WeakKeyDictionary()


def cached_repack(weight: torch.Tensor, tag: Hashable, make: Callable[[], object]):
    """``make()`` once per (weight tensor, tag); redone only if the tensor is written in place."""
    entries = _cache.setdefault(weight, {})
    hit = entries.get(tag)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    value = make()
    entries[tag] = (weight._version, value)
    return value
