"""Per-channel smoothing before W8A8 (SmoothQuant's equivalence, applied block by block).

A per-tensor int8 activation grid must span the largest input channel. LLM blocks have a few
channels 100-1000x larger than the median (SmolLM2's ``mlp.down_proj`` inputs reach 100 in block 3
and 480 in block 30 while the median is ~0.03), so one grid step swallows every ordinary value.
Dividing input channel ``j`` by ``s_j`` and multiplying the consuming weights' column ``j`` by
``s_j`` leaves the float function unchanged; with ``s_j = a_j^alpha / w_j^(1 - alpha)`` (``a_j``:
the channel's largest calibration activation, ``w_j``: its largest weight) activations and weights
share the range, so both 8-bit grids have room.

The division is folded into the operation that produces the channel, so nothing is added at run
time: the RMSNorm/LayerNorm weight before ``q/k/v`` and ``gate/up``, ``up_proj``'s output rows
before ``down_proj`` (``down_proj(act(gate) * up)`` is linear in ``up``), and ``v_proj``'s output
rows before ``o_proj``: attention mixes value vectors across positions with weights that do not
depend on ``v`` (``softmax(qk^T) v`` is linear in ``v``, channel by channel), so a scale on a value
channel reaches ``o_proj``'s matching input columns unchanged. With grouped-query attention one
value channel feeds ``n_heads / n_kv_heads`` query heads' columns; they share its factor.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

# (producer attribute path, its kind, consumer linears) inside a LLaMA/Mistral/Qwen2-style block.
LLAMA_PAIRS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", "linear", ("mlp.down_proj",)),
    ("self_attn.v_proj", "values", ("self_attn.o_proj",)),
)


def _get(block: nn.Module, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def smoothing_pairs(block: nn.Module) -> List[Tuple[nn.Module, str, List[str]]]:
    """The (producer, kind, consumer names) pairs present in ``block`` whose consumers are all
    ``nn.Linear`` (an empty list for architectures without this layout)."""
    out = []
    for prod_path, kind, consumers in LLAMA_PAIRS:
        prod = _get(block, prod_path)
        mods = [_get(block, c) for c in consumers]
        if prod is None or any(not isinstance(m, nn.Linear) for m in mods):
            continue
        if kind == "norm" and getattr(prod, "weight", None) is None:
            continue
        if kind in ("linear", "values") and not isinstance(prod, nn.Linear):
            continue
        if kind == "values" and _value_groups(block, prod, mods[0]) is None:
            continue
        out.append((prod, kind, list(consumers)))
    return out


def _value_groups(block: nn.Module, v_proj: nn.Linear, o_proj: nn.Linear):
    """(kv channels, query heads per kv head, head_dim) when ``o_proj``'s input columns are the
    query heads' copies of ``v_proj``'s output channels, else None (unknown attention layout)."""
    attn = _get(block, "self_attn")
    head_dim = getattr(attn, "head_dim", None)
    n_v, n_o = v_proj.out_features, o_proj.in_features
    if not isinstance(head_dim, int) or head_dim <= 0 or n_v % head_dim or n_o % n_v:
        return None
    return n_v, n_o // n_v, head_dim


def _to_value_channels(t: torch.Tensor, groups) -> torch.Tensor:
    """Per-``o_proj``-column statistic -> per value channel (max over the query heads sharing it)."""
    n_v, rep, hd = groups
    return t.view(n_v // hd, rep, hd).amax(1).reshape(n_v)


def _to_query_columns(s: torch.Tensor, groups) -> torch.Tensor:
    """Per value channel factor -> per ``o_proj`` input column (copied to every head of its group)."""
    n_v, rep, hd = groups
    return s.view(n_v // hd, 1, hd).expand(n_v // hd, rep, hd).reshape(n_v * rep)


@torch.no_grad()
def smooth_block(block: nn.Module, act_absmax: Dict[str, torch.Tensor], alpha: float) -> List[str]:
    """Apply the smoothing in place; ``act_absmax[name]`` is the per-input-channel max |x| of
    consumer ``name`` on calibration data. Returns the consumer names that were smoothed."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth alpha={alpha}; expected a number in [0, 1]")
    done = []
    for prod, kind, consumers in smoothing_pairs(block):
        if not all(c in act_absmax for c in consumers):
            continue
        a = torch.stack([act_absmax[c] for c in consumers]).amax(0).float()
        w = torch.stack([_get(block, c).weight.abs().amax(0) for c in consumers]).amax(0).float()
        groups = None
        if kind == "values":
            groups = _value_groups(block, prod, _get(block, consumers[0]))
            a, w = _to_value_channels(a, groups), _to_value_channels(w, groups)
        s = (a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-3, 1e3)
        s_in = s if groups is None else _to_query_columns(s, groups)
        if kind == "norm":
            prod.weight.div_(s.to(prod.weight.dtype))
            if getattr(prod, "bias", None) is not None:
                prod.bias.div_(s.to(prod.bias.dtype))
        else:
            prod.weight.div_(s[:, None].to(prod.weight.dtype))
            if prod.bias is not None:
                prod.bias.div_(s.to(prod.bias.dtype))
        for c in consumers:
            lin = _get(block, c)
            lin.weight.mul_(s_in[None, :].to(lin.weight.dtype))
        done += consumers
    return done
