"""``flexround inspect DIR``: what a checkpoint holds, layer by layer, and how much it saves.

Reads only the JSON configs and the safetensors headers (no tensor data), so it is instant on any
size; sharded checkpoints (``model.safetensors.index.json``) are read shard header by shard header.
Understands flexround checkpoints (quant_config.json) and GPTQ-layout directories
(config.json with ``quantization_config.quant_method == "gptq"``, e.g. from ``flexround export``).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Optional, Tuple

def read_safetensors_header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...], int]]:
    """``{name: (dtype, shape, nbytes)}`` from a safetensors file's JSON header (no tensor data read)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"inspect: {path} is missing; expected the checkpoint's weights file")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"inspect: {path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"inspect: {path} declares a {n}-byte header; the file is not safetensors or is corrupt")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"inspect: {path} has a corrupt safetensors header ({e})") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), end - start)
    return out


def read_weight_headers(directory: str) -> Tuple[Dict[str, Tuple[str, Tuple[int, ...], int]], List[str]]:
    """Headers of every weights file of ``directory`` merged (``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` lists), and the file paths. Reads no tensor data."""
    from fxkernels.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, weight_files

    if not os.path.exists(os.path.join(directory, WEIGHTS_INDEX_NAME)):
        path = os.path.join(directory, WEIGHTS_NAME)
        return read_safetensors_header(path), [path]
    header: Dict[str, Tuple[str, Tuple[int, ...], int]] = {}
    files = []
    for path, names in weight_files(directory, who="inspect"):  # CheckpointError names a missing shard
        part = read_safetensors_header(path)
        absent = [n for n in names or () if n not in part]
        if absent:
            raise ValueError(f"inspect: tensors {absent[:8]} are assigned to {path} by {WEIGHTS_INDEX_NAME} but are "
                             "not in that file; the checkpoint is corrupt")
        header.update(part)
        files.append(path)
    return header, files


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _flexround_rows(directory: str, header) -> Tuple[List[dict], set]:
    from fxkernels.checkpoint import read_quant_config
    from fxkernels.format import QuantSpec
    from fxkernels.layers import entry_kind

    config = read_quant_config(directory)
    rows, owned = [], set()
    for name, e in sorted(config["layers"].items()):
        weight_shape = entry_kind(e).weight_shape
        if weight_shape is None:  # a kind without quantized weights (a clip layer): its tensors count as float
            continue
        (out_features, in_features), spec = weight_shape(e), QuantSpec.from_dict(e["spec"])
        names = [f"{name}.{s}" for s in ("qweight", "scale", "zero", "bias", "act_scale", "act_zero")]
        names = [t for t in names if t in header]
        owned.update(names)
        rows.append(dict(name=name, kind=e["kind"], out_features=out_features, in_features=in_features, bits=spec.bits,
                         granularity="tensor" if spec.granularity == "tensor" else
                         "channel" if spec.granularity == "channel" else f"group {spec.group_size}",
                         symmetric=spec.symmetric,
                         act=(f"A8 {spec.act_mode}" if spec.act_bits else "-")
                         + (f", Hadamard {e['input_rotation']}" if e.get("input_rotation") else ""),
                         bias=e["bias"], bytes=sum(header[t][2] for t in names)))
    return rows, owned


def _gptq_rows(qc: dict, header) -> Tuple[List[dict], set]:
    bits = qc.get("bits")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"inspect: GPTQ quantization_config has bits={bits!r}; expected 2, 3, 4 or 8")
    gs = qc.get("group_size", -1)
    rows, owned = [], set()
    for t in sorted(header):
        if not t.endswith(".qweight"):
            continue
        name = t[: -len(".qweight")]
        names = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias") if f"{name}.{s}" in header]
        owned.update(names)
        rows_k, n = header[t][1]
        rows.append(dict(name=name, kind="linear", out_features=n, in_features=rows_k * 32 // bits, bits=bits,
                         granularity="channel" if gs in (-1, None) else f"group {gs}",
                         symmetric=bool(qc.get("sym", True)), act="-", bias=f"{name}.bias" in header,
                         bytes=sum(header[x][2] for x in names)))
    return rows, owned


