"""Export a flexround checkpoint to the GPTQ tensor layout that GPTQ loaders read.

Loaders: transformers (through optimum + gptqmodel), gptqmodel, vLLM (``gptq``/``gptq_marlin``),
AutoGPTQ. The layout, the zero-point convention and every refusal are documented in docs/FORMAT.md.

Per quantized linear ``<name>`` (weight ``W [N, K]`` = out x in, ``b`` bits, ``pf = 32 // b`` codes
per int32, ``G`` groups):

* ``<name>.qweight``  int32 ``[K/pf, N]``: code of ``W[n, pf*i + j]`` in bits ``b*j .. b*j+b-1`` of
  ``qweight[i, n]`` (low bits first);
* ``<name>.qzeros``   int32 ``[G, N/pf]``: stored zero of ``(g, pf*m + j)`` in bits ``b*j ..`` of
  ``qzeros[g, m]``; ``checkpoint_format="gptq"`` (v1) stores ``zero - 1``, ``"gptq_v2"`` stores ``zero``;
* ``<name>.scales``   float16 ``[G, N]`` (the export rounds our fp32 scales to fp16);
* ``<name>.g_idx``    int32 ``[K]``: ``k // group_size`` (``0`` for per-channel);
* ``<name>.bias``     float16 ``[N]`` when the layer has a bias.

Dequantization: ``W[n, k] = scales[g_idx[k], n] * (q - z)`` with ``z = stored + 1`` (v1) or
``stored`` (v2), which equals flexround's ``scale * (q - zero)`` with ``scale`` rounded to fp16.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .format import FORMAT_VERSION, QuantSpec, as_grouped, unpack

SUPPORTED_BITS = (2, 4, 8)
# Group sizes every GPTQ kernel family accepts (vLLM's Marlin kernels: -1, 32, 64, 128; the
# exllama/triton/torch kernels of gptqmodel and vLLM accept these too).
SUPPORTED_GROUP_SIZES = (32, 64, 128)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_QUANT_SUFFIXES = ("qweight", "scale", "zero", "act_scale", "act_zero", "bias")
_FP16_MAX = 65504.0


class GPTQExportError(ValueError):
    """A checkpoint that the GPTQ layout cannot hold (the message says what would work instead)."""


# -- reading the source --------------------------------------------------------------------
def _is_weights_file(fname: str) -> bool:
    from .checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    return (fname in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
            or re.fullmatch(r"model-\d+-of-\d+\.safetensors", fname) is not None)


def _read_dir(directory: str):
    from .checkpoint import CONFIG_NAME, CheckpointError, CheckpointTensors, read_quant_config

    if not os.path.isdir(directory):
        raise GPTQExportError(f"export_gptq: model_or_ckpt_dir={directory!r} is not a directory; expected a "
                              "flexround checkpoint directory or a model with QuantLinear layers")
    if not os.path.exists(os.path.join(directory, CONFIG_NAME)):
        hf_path = os.path.join(directory, "config.json")
        method = None
        if os.path.exists(hf_path):
            with open(hf_path) as f:
                method = (json.load(f).get("quantization_config") or {}).get("quant_method")
        if method:
            raise GPTQExportError(
                f"export_gptq: {directory} is a {method!r} checkpoint, not a flexround one; export_gptq converts "
                "checkpoints written by fxkernels.save_quantized / `flexround quantize`")
        raise GPTQExportError(f"export_gptq: {directory} has no {CONFIG_NAME}; expected a checkpoint written by "
                              "fxkernels.save_quantized / `flexround quantize`")
    try:
        qconfig = read_quant_config(directory)
    except CheckpointError as e:
        raise GPTQExportError(f"export_gptq: {e}") from e
    hf_path = os.path.join(directory, "config.json")
    if not os.path.exists(hf_path):
        raise GPTQExportError(f"export_gptq: {directory} has no config.json (not a Hugging Face model); GPTQ "
                              "loaders build the model from config.json, so only HF models can be exported")
    with open(hf_path) as f:
        hf_config = json.load(f)
    # one file or shards, read tensor by tensor when converted (a missing or truncated shard raises
    # CheckpointError naming it): the source is never held whole
    tensors = CheckpointTensors(directory, who="export_gptq")
    extra_files = [os.path.join(directory, f) for f in sorted(os.listdir(directory))
                   if f not in ("config.json", CONFIG_NAME) and not _is_weights_file(f) and not f.startswith(".")
                   and os.path.isfile(os.path.join(directory, f))]
    return qconfig["layers"], tensors, qconfig.get("tied", {}), hf_config, extra_files


def _read_model(model: nn.Module):
    from .checkpoint import _dedup_state, quant_layers

    layers = quant_layers(model)
    if not layers:
        raise GPTQExportError("export_gptq: the model has no QuantLinear layers; quantize it first "
                              "(fxkernels.replace_linears or quantizer.quantize)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise GPTQExportError(f"export_gptq: {type(model).__name__} has no Hugging Face config; GPTQ loaders build "
                              "the model from config.json, so only HF models (PreTrainedModel) can be exported")
    tensors, tied = _dedup_state(model)
    hf_config = config.to_dict()
    if not hf_config.get("architectures"):
        hf_config["architectures"] = [type(model).__name__]
    return layers, tensors, tied, hf_config, []


# -- checks --------------------------------------------------------------------------------
def _plan(layers: Dict[str, dict], checkpoint_format: str) -> Tuple[int, int, bool]:
    """(bits, group_size or -1, sym) for the whole model; raises for anything GPTQ cannot hold."""
    for name, entry in layers.items():
        if entry.get("kind", "linear") != "linear":
            raise GPTQExportError(
                f"export_gptq: layer {name!r} is of kind {entry['kind']!r}; GPTQ stores linear layers only. Keep "
                "this model in the flexround format (fxkernels.load_quantized)")
    specs = {name: QuantSpec.from_dict(e["spec"]) for name, e in layers.items()}
    for name, entry in layers.items():
        if entry.get("input_rotation"):
            raise GPTQExportError(
                f"export_gptq: layer {name!r} rotates its input (input_rotation={entry['input_rotation']}, a "
                "Hadamard transform before the matmul); GPTQ loaders have no such step. Export a model quantized "
                "without rotations, or keep it in the flexround format (fxkernels.load_quantized)")
    for name, spec in specs.items():
        if spec.act_bits:
            raise GPTQExportError(
                f"export_gptq: layer {name!r} is {spec} (int8 activations); GPTQ is weight-only and has no "
                "activation scales. Export a weight-only checkpoint (quantize without --act-bits), or keep "
                "W8A8 models in the flexround format (fxkernels.load_quantized)")
        if spec.bits not in SUPPORTED_BITS:
            raise GPTQExportError(
                f"export_gptq: layer {name!r} has bits={spec.bits}; the GPTQ export writes {SUPPORTED_BITS}-bit codes "
                "(3-bit GPTQ packs codes across int32 words, which fxkernels does not write; 5-7 bits have no GPTQ "
                "layout). Re-quantize with --bits 4 (or 2, 8)")
    bits = {s.bits for s in specs.values()}
    if len(bits) > 1:
        raise GPTQExportError(
            f"export_gptq: layers use bits {sorted(bits)}; a GPTQ quantization_config has one `bits` for the model. "
            "Re-quantize every layer with the same --bits, or keep the mixed model in the flexround format")
    groups = {s.group_size for s in specs.values() if s.granularity == "group"}
    if len(groups) > 1:
        raise GPTQExportError(
            f"export_gptq: layers use group sizes {sorted(groups)}; a GPTQ quantization_config has one `group_size`. "
            "Re-quantize with one --group-size")
    group_size = groups.pop() if groups else -1
    if group_size != -1 and group_size not in SUPPORTED_GROUP_SIZES:
        raise GPTQExportError(
            f"export_gptq: group_size={group_size}; GPTQ kernels (vLLM Marlin among them) accept per-channel "
            f"(group_size=-1) or {SUPPORTED_GROUP_SIZES}. Re-quantize with --group-size 32, 64 or 128, or per-channel")
    (b,) = bits
    pf = 32 // b
    for name, e in layers.items():
        n, k = e["out_features"], e["in_features"]
        if n % pf:
            raise GPTQExportError(
                f"export_gptq: layer {name!r} has out_features N={n}; GPTQ packs {pf} {b}-bit zero points per int32 "
                f"along N, so N must be a multiple of {pf}. Keep this layer in float (--skip) or use the flexround "
                "format")
        if k % pf:
            raise GPTQExportError(
                f"export_gptq: layer {name!r} has in_features K={k}; GPTQ packs {pf} {b}-bit codes per int32 along K, "
                f"so K must be a multiple of {pf}. Keep this layer in float (--skip) or use the flexround format")
        if group_size != -1 and k % group_size:
            raise GPTQExportError(
                f"export_gptq: layer {name!r} (K={k}) is per-channel but K is not a multiple of the model's "
                f"group_size={group_size}, so it cannot be written as groups. Quantize it with groups too")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise GPTQExportError(f"export_gptq: checkpoint_format={checkpoint_format!r}; expected one of "
                              f"{CHECKPOINT_FORMATS}")
    sym = all(s.symmetric for s in specs.values())
    return b, group_size, sym


def _shape(tensors, name: str) -> Tuple[int, ...]:
    """A tensor's shape without reading its data when the source is a lazy checkpoint reader."""
    shape = getattr(tensors, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(tensors[name].shape)


def _blocks(layers: Dict[str, dict], tensors, hf_config: dict):
    """(block prefix, quantized module names inside a block, float linears inside a block)."""
    pat = re.compile(r"^(.*)\.(\d+)\.(.+)$")
    per_block: Dict[int, set] = {}
    prefixes = set()
    for name in layers:
        m = pat.match(name)
        if m is None:
            raise GPTQExportError(
                f"export_gptq: quantized layer {name!r} is outside the repeated transformer blocks; GPTQ loaders "
                "only quantize linears inside the blocks (`block_name_to_quantize`). Re-quantize with it skipped "
                "(e.g. --skip lm_head)")
        prefixes.add(m.group(1))
        per_block.setdefault(int(m.group(2)), set()).add(m.group(3))
    if len(prefixes) != 1:
        raise GPTQExportError(f"export_gptq: quantized layers lie under several block lists {sorted(prefixes)}; "
                              "GPTQ configs name one `block_name_to_quantize`")
    prefix = prefixes.pop()
    rels = next(iter(per_block.values()))
    for i, r in per_block.items():
        if r != rels:
            raise GPTQExportError(
                f"export_gptq: block {i} quantizes {sorted(r)} but another block quantizes {sorted(rels)}; GPTQ "
                "configs describe one set of quantized modules for every block. Quantize the same modules in each")
    n_blocks = hf_config.get("num_hidden_layers")
    if isinstance(n_blocks, int) and sorted(per_block) != list(range(n_blocks)):
        missing = sorted(set(range(n_blocks)) - set(per_block))
        raise GPTQExportError(f"export_gptq: blocks {missing[:8]} of {prefix} have no quantized layer; GPTQ loaders "
                              "quantize every block. Quantize all blocks the same way")
    floats = set()
    for t_name in tensors:
        m = pat.match(t_name)
        if m and m.group(1) == prefix and t_name.endswith(".weight") and len(_shape(tensors, t_name)) == 2:
            rel = m.group(3)[: -len(".weight")]
            if rel not in rels:
                floats.add(rel)
    return prefix, sorted(rels), sorted(floats)


# -- packing -------------------------------------------------------------------------------
def _pack_int32(vals: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values along ``dim`` (0 or 1), low bits first, into int32."""
    pf = 32 // bits
    v = vals.to(torch.int64)
    if dim == 0:
        v = v.reshape(v.shape[0] // pf, pf, v.shape[1])
        shifts = (torch.arange(pf, dtype=torch.int64) * bits).reshape(1, pf, 1)
    else:
        v = v.reshape(v.shape[0], v.shape[1] // pf, pf)
        shifts = (torch.arange(pf, dtype=torch.int64) * bits).reshape(1, 1, pf)
    word = (v << shifts).sum(dim=dim + 1)  # fields are disjoint: sum == bitwise or
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # uint32 bit pattern as int32
    return word.to(torch.int32).contiguous()


def _convert_layer(name: str, entry: dict, tensors, bits: int, group_size: int,
                   checkpoint_format: str) -> Dict[str, torch.Tensor]:
    spec = QuantSpec.from_dict(entry["spec"])
    n, k = entry["out_features"], entry["in_features"]
    try:
        qweight, scale, zero = (tensors[f"{name}.{b}"] for b in ("qweight", "scale", "zero"))
    except KeyError as e:
        raise GPTQExportError(f"export_gptq: tensor {e.args[0]!r} is missing; the checkpoint is incomplete") from e
    q = unpack(qweight, spec, k)  # [N, K] unsigned
    scale_g = as_grouped(scale.float(), spec, n)  # [N, G']
    zero_g = as_grouped(zero.to(torch.int32), spec, n)
    if group_size != -1 and spec.granularity != "group":
        reps = k // group_size  # per-channel/per-tensor written as groups with repeated values
        scale_g, zero_g = scale_g.repeat(1, reps), zero_g.repeat(1, reps)
    g = scale_g.shape[1]
    if not torch.isfinite(scale_g).all() or (scale_g <= 0).any():
        raise GPTQExportError(f"export_gptq: layer {name!r} has non-positive or non-finite scales")
    smax, smin = float(scale_g.max()), float(scale_g.min())
    scales16 = scale_g.t().contiguous().to(torch.float16)  # [G, N]
    if smax > _FP16_MAX or (scales16 == 0).any():
        raise GPTQExportError(
            f"export_gptq: layer {name!r} has scales in [{smin:.3g}, {smax:.3g}], outside float16 (GPTQ stores fp16 "
            "scales). Rescale the weights (or keep the flexround format, which stores fp32 scales)")
    stored_zero = zero_g.t().contiguous()  # [G, N], unsigned domain
    if checkpoint_format == "gptq":
        if (stored_zero < 1).any():
            bad = int((stored_zero < 1).sum())
            raise GPTQExportError(
                f"export_gptq: layer {name!r} has {bad} zero point(s) equal to 0; checkpoint_format='gptq' (v1) stores "
                "zero - 1 and cannot represent 0 (loaders would read 2**bits). Export with "
                "checkpoint_format='gptq_v2' (gptqmodel, vLLM with v2 support) or quantize symmetrically")
        stored_zero = stored_zero - 1
    out = {
        f"{name}.qweight": _pack_int32(q.t().contiguous(), bits, dim=0),
        f"{name}.qzeros": _pack_int32(stored_zero, bits, dim=1),
        f"{name}.scales": scales16,
        f"{name}.g_idx": (torch.arange(k, dtype=torch.int32) // (group_size if group_size != -1 else k)).int(),
    }
    assert out[f"{name}.scales"].shape == (g, n)
    bias = tensors[f"{name}.bias"] if f"{name}.bias" in tensors else None
    if entry["bias"]:
        if bias is None:
            raise GPTQExportError(f"export_gptq: tensor '{name}.bias' is missing; the checkpoint is incomplete")
        out[f"{name}.bias"] = bias.to(torch.float16)
    return out


def gptq_quantization_config(bits: int, group_size: int, sym: bool, checkpoint_format: str,
                             prefix: Optional[str] = None, modules: Optional[list] = None,
                             float_modules: Optional[list] = None) -> dict:
    """The ``quantization_config`` written to config.json and quantize_config.json."""
    from . import __version__

    cfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
           "static_groups": False, "true_sequential": True, "lm_head": False, "damp_percent": 0.01,
           "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
           "meta": {"quantizer": [f"fxkernels:{__version__}"], "source_format": f"flexround v{FORMAT_VERSION}"}}
    if prefix is not None:
        cfg["block_name_to_quantize"] = prefix
    if float_modules:
        # Only needed when some block linears stay float: optimum reads modules_in_block_to_quantize,
        # gptqmodel and vLLM read `dynamic` ("-:" = leave this module unquantized).
        cfg["modules_in_block_to_quantize"] = [list(modules)]
        cfg["dynamic"] = {f"-:{re.escape(prefix)}\\.\\d+\\.{re.escape(m)}$": {} for m in float_modules}
    return cfg


def export_gptq(model_or_ckpt_dir: Union[str, os.PathLike, nn.Module], out_dir: Union[str, os.PathLike],
                checkpoint_format: str = "gptq", tokenizer=None,
                max_shard_size: Union[int, str, None] = None) -> str:
    """Write a GPTQ-layout Hugging Face directory from a flexround checkpoint or model.

    model_or_ckpt_dir: a directory written by ``fxkernels.save_quantized`` (with config.json), or a
        Hugging Face model holding QuantLinear layers.
    out_dir: output directory (replaced atomically): config.json (with ``quantization_config``),
        quantize_config.json, model.safetensors, and the source's tokenizer/generation files.
    checkpoint_format: ``"gptq"`` (v1: qzeros hold ``zero - 1``; the default, read by every loader) or
        ``"gptq_v2"`` (qzeros hold ``zero``; gptqmodel, recent vLLM).
    tokenizer: saved alongside when exporting a model object.
    max_shard_size: ``None`` (one ``model.safetensors``), int bytes or a string like ``"2GB"``: the
        output is then written in Hugging Face shards with ``model.safetensors.index.json``, and at
        most about one shard is held in memory (a sharded source is read tensor by tensor).
    Returns the output path. Float tensors (embeddings, norms, lm_head) are copied unchanged.
    """
    from .checkpoint import ShardSink, atomic_directory, parse_shard_size

    max_shard_size = parse_shard_size(max_shard_size, "max_shard_size")

    if isinstance(model_or_ckpt_dir, nn.Module):
        layers, tensors, tied, hf_config, extra_files = _read_model(model_or_ckpt_dir)
    elif isinstance(model_or_ckpt_dir, (str, os.PathLike)):
        layers, tensors, tied, hf_config, extra_files = _read_dir(os.fspath(model_or_ckpt_dir))
    else:
        raise GPTQExportError(f"export_gptq: model_or_ckpt_dir is a {type(model_or_ckpt_dir).__name__}; expected a "
                              "checkpoint directory path or a model with QuantLinear layers")
    bits, group_size, sym = _plan(layers, checkpoint_format)
    prefix, modules, float_modules = _blocks(layers, tensors, hf_config)

    owned = {f"{name}.{s}" for name in layers for s in _QUANT_SUFFIXES}
    for t_name, source in tied.items():
        if t_name in owned:
            raise GPTQExportError(f"export_gptq: quantized tensor {t_name!r} is tied to {source!r}; untie it first")

    qcfg = gptq_quantization_config(bits, group_size, sym, checkpoint_format, prefix, modules, float_modules)
    hf_config = dict(hf_config)
    hf_config["quantization_config"] = qcfg

    out_dir = os.path.abspath(os.fspath(out_dir))
    with atomic_directory(out_dir, prefix=".tmp-gptq-") as tmp:
        for path in extra_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "quantize_config.json"), "w") as f:
            json.dump(qcfg, f, indent=2, sort_keys=True)
        # converted layer by layer into shards: at most one output shard (plus one layer) in memory
        sink = ShardSink(tmp, max_shard_size, metadata={"format": "pt", "quant_method": "gptq"})
        for name, entry in layers.items():
            for t_name, t in _convert_layer(name, entry, tensors, bits, group_size, checkpoint_format).items():
                sink.add(t_name, t)
        for t_name in tensors:
            if t_name not in owned:
                sink.add(t_name, tensors[t_name])
        if not hf_config.get("tie_word_embeddings", True):
            for t_name, source in tied.items():
                if source in tensors and source not in owned:
                    sink.add(t_name, tensors[source].clone())  # the loader expects a separate tensor when not tied
        sink.finish()
    return out_dir
