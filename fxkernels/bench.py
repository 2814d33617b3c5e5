"""Reusable CPU kernel benchmark harness.

:func:`cpu_kernel_table` times, in one run and on the same thread count, torch's fp32
``F.linear``, torch's fbgemm dynamic int8 (``quantize_dynamic``), torch's INT4 CPU op
(``_weight_int4pack_mm_for_cpu``, bf16 activations), a naive dequantize-then-matmul, and the
fxkernels CPU backend (W4A8, W4 fp32-act, W8A8, W8), on LLaMA-like ``(K, N)`` shapes, and prints
ms, GB/s of weight read (meaningful at M=1, against the machine's measured read bandwidth),
GOP/s and the ratio to fp32.

At small M every method is memory-bound, so each one cycles through enough weight copies that
their total exceeds the last-level cache: each call then reads its weight from DRAM, as in LLM
decoding where ~all layers' weights pass through the cache once per token.

Used by ``bench/test_bench_cpu.py`` (pytest-benchmark) and the ``flexround bench kernels`` CLI.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SHAPES = ((2048, 2048), (4096, 4096), (4096, 11008), (11008, 4096))  # (K, N): in x out
MS = (1, 8, 32, 128, 512)
QUICK_SHAPES = ((4096, 11008),)
QUICK_MS = (1, 8, 32, 512)
METHODS = ("fp32", "fbgemm_int8", "torch_int4_bf16", "naive_dequant", "ours_w4a8", "ours_w4", "ours_w8a8", "ours_w8")


def llc_bytes() -> int:
    """Last-level cache size from sysfs (falls back to 32 MiB)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or (32 << 20)


def measure_read_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """DRAM read bandwidth in GB/s at the current torch thread count: best time of a parallel
    read of a buffer much larger than the LLC (``fxkernels._C.read_probe``, AVX2 loads XOR-ed
    together; falls back to ``torch.sum``, which is compute-limited on some CPUs). The best call
    is the one least disturbed by other processes, and a bandwidth is a capability."""
    try:
        from . import _C
        # same paging as the kernels' repacked weights (2 MiB huge pages where the OS allows)
        buf = _C.huge_page_buffer(nbytes) if hasattr(_C, "huge_page_buffer") else torch.ones(nbytes, dtype=torch.uint8)
        probe = lambda: _C.read_probe(buf)  # noqa: E731
    except ImportError:
        buf = torch.ones(nbytes // 4)
        probe = buf.sum
    probe()
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        probe()
        times.append(time.perf_counter() - s)
    return nbytes / min(times) / 1e9


def time_call(fn: Callable[[int], object], copies: int, repeats: int, warmup: int = 2,
              min_time: float = 0.0) -> List[float]:
    """Times (s) of ``fn(i)`` calls with ``i`` rotating over ``copies`` weight copies."""
    for c in range(copies):  # every copy once: one-time repacks stay out of the measurement
        fn(c)
    i = 0
    for _ in range(max(1, warmup)):
        s = time.perf_counter()
        fn(i % copies)
        i += 1
    # slow calls (large M on the baselines take seconds) get fewer repeats: ~3 s per method
    repeats = max(3, min(repeats, int(3.0 / max(time.perf_counter() - s, 1e-6))))
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_start < min_time:
        s = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - s)
        i += 1
    return times


# -- method builders: each returns (weight bytes per copy, fn(x, copy_index)) for n copies ----------
def _codes(n: int, k: int, bits: int, gen: torch.Generator):
    from .format import QuantSpec, pack
    q = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    qw = pack(q, QuantSpec(bits=bits, granularity="channel"))
    scale = (torch.rand(n, 1, generator=gen) * 0.01 + 0.001)
    zero = torch.randint(0, 2 ** bits, (n, 1), generator=gen, dtype=torch.int32)
    return q, qw, scale, zero


def build_method(name: str, k: int, n: int, copies: int, seed: int = 0):
    """``(bytes_per_weight_copy, fn(x_fp32, i))`` for method ``name`` with ``copies`` weights."""
    from . import reference as R
    from .dispatch import use_backend
    from .format import QuantSpec

    gen = torch.Generator().manual_seed(seed)
    if name == "fp32":
        ws = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(copies)]
        return n * k * 4, lambda x, i: F.linear(x, ws[i])
    if name == "fbgemm_int8":
        from torch.ao.quantization import quantize_dynamic
        mods = []
        for _ in range(copies):
            lin = torch.nn.Linear(k, n, bias=False)
            with warnings.catch_warnings():  # torch deprecates quantized tensors; still the baseline
                warnings.simplefilter("ignore")
                mods.append(quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
        return n * k, lambda x, i: mods[i](x)
    if name == "torch_int4_bf16":
        group = 128 if k % 128 == 0 else k
        packs = []
        for _ in range(copies):
            q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            p = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.rand(k // group, n, 2, generator=gen).to(torch.bfloat16)
            packs.append((p, sz))
        return n * k // 2 + (k // group) * n * 4, (
            lambda x, i: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packs[i][0], group, packs[i][1]))
    if name == "naive_dequant":
        ws = [_codes(n, k, 4, gen)[1:] for _ in range(copies)]
        return n * k // 2, lambda x, i: F.linear(x, R.dequant_weight(ws[i][0], ws[i][1], ws[i][2], 4, k))
    if name.startswith("ours_"):
        # Through QuantLinear, the drop-in module users deploy (as fbgemm runs through its module):
        # its eager fast path calls the selected kernel directly, without torch.library's
        # per-call cost, which at M=1 is a few percent of a 1 ms layer.
        from .nn import QuantLinear
        bits = 4 if name.startswith("ours_w4") else 8
        spec = QuantSpec(bits=bits, granularity="channel", act_bits=8 if name.endswith("a8") else None)
        mods = []
        for _ in range(copies):
            q, _, scale, zero = _codes(n, k, bits, gen)
            mods.append(QuantLinear.from_codes(q, scale.reshape(n), zero.reshape(n), spec))
        nbytes = mods[0].qweight.numel()

        def fn(x, i):
            with use_backend("cpu"):
                return mods[i](x)
        return nbytes, fn
    raise ValueError(f"build_method: name={name!r}; expected one of {METHODS}")


