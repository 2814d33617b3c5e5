"""Where a quantization run learns: the compute device, where the streams live, what a unit needs.

The model's weights stay on the CPU. Each unit (a decoder block) moves to the compute device for
its learning and comes back as exported layers on the CPU. The streams (float inputs, quantized
inputs, float targets: ``rows x seqlen x hidden`` fp32 each) live on the compute device when they
fit next to the unit's learning state within the memory budget, else in CPU memory (pinned on
CUDA, so that mini-batches copy asynchronously).

On the CPU every helper here is the identity: no copy, no autocast, no CUDA call, so a CPU run
computes exactly what it computed before devices existed (same seed: same codes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
from typing import Callable, Dict, Optional

import torch
from torch import nn

# Bytes per quantized weight a learned method holds while learning, in units of the fp32 weight:
# the rounding's copy of the weight (1), the per-weight learned parameter (FlexRound's S2,
# AdaRound's V, SignRound's offset: 1), its gradient (1), Adam's two moments (2), the initial
# state kept in case learning does not help (1: parameters only, buffers are shared) and the
# autograd tensors saved by the straight-through forward for the backward (~3).
LEARNING_STATE_FACTOR = 9
# Export and propagation without learning (RTN, iters=0): the rounding's weight copy and the
# dequantized weight of the frozen layer.
STATIC_STATE_FACTOR = 2
# Streams alive at once in the unit loop: xfp, xq and targets (while the next xq is built, the
# old xfp is already gone), plus the captured inputs that quantize()'s caller frame still holds.
STREAMS_ALIVE = 4


def check_device(value) -> torch.device:
    """``value`` ("cpu", "cuda", "cuda:<index>" or a torch.device) as a device that exists here.
    Raises ``ValueError`` naming the value and what was expected. CUDA is only queried for a
    CUDA device, so a CPU run never initializes it."""
    if isinstance(value, torch.device):
        dev = value
    elif isinstance(value, str):
        try:
            dev = torch.device(value)
        except RuntimeError:
            raise ValueError(f"device={value!r}: not a device name; expected 'cpu', 'cuda' or 'cuda:<index>'") from None
    else:
        raise ValueError(f"device={value!r}: got {type(value).__name__}; expected 'cpu', 'cuda' or 'cuda:<index>'")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device={value!r}: the quantizer learns on 'cpu' or 'cuda[:index]', not {dev.type!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={value!r}: no CUDA device is available here (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda}); expected 'cpu' on this machine")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ValueError(f"device={value!r}: this machine has {count} CUDA device(s); expected cuda:0"
                         + (f"..cuda:{count - 1}" if count > 1 else ""))
    return torch.device("cuda", index)


# -- memory ---------------------------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The process's resident set size now."""
    now = _status_kb("VmRSS")
    if now is not None:
        return now
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the peak is the best bound


def rss_peak_bytes() -> int:
    """The process's resident high-water mark so far (``VmHWM``; ``ru_maxrss`` without /proc).
    Never reset here: a benchmark reading it after the run sees the run's true peak."""
    peak = _status_kb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_heap() -> None:
    """Return freed C-heap pages to the OS (glibc ``malloc_trim``): without it a released block's
    hundreds of MB stay in the process's resident size and the next block adds to them."""
    from fxkernels.generation.engine import release_free_heap as trim

    trim()


# glibc's mallopt parameter number and the threshold the streaming path sets (see map_large_allocations).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20


