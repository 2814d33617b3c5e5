"""How a Hugging Face decoder-only LM is laid out, read once into the engine's own modules.

The engine does not call the Hugging Face forward (its mask builders, cache classes and output
dataclasses cost more per token than a small model's kernels); it calls the model's own leaf
modules (embedding, norms, projections, activation, rotary embedding) in the order the family's
decoder layer does, so the numbers are the model's. A family is supported when its layer is one of
two shapes, both written out in :mod:`fxkernels.generation.step`:

* pre-norm (LLaMA, SmolLM, Mistral, Qwen2, Qwen3, Gemma): ``h += attn(norm1(h))``,
  ``h += mlp(norm2(h))``;
* sandwich-norm (Gemma 2, Gemma 3): the attention and MLP outputs are normed again before each sum.

Per family: optional q/k norms over the head dimension (Qwen3, Gemma 3), attention logit
soft-capping (Gemma 2), sliding-window layers (Mistral, Qwen2, Gemma 2/3), two rotary tables
(Gemma 3's local and global layers), final logit soft-capping (Gemma 2/3).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

# model_type -> whether its decoder layer is sandwich-normed (see the module docstring)
FAMILIES: Dict[str, bool] = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": False,
                             "gemma2": True, "gemma3_text": True}


class UnsupportedModelError(ValueError):
    """The model is not a decoder family the engine knows (use ``model.generate()`` instead)."""


def _unsupported(model: nn.Module, why: str):
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None) or type(model).__name__
    raise UnsupportedModelError(
        f"Generator: model_type={kind!r} ({type(model).__name__}): {why}; supported families: "
        f"{', '.join(sorted(FAMILIES))}. Other models still run through Hugging Face `model.generate()`.")


class LayerRunner(nn.Module):
    """One decoder layer's modules (shared with the Hugging Face model, not copied) and its
    attention geometry; its static KV cache lives here as buffers (see Decoder.allocate_cache)."""

    def __init__(self, hf_layer: nn.Module, config, index: int, sandwich: bool):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm = hf_layer.input_layernorm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        if sandwich:
            self.post_attn_norm = hf_layer.post_attention_layernorm
            self.pre_mlp_norm = hf_layer.pre_feedforward_layernorm
            self.post_mlp_norm = hf_layer.post_feedforward_layernorm
        else:
            self.post_attn_norm, self.post_mlp_norm = None, None
            self.pre_mlp_norm = hf_layer.post_attention_layernorm
        self.gate_proj, self.up_proj, self.down_proj, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.qkv: Optional[nn.Module] = None  # fused projections, see Decoder.fuse
        self.gate_up: Optional[nn.Module] = None
        self.head_dim = int(getattr(attn, "head_dim", config.hidden_size // config.num_attention_heads))
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        softcap = getattr(config, "attn_logit_softcapping", None)
        self.softcap = float(softcap) if softcap else None
        window = getattr(attn, "sliding_window", None)
        if window is None and config.model_type == "mistral":
            window = getattr(config, "sliding_window", None)  # every Mistral layer slides when set
        self.window = int(window) if window else None
        layer_types = getattr(config, "layer_types", None)
        self.rope_kind = layer_types[index] if config.model_type == "gemma3_text" else "default"
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None
        self.fused_args: Optional[tuple] = None  # the whole-layer operator's arguments, see Decoder.prepare


def check_supported(model: nn.Module) -> str:
    """The model's ``model_type`` if the engine runs it, else :class:`UnsupportedModelError`."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        _unsupported(model, "not a decoder family the engine knows")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        _unsupported(model, "expected a *ForCausalLM with .model.layers and .lm_head")
    if getattr(cfg, "use_bidirectional_attention", False):
        _unsupported(model, "bidirectional attention is not a causal decoder")
    rope = getattr(cfg, "rope_parameters", None) or {}
    kinds = rope.values() if kind == "gemma3_text" else [rope]
    for r in kinds:
        rtype = (r or {}).get("rope_type", "default")
        if rtype not in ("default", "linear", "llama3", "yarn"):
            _unsupported(model, f"rope_type={rtype!r} depends on the sequence length")
    return kind


def layer_runners(model: nn.Module, kind: str) -> List[LayerRunner]:
    return [LayerRunner(layer, model.config, i, FAMILIES[kind]) for i, layer in enumerate(model.model.layers)]
