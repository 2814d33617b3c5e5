"""Find the repeated blocks of a model and the linears inside them, per architecture.

Known layouts are tried first (attribute paths of the Hugging Face implementations); otherwise the
largest ``nn.ModuleList`` of same-type modules that contain ``nn.Linear`` layers is taken, which
covers most decoder and encoder stacks. Linears outside the blocks are reported so that the
caller can warn that they stay float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

# (path of the block list, architecture family) in the order they are tried.
KNOWN_BLOCK_PATHS: Tuple[Tuple[str, str], ...] = (
    ("model.layers", "decoder"),            # LLaMA, SmolLM, Mistral, Qwen2, Gemma, Phi-3 (CausalLM)
    ("layers", "decoder"),                  # the same families' bare *Model
    ("model.decoder.layers", "decoder"),    # OPT (CausalLM)
    ("decoder.layers", "decoder"),          # OPT bare model
    ("transformer.h", "decoder"),           # GPT-Neo, GPT-J, Falcon, BLOOM (GPT-2's Conv1D blocks: rejected)
    ("h", "decoder"),
    ("bert.encoder.layer", "encoder"),      # BERT with heads
    ("encoder.layer", "encoder"),           # BERT/MiniLM bare model
)


@dataclasses.dataclass
class BlockLayout:
    path: str                       # dotted path of the nn.ModuleList
    kind: str                       # "decoder" | "encoder" | "generic"
    blocks: List[nn.Module]
    outside: List[str]              # linears not inside any block (left float unless skipped)


def matches(name: str, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _has_linear(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Linear) for x in m.modules())


def _generic(model: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1 and _has_linear(m[0]):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    return best


def find_blocks(model: nn.Module) -> BlockLayout:
    """The model's block list. Raises ``ValueError`` naming the model class when none is found."""
    found = None
    for path, kind in KNOWN_BLOCK_PATHS:
        m = _get(model, path)
        if isinstance(m, nn.ModuleList) and len(m) and _has_linear(m[0]):
            found = (path, kind, m)
            break
    if found is None:
        g = _generic(model)
        if g is not None:
            found = (g[0], "generic", g[1])
    if found is None:
        conv1d = [p for p, _ in KNOWN_BLOCK_PATHS if isinstance(_get(model, p), nn.ModuleList) and len(_get(model, p))
                  and any(type(m).__name__ == "Conv1D" for m in _get(model, p)[0].modules())]
        why = (f"; the blocks at {conv1d[0]} hold transformers Conv1D layers (GPT-2 style, weight stored [in, out]), "
               "which this quantizer does not handle" if conv1d else "")
        raise ValueError(
            f"unsupported architecture {type(model).__name__}: no list of blocks holding nn.Linear layers "
            f"(tried {[p for p, _ in KNOWN_BLOCK_PATHS]} and any nn.ModuleList of identical blocks){why}; "
            "supported: LLaMA/SmolLM/Mistral/Qwen2/Phi-3/Gemma 2-3-style decoders, OPT, GPT-Neo, "
            "BERT-style encoders")
    path, kind, blocks = found
    inside = {f"{path}.{name}" for name, m in blocks.named_modules() if isinstance(m, nn.Linear)}
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in inside]
    return BlockLayout(path=path, kind=kind, blocks=list(blocks), outside=outside)


def block_linears(block: nn.Module, prefix: str = "", skip: Iterable[str] = ()) -> List[Tuple[str, nn.Linear]]:
    """``(name relative to the block, layer)`` of every ``nn.Linear`` in ``block`` not skipped
    (``skip`` patterns are matched against ``prefix + name`` and the leaf name)."""
    out = []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear) and not matches(prefix + name, skip):
            out.append((name, m))
    return out


def unknown_layers(block: nn.Module) -> List[str]:
    """Layers with weights that this quantizer cannot handle (e.g. GPT-2's Conv1D): left float."""
    out = []
    for name, m in block.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) or type(m).__name__.endswith("RMSNorm"):
            continue
        if any(p.dim() == 2 for p in m.parameters(recurse=False)):
            out.append(f"{name} ({type(m).__name__})")
    return out


# The norms of a decoder block that read the residual stream, by family: the input norm
# (LLaMA/Qwen/Mistral/Gemma/Phi-3 input_layernorm, OPT self_attn_layer_norm, GPT-Neo ln_1) and the
# norm before the MLP (Gemma pre_feedforward_layernorm, OPT final_layer_norm, GPT-Neo ln_2, and
# LLaMA-style post_attention_layernorm, which in Gemma instead normalizes the attention's output).
# The model's final norm reads the last block's output.
RESIDUAL_NORM_NAMES = ("input_layernorm", "self_attn_layer_norm", "ln_1", "pre_feedforward_layernorm",
                       "final_layer_norm", "ln_2")
FINAL_NORM_PATHS = ("model.norm", "norm", "model.decoder.final_layer_norm", "decoder.final_layer_norm",
                    "transformer.ln_f", "ln_f")


def residual_norms(block: nn.Module) -> List[nn.Module]:
    """The norms of ``block`` that read the residual stream (see RESIDUAL_NORM_NAMES)."""
    names = list(RESIDUAL_NORM_NAMES)
    if not isinstance(getattr(block, "pre_feedforward_layernorm", None), nn.Module):
        names.append("post_attention_layernorm")  # the pre-MLP norm where there is no sandwich norm
    return [getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)]


def output_readers(model: nn.Module, layout: BlockLayout) -> List[List[nn.Module]]:
    """For each block, the norms that read its output as the residual stream carries it on: those
    of every later block and the model's final norm. Empty lists for encoders (their blocks end in
    a norm of their own) and for layouts whose norms are not known."""
    if layout.kind != "decoder":
        return [[] for _ in layout.blocks]
    final = next((m for m in (_get(model, p) for p in FINAL_NORM_PATHS) if m is not None), None)
    later: List[nn.Module] = [final] if final is not None else []
    readers = []
    for block in reversed(layout.blocks):
        readers.append(list(later))
        later = residual_norms(block) + later
    return readers[::-1]


@torch.no_grad()
def norm_gain(norm: nn.Module) -> Optional[torch.Tensor]:
    """The per-channel factor ``g`` of a norm ``x -> normalize(x) * g (+ b)`` as fp32 ``[dim]``
    (``dim``: its weight's length): a LayerNorm's weight; for an RMSNorm-like module (any
    parametrization: ``w``, ``1 + w``) its output on a vector of ones, whose RMS is 1. None for a
    module without a weight, with parameters not materialized, or whose output is not ``[dim]``."""
    params = list(norm.parameters())
    if not params or any(p.is_meta for p in params):
        return None
    if isinstance(norm, nn.LayerNorm):
        return norm.weight.detach().float().clone() if norm.weight is not None else None
    dim = params[0].shape[-1]
    out = norm(torch.ones(1, dim, dtype=params[0].dtype, device=params[0].device))
    if not isinstance(out, torch.Tensor) or out.shape[-1] != dim or out.numel() != dim:
        return None
    return out.reshape(-1).float().cpu()
