"""PNG plots: FlexRound's grid shifts (the paper's Figure 3), perplexity vs bits per method, and
kernel speed vs M per backend. matplotlib is imported lazily (the `bench` extra)."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'flexround[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def grid_shift(float_weight: torch.Tensor, layer) -> Dict[str, torch.Tensor]:
    """Per weight: |W| and the learned code minus the round-to-nearest code on the same grid.

    ``layer`` is an exported QuantLinear/QuantConv (anything with ``spec``, ``qweight``, ``scale``,
    ``zero``); the RTN code uses the layer's own (learned) scale and zero, so the shift isolates
    what learned rounding changed."""
    from fxkernels.format import expand_per_weight, unpack

    w = float_weight.detach().float().reshape(float_weight.shape[0], -1)
    n, k = w.shape
    q = unpack(layer.qweight, layer.spec, k)
    s = expand_per_weight(layer.scale.float(), layer.spec, n, k)
    z = expand_per_weight(layer.zero.to(torch.int32), layer.spec, n, k)
    rtn = torch.clamp(torch.round(w / s) + z, 0, layer.spec.qmax).to(torch.int32)
    return {"magnitude": w.abs().flatten(), "shift": (q - rtn).flatten()}


def plot_grid_shift(float_weight: torch.Tensor, layer, path: str, title: str = "") -> str:
    plt = _pyplot()
    d = grid_shift(float_weight, layer)
    mag, shift = d["magnitude"].numpy(), d["shift"].numpy()
    g = torch.Generator().manual_seed(0)
    jitter = (torch.rand(len(shift), generator=g).numpy() - 0.5) * 0.3
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.scatter(mag, shift + jitter, s=2, alpha=0.35, color="tab:blue", rasterized=True)
    ax.set_xlabel("|W| (weight magnitude)")
    ax.set_ylabel("learned code − round-to-nearest code")
    moved = (shift != 0).mean() * 100
    far = (abs(shift) > 1).sum()
    ax.set_title(title or f"grid shift from RTN: {moved:.1f}% of weights moved, {far} by more than one step")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def read_rows(path: str) -> List[dict]:
    """Rows from a JSON list or a JSON-lines file."""
    with open(path) as f:
        text = f.read().strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_ppl_vs_bits(rows: Iterable[dict], path: str, fp_ppl: float = None, title: str = "") -> str:
    """rows: ``{"method", "bits", "ppl"}`` (extra keys ignored); one line per method, log-scale y."""
    plt = _pyplot()
    by_method: Dict[str, List[tuple]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append((int(r["bits"]), float(r["ppl"])))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if fp_ppl:
        ax.axhline(fp_ppl, color="black", ls="--", lw=1, label=f"fp32 ({fp_ppl:.2f})")
    ax.set_xticks(sorted({b for pts in by_method.values() for b, _ in pts}))
    ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title or "perplexity vs bits")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_speed_vs_m(rows: Iterable[dict], path: str, title: str = "") -> str:
    """rows: ``{"kernel", "M", "ms"}``; one line per kernel, log-log."""
    plt = _pyplot()
    by_kernel: Dict[str, List[tuple]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append((int(r["M"]), float(r["ms"])))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for kernel, pts in sorted(by_kernel.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kernel)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M (tokens per call)")
    ax.set_ylabel("ms per linear (lower is better)")
    ax.set_title(title or "kernel time vs M")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