def copies_for(nbytes: int, m: int) -> int:
    """Enough copies that a rotation overflows the LLC twice at M<=32 (memory-bound regime)."""
    if m > 32:
        return 1
    return max(2, -(-2 * llc_bytes() // max(nbytes, 1)))


@dataclasses.dataclass
class Row:
    k: int
    n: int
    m: int
    method: str
    ms: float
    gbps: float
    gops: float
    vs_fp32: Optional[float] = None
    min_ms: Optional[float] = None       # best call: the uncontended time on a shared machine
    vs_fp32_min: Optional[float] = None


def cpu_kernel_table(shapes: Iterable[Tuple[int, int]] = QUICK_SHAPES, ms: Sequence[int] = QUICK_MS,
                     methods: Sequence[str] = METHODS, threads: int = 2, repeats: int = 15,
                     min_time: float = 0.3, out=print) -> Dict[str, object]:
    """Benchmark every method on every ``(K, N)`` x ``M`` and print a readable table.

    Returns ``{"bandwidth_gbps": float, "threads": int, "rows": [Row, ...]}``. Times are medians.
    """
    torch.set_num_threads(threads)
    bw = measure_read_bandwidth()
    out(f"# threads={threads}  measured DRAM read bandwidth={bw:.1f} GB/s  LLC={llc_bytes() >> 20} MiB")
    rows: List[Row] = []
    for (k, n) in shapes:
        for m in ms:
            x = torch.randn(m, k)
            fp32_ms = fp32_min = None
            for name in methods:
                probe_bytes = {"fp32": n * k * 4, "fbgemm_int8": n * k}.get(name, n * k // 2)
                if name in ("ours_w8a8", "ours_w8"):
                    probe_bytes = n * k
                c = copies_for(probe_bytes, m)
                nbytes, fn = build_method(name, k, n, c)
                with torch.inference_mode():
                    times = time_call(lambda i, fn=fn: fn(x, i), c, repeats, min_time=min_time)
                t = statistics.median(times)
                row = Row(k, n, m, name, t * 1e3, nbytes / t / 1e9, 2 * m * n * k / t / 1e9,
                          min_ms=min(times) * 1e3)
                if name == "fp32":
                    fp32_ms, fp32_min = row.ms, row.min_ms
                if fp32_ms:
                    row.vs_fp32, row.vs_fp32_min = fp32_ms / row.ms, fp32_min / row.min_ms
                rows.append(row)
                del fn
    out(format_table(rows, bw))
    return {"bandwidth_gbps": bw, "threads": threads, "rows": rows}


def format_table(rows: List[Row], bandwidth: float) -> str:
    head = ("K x N", "M", "method", "ms (median)", "GB/s", "%BW", "GOP/s", "x fp32", "min ms", "x fp32 (min)")
    body = []
    for r in rows:
        body.append((f"{r.k}x{r.n}", str(r.m), r.method, f"{r.ms:.3f}", f"{r.gbps:.1f}",
                     f"{100 * r.gbps / bandwidth:.0f}%" if r.m == 1 else "",
                     f"{r.gops:.1f}", f"{r.vs_fp32:.2f}" if r.vs_fp32 else "",
                     f"{r.min_ms:.3f}" if r.min_ms else "", f"{r.vs_fp32_min:.2f}" if r.vs_fp32_min else ""))
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m fxkernels.bench [--full] [--threads 2] [--shapes 4096x11008,...] [--ms 1,8]
    [--activation-digits 2]``"""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--full", action="store_true", help="the full (K, N) x M grid (LLaMA-7B-like shapes, M = 1..512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default=None, help="comma-separated KxN list, e.g. 4096x11008,11008x4096")
    p.add_argument("--ms", default=None, help="comma-separated M list, e.g. 1,8,32")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--activation-digits", choices=("2", "4", "auto"), default=None,
                   help="int8 digits per fp32 activation of the weight-only layers on AVX-512 VNNI (default 4)")
    a = p.parse_args(argv)
    if a.activation_digits is not None:
        from .backends import cpu

        cpu.set_activation_digits(cpu.activation_digits_from_text(a.activation_digits))
    shapes = SHAPES if a.full else QUICK_SHAPES
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = MS if a.full else QUICK_MS
    if a.ms:
        ms = [int(v) for v in a.ms.split(",")]
    methods = a.methods.split(",") if a.methods else METHODS
    cpu_kernel_table(shapes, ms, methods, threads=a.threads)


if __name__ == "__main__":
    main()
