"""The rounding methods by name: each method's file registers its class here.

A method is one :class:`~quantizer.rounding.base.WeightQuantizer` subclass whose class attributes
state its learning policy (see ``WeightQuantizer``); the configuration, the command-line choices
and the reconstruction engine read that policy from here and never test a method's name.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

_METHODS: Dict[str, type] = {}


def register_method(cls: Type) -> Type:
    """Class decorator: make ``cls`` available as ``method=cls.method``."""
    from .base import WeightQuantizer

    if not (isinstance(cls, type) and issubclass(cls, WeightQuantizer)):
        raise TypeError(f"register_method: got {cls!r}; expected a WeightQuantizer subclass")
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name.isidentifier() or name == WeightQuantizer.method:
        raise ValueError(f"register_method: {cls.__name__}.method={name!r}; expected the method's own name "
                         "(a Python identifier)")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"register_method: method={name!r} is already registered by {_METHODS[name].__name__}")
    cls.check_policy()
    _METHODS[name] = cls
    return cls


def method_names() -> Tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def method_class(name: str) -> Type:
    """The class registered as ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r}; expected one of {method_names()}") from None


def methods_help() -> str:
    """One line per method: its name and the first line of its class docstring (for ``--help``)."""
    lines = []
    for name, cls in _METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(f"{name}: {doc[0].rstrip('.') if doc else cls.__name__}")
    return "; ".join(lines)
