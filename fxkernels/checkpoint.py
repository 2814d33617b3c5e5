"""Save and load quantized models: safetensors weights + ``quant_config.json`` (no pickle).

A checkpoint directory holds
* ``quant_config.json``: ``{"quant_method": "flexround", "format_version": 3, "layers":
  {name: {"kind": "linear" | "conv2d" | ..., ...}}, "tied": {name: source}, "model": {...}}``
  (see docs/FORMAT.md; the kinds are those of :mod:`fxkernels.layers`);
* the weights: every parameter and persistent buffer (quantized layers' buffers included), either in
  one ``model.safetensors`` or, when a shard size is set and exceeded, in shards
  ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``: the Hugging Face
  convention, so transformers and other tools read it as they read any sharded model);
* for Hugging Face models, ``config.json`` (and tokenizer files when a tokenizer is given).

Writing goes through one class, :class:`ShardedWriter` (``save_quantized`` uses it too): each tensor's
bytes go to disk as it is added (the shard's header is written when the shard is closed), so a
streaming quantizer holds no shard in memory, and everything lands in a temporary sibling directory
that replaces the target only when complete. Loading builds the model with parameters on the meta
device, swaps in the modules the JSON lists (:func:`fxkernels.layers.install_layers`), and assigns
the stored tensors shard by shard, so no float weight is ever materialized and at most one shard is
held beyond the model itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .format import FORMAT_VERSION
from .layers import CheckpointError, entry_kind, install_layers, layer_entries, upgrade_entries

CONFIG_NAME = "quant_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
QUANT_METHOD = "flexround"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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


def parse_shard_size(value: Union[int, str, None], argument: str = "max_shard_size") -> Optional[int]:
    """Bytes from an int or a string like ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` (KB/MB/GB/TB are powers
    of 1000, KiB/MiB/GiB/TiB powers of 1024, as in Hugging Face); ``None`` stays ``None`` (one file)."""
    if value is None:
        return None
    expected = "a positive int (bytes) or a string like '2GB', '500MB' or '1.5GiB'"
    if isinstance(value, bool):
        raise ValueError(f"{argument}={value!r}; expected {expected}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{argument}={value!r}; expected {expected}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
        if m:
            n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()])
            if n > 0:
                return n
    raise ValueError(f"{argument}={value!r}; expected {expected}")


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


# safetensors' names of the torch dtypes a checkpoint may hold
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPES[getattr(torch, _name)] = _code
_COPY_CHUNK = 16 << 20


class ShardSink:
    """Safetensors shards written into an existing (temporary) directory; no config files.

    ``add(name, tensor)`` writes the tensor's bytes at once to the current shard's data file for its
    element size (hidden ``.shard-0000i.data<size>``), so the sink holds no tensor and memory does
    not grow with the shard size. When the next tensor would push the shard past
    ``max_shard_bytes`` the shard is closed: its safetensors header (known only now) and then the
    data files, widest elements first (every tensor starts at a multiple of its element size, as
    safetensors' own writer arranges them), are written to ``.shard-0000i.safetensors`` and the data
    files are removed (a tensor larger than the limit gets a shard of its own, as in Hugging Face).
    ``finish()`` closes the last shard, names the shards ``model-0000i-of-0000N.safetensors`` and
    writes ``model.safetensors.index.json`` (``metadata``: ``total_size`` in bytes and ``dtype``,
    the floating dtype holding most bytes); a single shard is written as ``model.safetensors`` with
    no index. Everything lands in the
    caller's temporary directory, which replaces the target only when complete. Used by
    :class:`ShardedWriter`, the GPTQ export and the scale bench's random-model writer.
    """

    def __init__(self, directory: str, max_shard_bytes: Optional[int] = None, metadata: Optional[dict] = None):
        self.directory = directory
        self.max_shard_bytes = parse_shard_size(max_shard_bytes, "max_shard_bytes")
        self.metadata = dict(metadata or {"format": "pt"})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError(f"ShardSink: metadata={self.metadata!r}; expected a dict of strings")
        self._data: Dict[int, object] = {}  # element size -> open data file of the current shard
        self._group_bytes: Dict[int, int] = {}  # element size -> bytes in that file
        self._entries: Dict[str, dict] = {}  # the current shard's header entries (offsets within their file)
        self._shard_bytes = 0
        self._shards: List[Tuple[str, List[str]]] = []  # (temporary file name, tensor names)
        self._names = set()
        self.total_size = 0
        self._float_bytes: Dict[torch.dtype, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"ShardedWriter.add: name={name!r}; expected a non-empty tensor name")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"ShardedWriter.add: tensor for {name!r} is a {type(tensor).__name__}; "
                             "expected a torch.Tensor")
        if name in self._names:
            raise ValueError(f"ShardedWriter.add: tensor {name!r} was already added; each name is written once "
                             "(tied tensors go in the config's 'tied' map, not twice)")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"ShardedWriter.add: tensor {name!r} has dtype {tensor.dtype}; safetensors stores "
                             f"{sorted(str(d).replace('torch.', '') for d in _SAFETENSORS_DTYPES)}")
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if self.max_shard_bytes is not None and self._entries and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        size = t.element_size()
        if size not in self._data:
            self._data[size] = open(self._data_path(len(self._shards) + 1, size), "wb")
            self._group_bytes[size] = 0
        if nbytes:
            self._data[size].write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        start = self._group_bytes[size]
        self._entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [start, start + nbytes], "size": size}
        self._group_bytes[size] = start + nbytes
        self._names.add(name)
        self._shard_bytes += nbytes
        self.total_size += nbytes
        if t.is_floating_point():
            self._float_bytes[t.dtype] = self._float_bytes.get(t.dtype, 0) + nbytes

    def _data_path(self, index: int, size: int) -> str:
        return os.path.join(self.directory, f".shard-{index:05d}.data{size}")

    def _close_shard(self) -> None:
        """Header, then the data files' bytes (widest elements first), into the shard's safetensors
        file; the data files go."""
        if not self._data:
            return
        for f in self._data.values():
            f.close()
        order = sorted(self._data, reverse=True)
        base, at = {}, 0
        for size in order:  # each group's length is a multiple of its element size: the next stays aligned
            base[size], at = at, at + self._group_bytes[size]
        header = {"__metadata__": self.metadata}
        for name, e in self._entries.items():
            b = base[e["size"]]
            header[name] = {"dtype": e["dtype"], "shape": e["shape"],
                            "data_offsets": [b + e["data_offsets"][0], b + e["data_offsets"][1]]}
        header = json.dumps(header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        index = len(self._shards) + 1
        fname = f".shard-{index:05d}.safetensors"
        with open(os.path.join(self.directory, fname), "wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for size in order:
                with open(self._data_path(index, size), "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                os.remove(self._data_path(index, size))
        self._shards.append((fname, list(self._entries)))
        self._data, self._group_bytes, self._entries, self._shard_bytes = {}, {}, {}, 0

    def finish(self) -> List[str]:
        """Close the last shard, give the shards their final names; returns the weight file names."""
        self._close_shard()
        if not self._shards:  # a model without tensors still gets a (valid, empty) weights file
            from safetensors.torch import save_file
            save_file({}, os.path.join(self.directory, WEIGHTS_NAME), metadata=self.metadata)
            return [WEIGHTS_NAME]
        if len(self._shards) == 1:
            os.replace(os.path.join(self.directory, self._shards[0][0]), os.path.join(self.directory, WEIGHTS_NAME))
            return [WEIGHTS_NAME]
        n = len(self._shards)
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, tmp_name), os.path.join(self.directory, final))
            files.append(final)
            weight_map.update((name, final) for name in names)
        metadata = {"total_size": self.total_size}
        if self._float_bytes:
            # transformers' from_pretrained(dtype="auto") takes the dtype from here; without it, it
            # opens the first shard before any quantizer hook could check that the shard exists
            metadata["dtype"] = str(max(self._float_bytes, key=self._float_bytes.get)).replace("torch.", "")
        index = {"metadata": metadata, "weight_map": weight_map}
        with open(os.path.join(self.directory, WEIGHTS_INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        return files


class ShardedWriter:
    """Write a flexround checkpoint tensor by tensor, shard by shard, atomically::

        with ShardedWriter(directory, max_shard_bytes="2GB",
                           metadata_config={"layers": layers, "tied": tied, "model": {"class": "LlamaForCausalLM"}},
                           hf_config=model.config, tokenizer=tok) as w:
            for name, tensor in tensors:
                w.add(name, tensor)
            w.set_config(layers=more_layers)      # optional: parts known only at the end

    directory: the checkpoint directory; replaced only when the ``with`` block exits cleanly (all
        files go to a temporary sibling first; on any error nothing is left behind).
    max_shard_bytes: int bytes or a size string (``"2GB"``, ``"500MB"``); ``None``: one file.
        A single resulting shard is named ``model.safetensors`` (no index), as before sharding existed.
    metadata_config: the content of ``quant_config.json`` the caller knows: ``layers`` ({module name:
        entry}, required by exit, at least one quantized layer), ``tied`` ({tensor name: source tensor
        name}, tensors not added because they alias another), ``model`` (a dict, e.g. ``{"class": name}``,
        or a class name string), ``extra`` (free-form, stored under ``"extra"``). ``quant_method`` and
        ``format_version`` are filled in by the writer.
    hf_config: a ``transformers.PretrainedConfig`` or the dict of a ``config.json``; written as
        ``config.json`` with ``quantization_config = {"quant_method": "flexround", "format_version": N}``
        and its ``architectures`` recorded as ``model.hf_architectures``.
    tokenizer: saved with ``save_pretrained`` into the directory.

    ``set_config(layers=, tied=, model=, extra=, hf_config=, tokenizer=)`` replaces any of these before
    exit. ``add`` writes the tensor's bytes at once and keeps no reference to it.
    """

    def __init__(self, directory: str, max_shard_bytes: Union[int, str, None] = None,
                 metadata_config: Optional[dict] = None, hf_config=None, tokenizer=None):
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"ShardedWriter: directory={directory!r}; expected a path")
        if metadata_config is not None and not isinstance(metadata_config, dict):
            raise ValueError(f"ShardedWriter: metadata_config is a {type(metadata_config).__name__}; expected a dict "
                             "with 'layers', 'tied', 'model', 'extra'")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_shard_bytes = parse_shard_size(max_shard_bytes, "max_shard_bytes")
        self._config: dict = {}
        self._hf_config = None
        self._tokenizer = None
        self.set_config(**(metadata_config or {}))
        self.set_config(hf_config=hf_config, tokenizer=tokenizer)
        self._atomic = None
        self._sink: Optional[ShardSink] = None
        self.files: List[str] = []

    _CONFIG_KEYS = ("layers", "tied", "model", "extra")

    def set_config(self, layers: Optional[dict] = None, tied: Optional[dict] = None, model=None,
                   extra: Optional[dict] = None, hf_config=None, tokenizer=None, **unknown) -> None:
        """Set parts of the checkpoint's configuration (``None`` leaves a part unchanged)."""
        if unknown:
            raise ValueError(f"ShardedWriter: unknown config keys {sorted(unknown)}; expected "
                             f"{list(self._CONFIG_KEYS) + ['hf_config', 'tokenizer']}")
        for key, value in (("layers", layers), ("tied", tied), ("extra", extra)):
            if value is not None:
                if not isinstance(value, dict):
                    raise ValueError(f"ShardedWriter: {key} is a {type(value).__name__}; expected a dict")
                self._config[key] = dict(value)
        if model is not None:
            if isinstance(model, str):
                model = {"class": model}
            if not isinstance(model, dict):
                raise ValueError(f"ShardedWriter: model={model!r}; expected a dict such as {{'class': name}} "
                                 "or a class name")
            self._config["model"] = dict(model)
        if hf_config is not None:
            if not (isinstance(hf_config, dict) or hasattr(hf_config, "to_dict")):
                raise ValueError(f"ShardedWriter: hf_config is a {type(hf_config).__name__}; expected a "
                                 "transformers PretrainedConfig or a config.json dict")
            self._hf_config = hf_config
        if tokenizer is not None:
            self._tokenizer = tokenizer

    def __enter__(self) -> "ShardedWriter":
        self._atomic = atomic_directory(self.directory)
        tmp = self._atomic.__enter__()
        self._sink = ShardSink(tmp, self.max_shard_bytes, metadata={"format": "pt", "quant_method": QUANT_METHOD})
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor into the current shard (see :class:`ShardSink`)."""
        if self._sink is None:
            raise RuntimeError("ShardedWriter.add: use the writer inside a `with` block")
        self._sink.add(name, tensor)

    def __exit__(self, exc_type, exc, tb):
        atomic, self._atomic = self._atomic, None
        if exc_type is not None:
            self._sink = None
            return atomic.__exit__(exc_type, exc, tb)  # deletes the temporary directory, re-raises
        try:
            self._finish(self._sink.directory)
        except BaseException as e:
            self._sink = None
            atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._sink = None
        atomic.__exit__(None, None, None)
        return False

    def _finish(self, tmp: str) -> None:
        layers = self._config.get("layers")
        if not isinstance(layers, dict) or not any(entry_kind(e).weight_shape is not None for e in layers.values()):
            raise ValueError("ShardedWriter: no quantized layers in the config (metadata_config['layers'] or "
                             "set_config(layers=...)); a flexround checkpoint needs at least one")
        config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers,
                  "tied": self._config.get("tied", {}), "model": dict(self._config.get("model", {}))}
        if self._config.get("extra"):
            config["extra"] = self._config["extra"]
        if self._hf_config is not None:
            hf = self._hf_config
            if isinstance(hf, dict):
                hf = dict(hf)
                hf["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(hf, f, indent=2, sort_keys=True)
                architectures = hf.get("architectures") or [config["model"].get("class")]
            else:
                hf = hf.__class__.from_dict(hf.to_dict())
                hf.quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
                hf.to_json_file(os.path.join(tmp, "config.json"))
                architectures = getattr(hf, "architectures", None) or [config["model"].get("class")]
            config["model"]["hf_architectures"] = [a for a in architectures if a]
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(tmp)
        self.files = self._sink.finish()
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)


def save_quantized(model: nn.Module, directory: str, tokenizer=None, extra: Optional[dict] = None,
                   max_shard_size: Union[int, str, None] = None) -> str:
    """Write ``model`` (with QuantLinear, QuantConv2d or other registered layers) to ``directory``
    atomically; returns the path.

    max_shard_size: ``None`` (one ``model.safetensors``), int bytes, or a string like ``"2GB"`` /
        ``"500MB"``: weights above it are split into Hugging Face style shards with an index.
    Files are written to a temporary sibling directory that replaces ``directory`` only when
    complete, so an interrupted save never leaves a half-written checkpoint behind.
    """
    max_shard_size = parse_shard_size(max_shard_size, "max_shard_size")
    layers = quant_layers(model)
    if not any(entry_kind(e).weight_shape is not None for e in layers.values()):
        raise ValueError("save_quantized: model has no quantized layers (no QuantLinear layers, no QuantConv2d "
                         "layers); quantize it first (fxkernels.replace_linears or quantizer.quantize)")
    tensors, tied = _dedup_state(model)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and not hasattr(hf_config, "to_json_file"):
        hf_config = None  # a custom module's own `config` attribute, not a Hugging Face config
    with ShardedWriter(directory, max_shard_bytes=max_shard_size,
                       metadata_config={"layers": layers, "tied": tied, "model": {"class": type(model).__name__},
                                        "extra": extra},
                       hf_config=hf_config, tokenizer=tokenizer) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return w.directory


def _read_json(path: str, who: str):
    """A checkpoint's JSON file; invalid JSON is a :class:`CheckpointError` naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{who}: {path} is not valid JSON ({e}); the checkpoint is corrupt") from e


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
    config = _read_json(path, "load_quantized")
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


# -- reading the weights, shard by shard ---------------------------------------------------
def weight_files(directory: str, who: str = "load_quantized") -> List[Tuple[str, Optional[List[str]]]]:
    """The weight files of a checkpoint directory, in order: ``[(path, tensor names or None)]``.

    ``model.safetensors`` alone gives ``[(path, None)]`` (every tensor in it); otherwise
    ``model.safetensors.index.json`` lists the shards and the names each must hold. Every listed
    shard is checked to exist before anything is read, so a missing shard fails fast.
    Raises :class:`CheckpointError` naming the file (``who`` prefixes the message).
    """
    single = os.path.join(directory, WEIGHTS_NAME)
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.exists(single):  # the order transformers uses: the single file first
        return [(single, None)]
    if not os.path.exists(index_path):
        raise CheckpointError(f"{who}: {single} is missing (and there is no {WEIGHTS_INDEX_NAME} of a sharded "
                              "checkpoint)")
    index = _read_json(index_path, who)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{who}: {index_path} has no 'weight_map' object {{tensor name: shard file}}; "
                              "the checkpoint is corrupt")
    per_file: Dict[str, List[str]] = {}
    for name, fname in weight_map.items():
        # a shard is a plain file name next to the index: never follow a path out of the directory
        if os.path.basename(fname) != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{who}: {index_path} maps {name!r} to {fname!r}; expected a file name in "
                                  "the checkpoint directory")
        per_file.setdefault(fname, []).append(name)
    out = []
    for fname in sorted(per_file):
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise CheckpointError(f"{who}: shard {path} is missing (listed in {index_path} for "
                                  f"{len(per_file[fname])} tensors, e.g. {per_file[fname][0]!r})")
        out.append((path, per_file[fname]))
    return out


def _check_names(path: str, keys, names: Optional[List[str]], who: str) -> None:
    if names is None:
        return
    keys = set(keys)
    absent = [n for n in names if n not in keys]
    if absent:
        raise CheckpointError(f"{who}: tensors {absent[:8]} are assigned to {path} by {WEIGHTS_INDEX_NAME} but are "
                              "not in that file; the checkpoint is corrupt")


def _open_checked(path: str, names: Optional[List[str]], who: str):
    """``safe_open`` handle of one weights file, its header checked (the file covers every tensor,
    the index's names are in it); no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, "pt")
        keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{who}: {path} is corrupt or truncated ({e})") from e
    _check_names(path, keys, names, who)
    return handle


def check_weight_files(directory: str, who: str = "load_quantized") -> List[str]:
    """Paths of the weight files of ``directory`` after checking that each exists and that its
    header is intact (reads headers only): a missing or truncated shard fails before any loading."""
    files = weight_files(directory, who)
    for path, names in files:
        _open_checked(path, names, who)
    return [path for path, _ in files]


def iter_weight_shards(directory: str, device="cpu", who: str = "load_quantized"
                       ) -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
    """Yield ``(path, {name: tensor})`` one weight file at a time (one shard in memory at a time)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for path, names in weight_files(directory, who):
        try:
            state = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{who}: {path} is corrupt or truncated ({e})") from e
        _check_names(path, state.keys(), names, who)
        yield path, state


class CheckpointTensors(Mapping):
    """Read-only ``{name: tensor}`` over a checkpoint's weight files that reads a tensor only when
    it is asked for (``safe_open`` memory maps; headers are read and checked up front), so a
    converter can walk a model larger than memory. ``shape(name)`` needs no tensor data."""

    def __init__(self, directory: str, who: str = "load_quantized"):
        self._where: Dict[str, str] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._handles = {}
        self.files: List[str] = []
        for path, names in weight_files(directory, who):
            handle = _open_checked(path, names, who)
            keys = list(handle.keys())
            for k in keys:
                self._shapes[k] = tuple(handle.get_slice(k).get_shape())
            self._handles[path] = handle
            self.files.append(path)
            for k in keys:
                self._where[k] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]  # KeyError for an unknown name, as a dict
        return self._handles[path].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]


def load_quantized(directory: str, model: Optional[nn.Module] = None, device="cpu") -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` or :class:`ShardedWriter` (any format
    version up to :data:`fxkernels.FORMAT_VERSION`, language models and CNNs alike, one weights file
    or shards; shards are read and assigned one at a time).

    model: a float skeleton of the same architecture (any device, meta included); needed only
    when the directory holds no Hugging Face ``config.json`` (CNNs, custom modules).
    """
    config = read_quant_config(directory)
    if model is None:
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise CheckpointError(f"load_quantized: {directory} has no config.json (not a Hugging Face model); "
                                  "pass model= a float skeleton of the architecture")
        model = _hf_skeleton(directory)
    check_weight_files(directory, "load_quantized")  # a missing/truncated shard fails before any loading

    install_layers(model, config["layers"], device="meta", who="load_quantized")
    tied_to: Dict[str, List[str]] = {}
    for name, source in config.get("tied", {}).items():
        tied_to.setdefault(source, []).append(name)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded, unexpected = set(), []
    for _, state in iter_weight_shards(directory, device, "load_quantized"):
        for source, names in tied_to.items():
            if source in state:
                state.update((n, state[source]) for n in names)
        for key, t in state.items():
            if key in expected and expected[key] != tuple(t.shape):
                raise CheckpointError(f"load_quantized: tensor {key!r} has shape {tuple(t.shape)} in the file; "
                                      f"the model expects {expected[key]}")
        unexpected += model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        loaded.update(state)
        del state  # the next shard replaces this one: at most one shard held beyond the model
    for source, names in tied_to.items():
        if source not in loaded:
            raise CheckpointError(f"load_quantized: tied tensor {names[0]!r} points at missing {source!r}")
    missing = [k for k in expected if k not in loaded]
    if missing or unexpected:
        raise CheckpointError(f"load_quantized: checkpoint does not match the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"load_quantized: parameters {leftover[:8]} were not in the checkpoint")
    return model.to(device).eval()
