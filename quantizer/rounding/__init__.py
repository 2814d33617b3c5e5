"""Learnable roundings: one module per method, all exporting to the same format codes.

Each method's file defines one :class:`WeightQuantizer` subclass, declares its learning policy
in class attributes and registers it with :func:`register_method`; importing this package
registers the built-in methods in the order below.

Adding a method is one file here (imported below) plus its test: subclass ``WeightQuantizer``,
implement ``scale_zero`` and ``codes_float`` (and ``regularizer``/``project`` if it has them),
set ``method`` and the policy attributes, define ``default_learning_rate`` (and
``make_optimizer`` unless Adam suits), and decorate the class with ``@register_method``. The
configuration, ``flexround quantize --method``, the vision command and both model families pick
it up from the registry; ``tests/test_method_registry.py`` shows a complete one.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

from fxkernels.format import QuantSpec

from .base import RoundSTE, WeightQuantizer, round_ste
from .registry import method_class, method_names, methods_help, register_method
from .rtn import RTNQuantizer
from .flexround import FlexRoundQuantizer
from .adaround import AdaRoundQuantizer
from .signround import SignRoundQuantizer


def make_quantizer(method: str, weight: torch.Tensor, spec: QuantSpec,
                   options: Optional[Dict[str, Any]] = None) -> WeightQuantizer:
    """The quantizer of ``method`` for ``weight``; ``options`` are its constructor keywords."""
    cls = method_class(method)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "weight", "spec"}
    unknown = set(options or {}) - accepted
    if unknown:
        raise ValueError(f"options={sorted(unknown)} are not options of method={method!r}; "
                         f"expected some of {sorted(accepted)}")
    return cls(weight, spec, **(options or {}))


__all__ = ["make_quantizer", "method_class", "method_names", "methods_help", "register_method", "WeightQuantizer",
           "RTNQuantizer", "FlexRoundQuantizer", "AdaRoundQuantizer", "SignRoundQuantizer", "RoundSTE", "round_ste"]