def inspect_checkpoint(directory: str) -> dict:
    """Layers, formats, byte sizes and compression ratios of a checkpoint directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"inspect: directory={directory!r} does not exist; expected a checkpoint directory")
    header, files = read_weight_headers(directory)
    hf_qc = None
    if os.path.exists(os.path.join(directory, "config.json")):
        with open(os.path.join(directory, "config.json")) as f:
            hf_qc = json.load(f).get("quantization_config")
    if os.path.exists(os.path.join(directory, "quant_config.json")):
        kind = "flexround"
        rows, owned = _flexround_rows(directory, header)
    elif isinstance(hf_qc, dict) and hf_qc.get("quant_method") == "gptq":
        kind = f"gptq ({hf_qc.get('checkpoint_format', 'gptq')})"
        rows, owned = _gptq_rows(hf_qc, header)
    else:
        method = hf_qc.get("quant_method") if isinstance(hf_qc, dict) else None
        raise ValueError(f"inspect: {directory} is neither a flexround checkpoint (quant_config.json) nor a GPTQ "
                         f"directory (config.json quant_method 'gptq'); found quant_method={method!r}")
    for r in rows:
        w = r["out_features"] * r["in_features"] + (r["out_features"] if r["bias"] else 0)
        r["fp16_bytes"], r["fp32_bytes"] = 2 * w, 4 * w
        r["bits_per_weight"] = 8 * r["bytes"] / (r["out_features"] * r["in_features"])
    floats = {t: v for t, v in header.items() if t not in owned}
    float_bytes = sum(v[2] for v in floats.values())
    float_numel = sum(_numel(v[1]) for v in floats.values())
    q_bytes = sum(r["bytes"] for r in rows)
    totals = dict(quantized_layers=len(rows), quantized_bytes=q_bytes,
                  quantized_fp16_bytes=sum(r["fp16_bytes"] for r in rows),
                  quantized_fp32_bytes=sum(r["fp32_bytes"] for r in rows),
                  float_tensors=len(floats), float_bytes=float_bytes,
                  file_bytes=sum(os.path.getsize(f) for f in files), weight_files=len(files))
    totals["model_bytes"] = q_bytes + float_bytes
    totals["model_fp16_bytes"] = totals["quantized_fp16_bytes"] + 2 * float_numel
    totals["model_fp32_bytes"] = totals["quantized_fp32_bytes"] + 4 * float_numel
    return dict(directory=os.path.abspath(directory), kind=kind, layers=rows, totals=totals)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_report(info: dict, max_rows: Optional[int] = None) -> str:
    rows = info["layers"]
    head = ["layer", "shape (NxK)", "bits", "granularity", "sym", "act", "bytes", "bits/w", "vs fp16", "vs fp32"]
    table = [[r["name"], f"{r['out_features']}x{r['in_features']}", str(r["bits"]), r["granularity"],
              "sym" if r["symmetric"] else "asym", r["act"], f"{r['bytes']:,}", f"{r['bits_per_weight']:.2f}",
              _ratio(r["fp16_bytes"], r["bytes"]), _ratio(r["fp32_bytes"], r["bytes"])] for r in rows]
    shown = table if max_rows is None or len(table) <= max_rows else table[:max_rows]
    widths = [max(len(h), *(len(row[i]) for row in shown)) if shown else len(h) for i, h in enumerate(head)]
    lines = [f"{info['kind']} checkpoint: {info['directory']}", "",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in shown]
    if len(shown) < len(table):
        lines.append(f"... {len(table) - len(shown)} more layers (--all to list them)")
    t = info["totals"]
    n_files = t.get("weight_files", 1)
    files = "model.safetensors is" if n_files == 1 else f"the {n_files} weight shards are"
    q, q16, q32 = t["quantized_bytes"], t["quantized_fp16_bytes"], t["quantized_fp32_bytes"]
    lines += ["",
              f"quantized layers: {t['quantized_layers']}, {_mb(q)} "
              f"(fp16 {_mb(q16)}: {_ratio(q16, q)} smaller; fp32 {_mb(q32)}: {_ratio(q32, q)} smaller)",
              f"float tensors:    {t['float_tensors']}, {_mb(t['float_bytes'])} "
              "(embeddings, norms, skipped layers; as stored)",
              f"whole model:      {_mb(t['model_bytes'])} vs fp16 {_mb(t['model_fp16_bytes'])} "
              f"({_ratio(t['model_fp16_bytes'], t['model_bytes'])}) and fp32 {_mb(t['model_fp32_bytes'])} "
              f"({_ratio(t['model_fp32_bytes'], t['model_bytes'])}); {files} {_mb(t['file_bytes'])}"]
    return "\n".join(lines)


def cmd_inspect(a) -> int:
    info = inspect_checkpoint(a.dir)
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_report(info, max_rows=None if a.all else 60))
    return 0


def cmd_export(a) -> int:
    from fxkernels.export_gptq import export_gptq

    if a.format != "gptq":
        raise ValueError(f"export: --format {a.format!r}; expected 'gptq'")
    out = export_gptq(a.model, a.out, checkpoint_format=a.checkpoint_format, max_shard_size=a.max_shard_size)
    print(f"wrote GPTQ ({a.checkpoint_format}) checkpoint -> {out}")
    return 0


def add_parsers(sub) -> None:
    """Register the ``inspect`` and ``export`` subcommands on the ``flexround`` parser."""
    i = sub.add_parser("inspect", help="layers, bits, sizes and compression of a checkpoint",
                       description="Show each quantized layer's shape, bits, granularity and stored bytes, with "
                       "compression ratios against fp16 and fp32, and totals. Reads only headers.")
    i.add_argument("dir", help="checkpoint directory (flexround or GPTQ layout)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--all", action="store_true", help="list every layer (default: the first 60)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="convert a flexround checkpoint to another layout (GPTQ)",
                       description="Write a GPTQ-layout Hugging Face directory (qweight/qzeros/scales/g_idx, "
                       "quantization_config quant_method 'gptq') that GPTQ loaders read. See docs/FORMAT.md.")
    e.add_argument("--format", default="gptq", choices=["gptq"], help="target layout (default gptq)")
    e.add_argument("--model", required=True, help="flexround checkpoint directory")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="gptq (v1, qzeros hold zero-1; default) or gptq_v2 (qzeros hold zero)")
    e.add_argument("--max-shard-size", default=None,
                   help="write Hugging Face shards of at most this size (e.g. 2GB, 500MB; default: one file)")
    e.set_defaults(func=cmd_export)
