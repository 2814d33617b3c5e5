"""An independent reader of GPTQ-layout checkpoints, written from the public description of the format.

It deliberately shares no code with fxkernels (no fxkernels.format, no export_gptq helpers), and it
works element by element with numpy bit operations instead of vectorised torch reshapes, so a
layout slip on either side shows up as a mismatch.

Layout (AutoGPTQ / gptqmodel / vLLM "gptq" checkpoints), for a linear with in_features K, out_features
N, b bits and pf = 32 // b:
    qweight int32 [K/pf, N]: row i holds input rows pf*i .. pf*i+pf-1; input row pf*i + j sits in
            bits b*j .. b*j+b-1 (j = 0 in the lowest bits).
    qzeros  int32 [G, N/pf]: column m holds output columns pf*m + j in bits b*j .. b*j+b-1.
    scales  fp16  [G, N].
    g_idx   int32 [K]: group of each input row.
    checkpoint_format "gptq" (v1): the zero point is the stored value + 1; "gptq_v2": as stored.
    W^T[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
"""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
import torch


def _fields(words: np.ndarray, bits: int) -> np.ndarray:
    """Split each uint32 word into 32/bits unsigned fields, lowest bits first -> [..., 32/bits]."""
    words = words.astype(np.uint32)
    per = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    out = np.empty(words.shape + (per,), dtype=np.int64)
    for j in range(per):
        out[..., j] = (words >> np.uint32(bits * j)) & mask
    return out


def unpack_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, checkpoint_format: str) -> torch.Tensor:
    """Float32 weight ``[N, K]`` (nn.Linear orientation) of one GPTQ layer."""
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    assert scales.dtype == torch.float16 and g_idx.dtype == torch.int32
    per = 32 // bits
    qw = qweight.numpy().view(np.uint32)  # reinterpret the bit pattern, no value conversion
    qz = qzeros.numpy().view(np.uint32)
    rows, n = qw.shape
    k = rows * per
    codes = np.empty((k, n), dtype=np.int64)
    f = _fields(qw, bits)  # [rows, N, per]
    for i in range(rows):
        for j in range(per):
            codes[i * per + j, :] = f[i, :, j]
    groups = qz.shape[0]
    zeros = np.empty((groups, qz.shape[1] * per), dtype=np.int64)
    fz = _fields(qz, bits)  # [G, N/per, per]
    for m in range(qz.shape[1]):
        for j in range(per):
            zeros[:, m * per + j] = fz[:, m, j]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    assert zeros.shape[1] == n and scales.shape == (groups, n) and g_idx.shape == (k,)
    gi = g_idx.numpy().astype(np.int64)
    s = scales.float().numpy()  # fp16 -> fp32 is exact
    diff = torch.from_numpy(codes - zeros[gi, :])  # [K, N] integers
    w_t = diff.float() * torch.from_numpy(s[gi, :])
    return w_t.t().contiguous()


def read_gptq_dir(directory: str) -> Dict[str, torch.Tensor]:
    """``{layer name: float32 weight [N, K]}`` for every quantized layer of a GPTQ directory."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "gptq"
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    out = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            out[name] = unpack_layer(tensors[key], tensors[name + ".qzeros"], tensors[name + ".scales"],
                                     tensors[name + ".g_idx"], qc["bits"], qc.get("checkpoint_format", "gptq"))
    return out


def float_state_dict(directory: str) -> Dict[str, torch.Tensor]:
    """A plain float state dict (what an nn.Linear model loads) rebuilt from a GPTQ directory."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, "model.safetensors"))
    weights = read_gptq_dir(directory)
    state = {k: v for k, v in tensors.items()
             if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name, w in weights.items():
        state[name + ".weight"] = w
        if name + ".bias" in state:
            state[name + ".bias"] = state[name + ".bias"].float()
    return state