def map_large_allocations() -> bool:
    """Serve every allocation of 4 MiB or more by its own mmap from now on (glibc ``mallopt``;
    process-wide; False where there is no glibc).

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB),
    after which a block's weight-sized temporaries come from the heap, where freed pieces stay
    resident. Measured on one block of a 1B LLaMA (51 M weights, FlexRound, 32x256 tokens): peak
    RSS 2.86 GiB with the default, 2.50 GiB with a fixed 4 MiB threshold (1 MiB: 2.48); the cost is
    one page-fault pass per large temporary."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` that are not on the meta device."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclasses.dataclass
class UnitNeed:
    """Estimated bytes a unit needs while it learns (see :func:`unit_need`)."""

    block: int
    learning: int
    activations: int
    streams: int

    def on_device(self, streams_on_device: bool) -> int:
        return self.block + self.learning + self.activations + (self.streams if streams_on_device else 0)

    def describe(self) -> str:
        g = 2 ** 30
        return (f"block weights {self.block / g:.2f} GiB + learning state {self.learning / g:.2f} GiB + "
                f"activations {self.activations / g:.2f} GiB + streams {self.streams / g:.2f} GiB")


def unit_need(root: nn.Module, layers, stream: torch.Tensor, rows_per_step: int, learns: bool) -> UnitNeed:
    """The memory a unit needs while it learns: its float weights, the learning state of its
    quantized layers (:data:`LEARNING_STATE_FACTOR` fp32 copies of each quantized weight when a
    method learns), the activations of one optimizer step (each layer's output saved for the
    backward and its gradient, for ``rows_per_step`` rows) and the streams."""
    qweights = sum(layer.weight.numel() for _, layer in layers)
    factor = LEARNING_STATE_FACTOR if learns else STATIC_STATE_FACTOR
    tokens = rows_per_step * (stream[0].numel() // stream.shape[-1] if stream.dim() > 1 else 1)
    outs = sum(getattr(layer, "out_features", layer.weight.shape[0]) for _, layer in layers)
    activations = tokens * (outs + 4 * stream.shape[-1]) * 4 * (3 if learns else 1)
    row_bytes = stream[0].numel() * 4
    return UnitNeed(block=module_bytes(root), learning=qweights * 4 * factor, activations=activations,
                    streams=STREAMS_ALIVE * stream.shape[0] * row_bytes)


# -- placement --------------------------------------------------------------------------------
def _move(obj, device, memo: Dict[int, object]):
    """``obj`` with every tensor inside (dicts, lists, tuples, nested) on ``device``; objects
    shared by several containers stay shared (one copy each)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to(device)
    elif isinstance(obj, dict):
        out = type(obj)((k, _move(v, device, memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        out = type(obj)(_move(v, device, memo) for v in obj)
    else:
        out = obj
    memo[id(obj)] = out
    return out


class Placement:
    """The compute device of a run and where its streams live.

    ``compute(t)``: ``t`` on the compute device; ``store(t)``: ``t`` where streams live;
    ``forward(f)``: ``f`` taking stream rows and returning fp32 outputs, under bf16 autocast on
    CUDA (the rounding parameters stay fp32: autocast casts only the matmul operands).
    On CUDA the streams start in pinned CPU memory; the engine moves them to the device when the
    first unit's need and the streams fit the budget (:meth:`streams_to`)."""

    def __init__(self, device: torch.device, streams_on_device: bool = False):
        self.device = device
        self.is_cpu = device.type == "cpu"
        self.streams = device if (self.is_cpu or streams_on_device) else torch.device("cpu")
        self.pin = not self.is_cpu and self.streams.type == "cpu"

    def compute(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where streams live (itself when it is there already)."""
        if self.is_cpu:
            return t
        if self.pin:
            return t if t.is_pinned() else self.clone_stream(t)
        return t.to(self.streams)

    def clone_stream(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` where streams live."""
        if self.is_cpu:
            return t.clone()
        out = self.empty_stream(t.shape, t.dtype)
        out.copy_(t)
        return out

    def streams_to(self, on_device: bool) -> None:
        """Keep streams on the compute device (True) or in pinned CPU memory (False)."""
        if not self.is_cpu:
            self.streams = self.device if on_device else torch.device("cpu")
            self.pin = not on_device

    def synchronize(self) -> None:
        """Wait for copies into pinned memory before the CPU reads it."""
        if self.pin:
            torch.cuda.current_stream(self.device).synchronize()

    def empty_stream(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.streams, pin_memory=self.pin)

    def autocast(self):
        if self.is_cpu:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.is_cpu:
            return f

        def on_device(xb):
            with self.autocast():
                out = f(self.compute(xb))
            return out.float()
        return on_device

    def move_tree(self, obj):
        """A nested structure of tensors (a block's keyword arguments) on the compute device."""
        return obj if self.is_cpu else _move(obj, self.device, {})

    def reset_peak(self) -> None:
        if not self.is_cpu:
            torch.cuda.reset_peak_memory_stats(self.device)

    def device_peak(self) -> Optional[int]:
        return None if self.is_cpu else int(torch.cuda.max_memory_allocated(self.device))

    def device_free(self) -> Optional[int]:
        return None if self.is_cpu else int(torch.cuda.mem_get_info(self.device)[0])

