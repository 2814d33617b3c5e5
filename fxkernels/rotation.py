"""Online block-Hadamard rotation of a linear layer's input (for static int8 activations).

Some inputs cannot be covered by one per-tensor int8 grid: in LLaMA-style decoders the MLP's
down projection sees a few "attention sink" tokens whose activations are hundreds of times the
others', concentrated in a few channels, and per-channel smoothing cannot move a *token's*
outlier into the weights. Rotating the input by an orthogonal ``H`` spreads such a spike over
all channels of its block (a spike of height ``a`` becomes ``a / sqrt(b)`` everywhere), while the
layer is unchanged in exact arithmetic: ``y = x W^T = (x H^T)(W H^T)^T`` since ``H^T H = I``.
The quantizer stores ``W H^T`` and the layer applies ``x -> x H^T`` before quantizing ``x``.

``H`` is block-diagonal with normalized Sylvester Hadamard blocks of size ``b`` (a power of two
dividing the input width), applied as at most two small matrix products per block (Kronecker
factors of at most 64). Sylvester Hadamard matrices are symmetric, so ``H^T = H`` and the
transform is its own inverse.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

MAX_BLOCK = 512


def check_rotation_block(block: int, in_features: int, who: str = "input_rotation") -> int:
    """Validate a rotation block size for an input of ``in_features`` channels; returns it."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueError(f"{who}: block={block!r}; expected a power of two >= 2")
    if in_features % block:
        raise ValueError(f"{who}: block={block} does not divide in_features={in_features}; "
                         "expected a power of two that divides the input width")
    return block


def default_rotation_block(in_features: int, cap: int = MAX_BLOCK) -> int:
    """The largest power of two that divides ``in_features``, at most ``cap`` (0 if none >= 2)."""
    b = in_features & -in_features
    b = min(b, cap)
    return b if b >= 2 else 0


_matrices: Dict[tuple, torch.Tensor] = {}


def _normalized_hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    h = _matrices.get(key)
    if h is None:
        h = hadamard_matrix(n, n).to(dtype=dtype, device=device)
        _matrices[key] = h
    return h


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ H^T`` along the last dimension, ``H`` = block-diagonal normalized Hadamard of size
    ``block``, in ``x``'s dtype.

    Sylvester matrices factor as Kronecker products, ``H_(a*b) = H_a (x) H_b``, so a block of
    ``a * 64`` is two small matrix products (``X H_64`` on each 64-wide row, then ``H_a X`` across
    rows) rather than ``log2(block)`` add/subtract passes, which as separate torch ops on strided
    views cost far more than the arithmetic (~0.5 ms for one 576-wide row)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    if block <= 64:
        y = x.reshape(-1, block) @ _normalized_hadamard(block, x.dtype, x.device)
    else:
        outer = block // 64
        y = x.reshape(-1, outer, 64) @ _normalized_hadamard(64, x.dtype, x.device)
        # H_outer across the rows of every block, as one GEMM over all blocks (a batched 8x8
        # product per block would be thousands of tiny matmuls)
        r = y.shape[0]
        y = _normalized_hadamard(outer, x.dtype, x.device) @ y.transpose(0, 1).reshape(outer, r * 64)
        y = y.reshape(outer, r, 64).transpose(0, 1)
    return y.reshape(*lead, k)


def hadamard_matrix(block: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """The dense ``[n, n]`` block-diagonal matrix ``H`` (tests and weight folding)."""
    check_rotation_block(block, n, "hadamard_matrix")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / math.sqrt(block)] * (n // block))
