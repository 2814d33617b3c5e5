"""Learnable roundings: one module per method, all exporting to the same format v1 codes."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

from fxkernels.format import QuantSpec

from .adaround import AdaRoundQuantizer
from .base import RoundSTE, WeightQuantizer, round_ste
from .flexround import FlexRoundQuantizer
from .rtn import RTNQuantizer
from .signround import SignRoundQuantizer

QUANTIZERS = {
    "rtn": RTNQuantizer,
    "flexround": FlexRoundQuantizer,
    "adaround": AdaRoundQuantizer,
    "signround": SignRoundQuantizer,
}


def make_quantizer(method: str, weight: torch.Tensor, spec: QuantSpec,
                   options: Optional[Dict[str, Any]] = None) -> WeightQuantizer:
    """The quantizer of ``method`` for ``weight``; ``options`` are its constructor keywords."""
    if method not in QUANTIZERS:
        raise ValueError(f"method={method!r}; expected one of {sorted(QUANTIZERS)}")
    cls = QUANTIZERS[method]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "weight", "spec"}
    unknown = set(options or {}) - accepted
    if unknown:
        raise ValueError(f"options={sorted(unknown)} are not options of method={method!r}; "
                         f"expected some of {sorted(accepted)}")
    return cls(weight, spec, **(options or {}))


__all__ = ["QUANTIZERS", "make_quantizer", "WeightQuantizer", "RTNQuantizer", "FlexRoundQuantizer",
           "AdaRoundQuantizer", "SignRoundQuantizer", "RoundSTE", "round_ste"]
