"""The decoder forward over a static KV cache: one function for prefill and for the decode step.

Shapes are fixed by the cache (``[B, kv_heads, L, head_dim]`` per layer) and the step's token
count, and every per-call quantity is a tensor (cache slots, rotary positions, key validity), so
the decode step traces once into one graph: inductor on the CPU, a CUDA graph on a GPU, with no
Python per layer and no host-device sync.

Slots and positions: token ``t`` of the sequence is written to cache slot ``t`` for every row; its
rotary position is the count of real (non-pad) tokens before it, as in Hugging Face ``generate()``
with left padding (``cumsum(attention_mask) - 1``). A query at slot ``s`` attends to valid slots
``j <= s`` (and ``s - j < window`` on sliding layers), and always to itself, so a pad row never
has an empty softmax.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused_layer
from .layout import LayerRunner


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(valid: Tensor, slots: Tensor, window: Optional[int]) -> Tensor:
    """Bool ``[B, 1, T, L]``: may the query at ``slots[t]`` read cache slot ``j`` of row ``b``."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    q = slots[:, None]
    allowed = (keys[None, :] <= q) & valid[:, None, None, :]
    if window is not None:
        allowed = allowed & (q - keys[None, :] < window)
    return allowed | (keys[None, :] == q)


def attend(layer: LayerRunner, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, slots: Tensor) -> Tensor:
    """Softmax attention of ``q [B, H, T, D]`` over the cache ``k, v [B, Hkv, L, D]``; ``slots [T]``
    are the cache slots of the step's tokens."""
    if q.shape[2] == 1:
        if _CPU_ATTENTION is not None and q.device.type == "cpu" and q.dtype == k.dtype == torch.float32:
            # reads the slots written so far, not the whole cache (csrc/cpu/attention.cpp)
            return _CPU_ATTENTION(q, k, v, mask, slots, layer.window or 0, layer.scaling, layer.softcap)
        return _decode_attention(layer, q, k, v, mask)
    if layer.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling,
                                              enable_gqa=layer.heads != layer.kv_heads)
    # logit soft-capping (Gemma 2) has no fused kernel: written out as Hugging Face's eager path
    groups = layer.heads // layer.kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * layer.scaling
    w = torch.tanh(w / layer.softcap) * layer.softcap
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def _load_cpu_attention():
    """``fxk_cpu::decode_attention`` when the CPU extension is built, else None."""
    try:
        from ..backends import cpu  # noqa: F401  (registers the fxk_cpu operators' fake implementations)

        return torch.ops.fxk_cpu.decode_attention.default
    except (ImportError, AttributeError):  # no CPU extension, or one built before the operator
        return None


# resolved once at import: the decode step is traced, and a constant keeps the lookup out of its graph
_CPU_ATTENTION = _load_cpu_attention()


def _decode_attention(layer: LayerRunner, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query token: a few thousand multiply-adds per head, on which the CPU's flash-attention
    kernel (thread pool, tiling, buffers) spent ~40 us per layer; written as products and
    reductions, inductor fuses it into the step's own loops (SmolLM2-135M decode: 104 -> 126
    tok/s, same tokens)."""
    b, h, _, d = q.shape
    q = q.view(b, layer.kv_heads, h // layer.kv_heads, 1, d)  # query heads grouped by their kv head
    w = (q * k[:, :, None]).sum(-1) * layer.scaling  # [B, Hkv, G, L]
    if layer.softcap is not None:
        w = torch.tanh(w / layer.softcap) * layer.softcap
    w = w.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, L]
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return (p[..., None] * v[:, :, None]).sum(-2).view(b, h, 1, d)


def _project(fused: Optional[nn.Module], parts: Tuple[nn.Module, ...], x: Tensor) -> List[Tensor]:
    if fused is None:
        return [p(x) for p in parts]
    return list(fused(x).split([p.out_features for p in parts], dim=-1))


def layer_forward(layer: LayerRunner, h: Tensor, slots: Tensor, mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    b, t, _ = h.shape
    if layer.fused_args is not None and t == 1:  # a decode step: the whole layer as one CPU operator
        return fused_layer.run(layer, layer.fused_args, h, slots, mask, cos, sin)
    x = layer.input_norm(h)
    q, k, v = _project(layer.qkv, (layer.q_proj, layer.k_proj, layer.v_proj), x)
    q = q.view(b, t, layer.heads, layer.head_dim).transpose(1, 2)
    k = k.view(b, t, layer.kv_heads, layer.head_dim).transpose(1, 2)
    v = v.view(b, t, layer.kv_heads, layer.head_dim).transpose(1, 2)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    layer.k_cache.index_copy_(2, slots, k)
    layer.v_cache.index_copy_(2, slots, v)
    a = attend(layer, q, layer.k_cache, layer.v_cache, mask, slots)
    a = layer.o_proj(a.transpose(1, 2).reshape(b, t, layer.heads * layer.head_dim))
    if layer.post_attn_norm is not None:
        a = layer.post_attn_norm(a)
    h = h + a
    x = layer.pre_mlp_norm(h)
    g, u = _project(layer.gate_up, (layer.gate_proj, layer.up_proj), x)
    m = layer.down_proj(layer.act(g) * u)
    if layer.post_mlp_norm is not None:
        m = layer.post_mlp_norm(m)
    return h + m


def decoder_forward(decoder: nn.Module, ids: Tensor, slots: Tensor, positions: Tensor,
                    valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Logits ``[B, V]`` of the last token of ``ids [B, T]`` and their argmax ``[B]`` (the greedy
    choice, inside the graph), with the tokens written to cache ``slots [T]`` at rotary
    ``positions [B, T]``; ``valid [B, L]`` marks the cache slots that hold real tokens."""
    h = decoder.embed(ids)
    masks: Dict[Optional[int], Tensor] = {}
    tables: Dict[str, Tuple[Tensor, Tensor]] = {}
    for layer in decoder.layers:
        if layer.window not in masks:
            masks[layer.window] = attention_mask(valid, slots, layer.window)
        if layer.rope_kind not in tables:
            cos_t, sin_t = decoder.rope_tables[layer.rope_kind]
            tables[layer.rope_kind] = (cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1))
        h = layer_forward(layer, h, slots, masks[layer.window], *tables[layer.rope_kind])
    h = decoder.norm(h[:, -1])
    logits = decoder.lm_head(h)
    if decoder.final_softcap is not None:
        logits = torch.tanh(logits / decoder.final_softcap) * decoder.final_softcap
    return logits, logits.argmax(dim=-1)
