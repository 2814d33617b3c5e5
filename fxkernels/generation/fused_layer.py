"""The whole decoder layer of a decode step as one CPU operator (``fxk_cpu::decode_layer``,
csrc/cpu/decode_layer.cpp), for the layers it can run.

A small model's decode step is ~9 short calls per layer; the operator runs the layer in one
parallel region instead (why, and how it splits the work: the C++ file's header). It runs
pre-norm layers with RMSNorm (``w * x * rsqrt(mean(x^2) + eps)``), rotary embeddings, grouped-query
attention without soft-capping or q/k norms, and a SiLU-gated MLP (LLaMA/SmolLM, Mistral, Qwen2),
whose q/k/v and gate/up are fused QuantLinears and all four projections weight-only layers pinned
to the CPU's limb-layout kernels (AVX-512 VNNI, with AMX tiles from a few rows). Prefill, every
other layer and other devices keep the step's own formulation (:func:`fxkernels.generation.step.layer_forward`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn import QuantLinear

# Hugging Face norm classes computing weight * (x * rsqrt(mean(x^2) + eps)) in fp32
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
SILU = ("SiLU", "SiLUActivation")


def _load_op():
    """``fxk_cpu::decode_layer`` when the CPU extension is built with it, else None."""
    try:
        from ..backends import cpu  # noqa: F401  (registers the fxk_cpu operators' fake implementations)

        return torch.ops.fxk_cpu.decode_layer.default
    except (ImportError, AttributeError):
        return None


# resolved once at import: the decode step is traced, and a constant keeps the lookup out of its graph
DECODE_LAYER = _load_op()


def _limb_linear(m: Optional[nn.Module]) -> Optional[Tuple[list, Optional[Tensor], Tuple[int, int, int, int]]]:
    """(packed weight, bias, (N, K, G, bits)) of a QuantLinear pinned to the limb-layout kernel."""
    if not isinstance(m, QuantLinear) or m._graph is None or m._graph[3] is None or len(m._graph[3]) != 1:
        return None
    op, fixed = m._graph[3][0]
    if op is not torch.ops.fxk_cpu.dequant_linear.default:
        return None
    qweight, scale, _zero, packed, bias, bits, in_features = fixed
    if len(packed) != 6:  # the limb layout: weights, zeros, sums, scales, padded K, limb count
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    return list(packed), bias, (int(qweight.shape[0]), int(in_features), int(scale.shape[1]), int(bits))


def _rms_norm(m: nn.Module, hidden: int) -> Optional[Tuple[Tensor, float]]:
    w = getattr(m, "weight", None)
    if type(m).__name__ not in RMS_NORMS or w is None or w.dtype != torch.float32 or w.numel() != hidden:
        return None
    return w.detach().contiguous(), float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


def layer_args(layer: nn.Module, hidden: int) -> Optional[tuple]:
    """The operator's fixed arguments for ``layer`` (a LayerRunner whose QuantLinears are pinned),
    or None where the operator does not run it."""
    if DECODE_LAYER is None or layer.q_norm is not None or layer.post_attn_norm is not None:
        return None
    if layer.softcap is not None or type(layer.act).__name__ not in SILU:
        return None
    norms = _rms_norm(layer.input_norm, hidden), _rms_norm(layer.pre_mlp_norm, hidden)
    linears = [_limb_linear(m) for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)]
    if None in norms or None in linears:
        return None
    dims = [d for lin in linears for d in lin[2]]
    (n1, eps1), (n2, eps2) = norms
    per_linear = [x for lin in linears for x in lin[:2]]  # packed, bias for each
    return (n1, eps1, n2, eps2, *per_linear, dims)


def run(layer: nn.Module, fixed: tuple, h: Tensor, slots: Tensor, mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The layer's output for ``h [B, 1, hidden]``; writes the token's keys and values to the
    cache at ``slots [1]``."""
    return DECODE_LAYER(h.contiguous(), *fixed, cos.contiguous(), sin.contiguous(), layer.k_cache, layer.v_cache,
                        mask.contiguous(), slots, layer.heads, layer.window or 0, layer.scaling)
