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


# The norm each block applies to its input first, and the model's final norm, by family: what reads
# a decoder block's output (its residual stream) before anything else does.
INPUT_NORM_NAMES = ("input_layernorm", "self_attn_layer_norm", "ln_1")
FINAL_NORM_PATHS = ("model.norm", "norm", "model.decoder.final_layer_norm", "decoder.final_layer_norm",
                    "transformer.ln_f", "ln_f")


def output_readers(model: nn.Module, layout: BlockLayout) -> List[Optional[nn.Module]]:
    """For each block, the norm module that reads its output: the next block's input norm, the
    model's final norm after the last block; None where the layout does not name one (encoders,
    unknown families)."""
    if layout.kind != "decoder":
        return [None] * len(layout.blocks)

    def input_norm(block):
        return next((getattr(block, n) for n in INPUT_NORM_NAMES if isinstance(getattr(block, n, None), nn.Module)),
                    None)

    final = next((m for m in (_get(model, p) for p in FINAL_NORM_PATHS) if m is not None), None)
    return [input_norm(b) for b in layout.blocks[1:]] + [final]


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
