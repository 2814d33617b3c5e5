"""Empirical bias correction for one reconstruction unit (Nagel et al., 2019, "Data-Free
Quantization", in its empirical form).

Quantizing a convolution's weights moves the mean of its outputs: for the differential filters of
the early layers (their weights sum to ~0) the error's DC part ``sum(dW) * mean(x)`` is a large
share of the output, and every later layer sees the shifted mean. This measures each layer's
per-channel output mean on the calibration images twice, the float unit on float inputs and the
quantized unit on the quantized network's inputs, and moves the difference into the bias. Layers
are corrected in execution order, because each correction changes what the later layers see.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


@torch.no_grad()
def output_channel_means(unit: nn.Module, layers: Dict[str, nn.Module], x: torch.Tensor,
                         batch: int = 32) -> Dict[str, torch.Tensor]:
    """Mean of every output channel of each module in ``layers`` (a name -> module map of modules
    inside ``unit``) while ``unit`` runs on ``x``, over images and positions."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def hook_for(name):
        def hook(_module, _inputs, out):
            flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1)  # [channels, everything else]
            sums[name] = sums.get(name, 0) + flat.sum(1, dtype=torch.float64)
            counts[name] = counts.get(name, 0) + flat.shape[1]
        return hook

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    try:
        for s in range(0, x.shape[0], batch):
            unit(x[s:s + batch])
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in layers}


@torch.no_grad()
def correct_unit_biases(fp_unit: nn.Module, fp_layers: Dict[str, nn.Module], unit: nn.Module,
                        wrappers: Dict[str, nn.Module], xfp: torch.Tensor, xq: torch.Tensor,
                        batch: int = 32) -> None:
    """Shift each wrapper's ``bias`` buffer (a :class:`quantizer.layers.QuantLayer` in its hard,
    quantized state) so that its output-channel means on ``xq`` equal the float layer's on ``xfp``.

    ``fp_layers`` and ``wrappers`` map the same names, in execution order."""
    if list(fp_layers) != list(wrappers):
        raise ValueError(f"correct_unit_biases: fp_layers {list(fp_layers)} and wrappers {list(wrappers)}; "
                         "expected the same names in the same order")
    targets = output_channel_means(fp_unit, fp_layers, xfp, batch)
    for name, w in wrappers.items():
        delta = output_channel_means(unit, {name: w}, xq, batch)[name] - targets[name]
        if w.bias is None:
            w.bias = -delta
        else:
            w.bias -= delta
