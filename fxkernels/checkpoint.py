"""Save and load quantized models: ``model.safetensors`` + ``quant_config.json`` (no pickle).

A checkpoint directory holds
* ``quant_config.json``: ``{"quant_method": "flexround", "format_version": 3, "layers":
  {name: {"kind": "linear" | "conv2d" | ..., ...}}, "tied": {name: source}, "model": {...}}``
  (see docs/FORMAT.md; the kinds are those of :mod:`fxkernels.layers`);
* ``model.safetensors``: every parameter and persistent buffer (quantized layers' buffers included);
* for Hugging Face models, ``config.json`` (and tokenizer files when a tokenizer is given).

Loading builds the model with parameters on the meta device, swaps in the modules the JSON lists
(:func:`fxkernels.layers.install_layers`), and assigns the stored tensors, so no float weight is
ever materialized.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Optional

from torch import nn

from .format import FORMAT_VERSION
from .layers import CheckpointError, entry_kind, install_layers, layer_entries, upgrade_entries

CONFIG_NAME = "quant_config.json"
WEIGHTS_NAME = "model.safetensors"
QUANT_METHOD = "flexround"


def quant_layers(model: nn.Module) -> Dict[str, dict]:
    """``{name: entry}`` of every module of a registered layer kind (see :mod:`fxkernels.layers`)."""
    return layer_entries(model)


def _dedup_state(model: nn.Module):
    """State dict without aliased tensors (tied embeddings); returns (tensors, tied map)."""
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, tied


@contextlib.contextmanager
def atomic_directory(directory: str, prefix: str = ".tmp-"):
    """Yield a temporary sibling of ``directory`` to write into; on success it replaces
    ``directory`` (an existing one is moved aside first and removed after), on any error it is
    deleted. Readers never see a half-written checkpoint."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(directory):
            old = directory + ".old-" + os.path.basename(tmp)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(model: nn.Module, directory: str, tokenizer=None, extra: Optional[dict] = None) -> str:
    """Write ``model`` (with QuantLinear, QuantConv2d or other registered layers) to ``directory``
    atomically; returns the path.

    Files are written to a temporary sibling directory that replaces ``directory`` only when
    complete, so an interrupted save never leaves a half-written checkpoint behind.
    """
    from safetensors.torch import save_file

    layers = quant_layers(model)
    if not any(entry_kind(e).weight_shape is not None for e in layers.values()):
        raise ValueError("save_quantized: model has no quantized layers (no QuantLinear layers, no QuantConv2d "
                         "layers); quantize it first (fxkernels.replace_linears or quantizer.quantize)")
    tensors, tied = _dedup_state(model)
    config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers,
              "tied": tied, "model": {"class": type(model).__name__}}
    if extra:
        config["extra"] = extra
    directory = os.path.abspath(directory)
    with atomic_directory(directory) as tmp:
        hf_config = getattr(model, "config", None)
        if hf_config is not None and hasattr(hf_config, "to_json_file"):
            hf_config = hf_config.__class__.from_dict(hf_config.to_dict())
            hf_config.quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
            hf_config.to_json_file(os.path.join(tmp, "config.json"))
            architectures = getattr(hf_config, "architectures", None) or [type(model).__name__]
            config["model"]["hf_architectures"] = list(architectures)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "quant_method": QUANT_METHOD})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    return directory


def read_quant_config(directory: str) -> dict:
    """``quant_config.json`` of ``directory``, checked, with ``layers`` in the current shape (every
    entry names its kind; the CNN tables of format versions 1-2 are folded in, see
    :func:`fxkernels.layers.upgrade_entries`). ``format_version`` is left as written."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise CheckpointError(f"load_quantized: directory={directory!r} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(f"load_quantized: {path} is missing; expected a directory written by "
                              "fxkernels.save_quantized or `flexround quantize`")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"load_quantized: {path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if config.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"load_quantized: quant_method={config.get('quant_method')!r} in {path}; "
                              f"expected {QUANT_METHOD!r} (checkpoints of other tools need their own loader)")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"load_quantized: format_version={version!r} in {path}; this fxkernels reads "
                              f"versions up to {FORMAT_VERSION}: upgrade flexround to load it")
    if not isinstance(config.get("layers", {}), dict):
        raise CheckpointError(f"load_quantized: 'layers' in {path} is a {type(config['layers']).__name__}; "
                              "expected an object {module name: entry}")
    config["layers"] = upgrade_entries(config)
    config.pop("conv_layers", None)
    config.pop("clip_layers", None)
    return config


def checkpoint_layers(directory: str) -> Dict[str, dict]:
    """``{module name: entry}`` of a checkpoint directory, each entry with its ``"kind"``."""
    return read_quant_config(directory)["layers"]


@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device (buffers stay real: rotary tables etc.)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _hf_skeleton(directory: str) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError("load_quantized: the checkpoint holds a Hugging Face model; install the "
                              "'hf' extra (transformers) or pass model= a skeleton to load into") from e
    cfg = transformers.AutoConfig.from_pretrained(directory)
    archs = getattr(cfg, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    with parameters_on_meta():
        if cls is not None:
            return cls._from_config(cfg)
        return transformers.AutoModelForCausalLM.from_config(cfg)


def load_quantized(directory: str, model: Optional[nn.Module] = None, device="cpu") -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` (any format version up to
    :data:`fxkernels.FORMAT_VERSION`, language models and CNNs alike).

    model: a float skeleton of the same architecture (any device, meta included); needed only
    when the directory holds no Hugging Face ``config.json`` (CNNs, custom modules).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_quant_config(directory)
    if model is None:
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise CheckpointError(f"load_quantized: {directory} has no config.json (not a Hugging Face model); "
                                  "pass model= a float skeleton of the architecture")
        model = _hf_skeleton(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise CheckpointError(f"load_quantized: {weights} is missing")
    try:
        state = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"load_quantized: {weights} is corrupt or truncated ({e})") from e

    install_layers(model, config["layers"], device="meta", who="load_quantized")
    for name, source in config.get("tied", {}).items():
        if source not in state:
            raise CheckpointError(f"load_quantized: tied tensor {name!r} points at missing {source!r}")
        state[name] = state[source]
    expected = model.state_dict()
    for key, t in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(t.shape):
            raise CheckpointError(f"load_quantized: tensor {key!r} has shape {tuple(t.shape)} in the file; "
                                  f"the model expects {tuple(expected[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"load_quantized: checkpoint does not match the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"load_quantized: parameters {leftover[:8]} were not in the checkpoint")
    return model.to(device).eval()
