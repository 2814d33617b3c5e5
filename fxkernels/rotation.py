"""Online block-Hadamard rotation of a linear layer's input (for static int8 activations).

Some inputs cannot be covered by one per-tensor int8 grid: in LLaMA-style decoders the MLP's
down projection sees a few "attention sink" tokens whose activations are hundreds of times the
others', concentrated in a few channels, and per-channel smoothing cannot move a *token's*
outlier into the weights. Rotating the input by an orthogonal ``H`` spreads such a spike over
all channels of its block (a spike of height ``a`` becomes ``a / sqrt(b)`` everywhere), while the
layer is unchanged in exact arithmetic: ``y = x W^T = (x H^T)(W H^T)^T`` since ``H^T H = I``.
The quantizer stores ``W H^T`` and the layer applies ``x -> x H^T`` before quantizing ``x``.

``H`` is block-diagonal with normalized Sylvester Hadamard blocks of size ``b`` (a power of two
dividing the input width), applied by the fast Walsh-Hadamard transform: ``log2(b)`` add/subtract
passes, no ``b x b`` matrix. Sylvester Hadamard matrices are symmetric, so ``H^T = H`` and the
transform is its own inverse.
"""

from __future__ import annotations

import math

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


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ H^T`` along the last dimension, ``H`` = block-diagonal normalized Hadamard of size
    ``block``. Computed in ``x``'s dtype (fp32 when learning and on CPU)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, k // block, block)
    h = 1
    while h < block:
        # pair element j with j + h inside every 2h-long run: (a, c) -> (a + c, a - c)
        y = y.reshape(y.shape[0], -1, 2, h)
        a, c = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + c, a - c), dim=2)
        h *= 2
    return (y.reshape(*lead, k) * (1.0 / math.sqrt(block))).to(x.dtype)


def hadamard_matrix(block: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """The dense ``[n, n]`` block-diagonal matrix ``H`` (tests and weight folding)."""
    check_rotation_block(block, n, "hadamard_matrix")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / math.sqrt(block)] * (n // block))
