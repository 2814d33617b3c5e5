"""Kernel selection: an ordered list of candidates per op, each saying whether it can run a call.

Backends (``fxkernels/backends/<name>.py``) call :func:`register` when imported. For every call
the first registered kernel (highest ``priority``) whose ``can_implement(*args) -> (ok, reason)``
accepts the arguments runs it; the pure-torch reference is always last. When nothing fits (only
possible when the reference is disabled) the error lists every candidate's reason.

Control from the environment (read at every selection, so tests may change them):

* ``FXK_DISABLED_KERNELS=cpu,triton_w4a16``: comma-separated kernel names or backend names to skip.
* ``FXK_FORCE_BACKEND=cpu``: only that backend (or kernel name) may run; its refusal is an error
  instead of a silent fallback, which is what tests and benchmarks want.

and from code: ``with fxkernels.use_backend("triton"): ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
import warnings
from typing import Callable, Dict, List, Optional, Tuple

BACKEND_MODULES = ("cuda", "triton", "cpu")  # import order; priority decides the run order
OPS = ("dequant_linear", "quantize_act", "qact_linear")
# How many leading arguments of each op change from call to call (the activations); the rest
# (weights, grids, flags) are fixed for a given layer and may be bound once (see bind).
VARYING_ARGS = {"dequant_linear": 1, "quantize_act": 1, "qact_linear": 3}


@dataclasses.dataclass
class Kernel:
    """One implementation of one op.

    name: unique, e.g. ``"cpu_avx2_dequant"``; backend: ``"cpu" | "triton" | "cuda" | "reference"``;
    op: one of :data:`OPS`; run: takes the op's arguments and returns its result;
    can_implement: same arguments, returns ``(ok, reason)`` and must be cheap (no device syncs);
    priority: higher runs first; bind (optional): takes the op's arguments once (the leading
    :data:`VARYING_ARGS` as examples) and returns ``f(*varying) -> result`` with the others fixed,
    preparing whatever it can (e.g. a repacked weight) outside the per-call path; graph
    (optional): same arguments as bind, returns ``(operator, fixed)``, a registered torch operator
    and the non-varying arguments, such that ``operator(*varying, *fixed)`` runs the kernel: the
    form compiled graphs (torch.compile, CUDA graphs) call with no Python in between.
    """

    name: str
    backend: str
    op: str
    run: Callable
    can_implement: Callable[..., Tuple[bool, str]]
    priority: int = 0
    bind: Optional[Callable] = None
    graph: Optional[Callable] = None


def graph_call(kernel: Kernel, args: tuple) -> Optional[tuple]:
    """``(operator, fixed)`` for compiled graphs (see :class:`Kernel`), or None when the kernel
    has no operator form (graphs then call the generic ``fxk::`` op)."""
    return kernel.graph(*args) if kernel.graph is not None else None


def bind(kernel: Kernel, args: tuple) -> Callable:
    """``f(*varying)`` running ``kernel`` with the non-varying part of ``args`` fixed."""
    if kernel.bind is not None:
        return kernel.bind(*args)
    fixed, run = tuple(args[VARYING_ARGS[kernel.op]:]), kernel.run
    return lambda *varying: run(*varying, *fixed)


_registry: Dict[str, List[Kernel]] = {op: [] for op in OPS}
_backend_status: Dict[str, Tuple[bool, str]] = {}
_loaded = False
_load_lock = threading.Lock()
_local = threading.local()


def register(kernel: Kernel) -> None:
    if kernel.op not in _registry:
        raise ValueError(f"register: op={kernel.op!r}; expected one of {OPS}")
    kernels = [k for k in _registry[kernel.op] if k.name != kernel.name]
    kernels.append(kernel)
    kernels.sort(key=lambda k: -k.priority)
    _registry[kernel.op] = kernels


def set_backend_status(backend: str, ok: bool, reason: str) -> None:
    """Backends report whether they can run on this machine at all (and why not)."""
    _backend_status[backend] = (ok, reason)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        from . import reference_backend  # noqa: F401  (registers the fallback)

        for name in BACKEND_MODULES:
            try:
                importlib.import_module(f"fxkernels.backends.{name}")
            except ImportError as e:  # a missing optional dependency or extension
                set_backend_status(name, False, f"import failed: {e}")
                if name == "cpu":  # always built by setup.py: its absence deserves a word
                    warnings.warn(f"fxkernels: compiled CPU kernels unavailable ({e}); "
                                  "falling back to the pure-torch reference (slow)", RuntimeWarning, stacklevel=3)
            except Exception as e:  # a broken backend must not take the package down
                set_backend_status(name, False, f"import error: {type(e).__name__}: {e}")
        _loaded = True


def _disabled() -> set:
    return {s.strip() for s in os.environ.get("FXK_DISABLED_KERNELS", "").split(",") if s.strip()}


def _forced() -> Optional[str]:
    stack = getattr(_local, "forced", None)
    if stack:
        return stack[-1]
    return os.environ.get("FXK_FORCE_BACKEND") or None


@contextlib.contextmanager
def use_backend(name: str):
    """Run only kernels of backend (or kernel name) ``name`` inside the block; refusals raise."""
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


# os.environ.get encodes the key and decodes the value on every call (~1 us each); the eager
# QuantLinear path asks for the selection state on every call, so it reads the environment's
# underlying bytes mapping (kept in sync by os.environ / monkeypatch.setenv) where there is one.
_ENV_BYTES = getattr(os.environ, "_data", None)
_settings: Dict[str, object] = {}
_settings_key: tuple = ()


def set_setting(name: str, value) -> None:
    """Record a backend setting that changes what its kernels compute (e.g. the CPU backend's
    activation digits). Settings are part of :func:`selection_state`, so callers' cached plans are
    rebuilt for a new value and found again when an earlier value comes back."""
    global _settings_key
    _settings[name] = value
    _settings_key = tuple(sorted(_settings.items()))

if not (isinstance(_ENV_BYTES, dict) and all(isinstance(k, bytes) for k in list(_ENV_BYTES)[:1])):
    _ENV_BYTES = None


def selection_state() -> tuple:
    """What besides the arguments decides a selection (part of callers' kernel-cache keys)."""
    # the backends load on the first call: counting the registry before that would give every
    # caller a key that changes after its first selection (and a plan built twice)
    if not _loaded:
        _ensure_loaded()
    if _ENV_BYTES is not None:
        disabled, forced_env = _ENV_BYTES.get(b"FXK_DISABLED_KERNELS"), _ENV_BYTES.get(b"FXK_FORCE_BACKEND")
        stack = getattr(_local, "forced", None)
        return disabled, stack[-1] if stack else forced_env, len(_registry[OPS[0]]), _settings_key
    return os.environ.get("FXK_DISABLED_KERNELS", ""), _forced(), len(_registry[OPS[0]]), _settings_key


def candidates(op: str) -> List[Kernel]:
    _ensure_loaded()
    return list(_registry[op])


def select(op: str, *args) -> Kernel:
    """The kernel that will run ``op(*args)``; raises with every rejection reason if none fits."""
    _ensure_loaded()
    disabled = _disabled()
    forced = _forced()
    reasons = []
    for k in _registry[op]:
        if forced is not None and forced not in (k.name, k.backend):
            continue
        if k.name in disabled or k.backend in disabled:
            reasons.append(f"{k.name}: disabled by FXK_DISABLED_KERNELS")
            continue
        ok, why = k.can_implement(*args)
        if ok:
            return k
        reasons.append(f"{k.name}: {why}")
    where = f" (forced backend {forced!r})" if forced else ""
    detail = "; ".join(reasons) if reasons else "no kernel of that backend is registered"
    raise RuntimeError(f"fxkernels: no kernel can run {op}{where}: {detail}")


def run(op: str, *args):
    return select(op, *args).run(*args)


def available_kernels() -> List[dict]:
    """Every registered kernel with whether its backend can be used on this machine and why."""
    _ensure_loaded()
    rows = []
    for op in OPS:
        for k in _registry[op]:
            ok, reason = _backend_status.get(k.backend, (True, "available"))
            if k.name in _disabled() or k.backend in _disabled():
                ok, reason = False, "disabled by FXK_DISABLED_KERNELS"
            rows.append(dict(op=op, name=k.name, backend=k.backend, priority=k.priority,
                             usable=ok, reason=reason))
    for backend, (ok, reason) in _backend_status.items():
        if not any(r["backend"] == backend for r in rows):
            rows.append(dict(op="-", name=backend, backend=backend, priority=0, usable=ok, reason=reason))
    return rows


def format_kernel_table(rows: Optional[List[dict]] = None) -> str:
    rows = available_kernels() if rows is None else rows
    head = ("op", "kernel", "backend", "usable", "why")
    body = [(r["op"], r["name"], r["backend"], "yes" if r["usable"] else "no", r["reason"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
