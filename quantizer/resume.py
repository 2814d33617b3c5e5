"""A resume directory: finished units of a reconstruction run, saved as they finish.

``manifest.json`` (format, version, the run's identity: model and calibration fingerprints and
the configuration) + ``block_NNN.safetensors`` (the exported layers' buffers, their checkpoint
entries in the metadata, built back through fxkernels' layer-kind registry). Every file is
written atomically, the manifest after the block file it counts, so an interrupted run leaves a
directory that a rerun continues from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Dict

import torch
from torch import nn

from fxkernels.layers import layer_entry, layer_from_entry

RESUME_FORMAT = "flexround-resume"
RESUME_VERSION = 1


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def model_fingerprint(model: nn.Module) -> str:
    """Class, parameter names/shapes and float64 sums of every parameter (cheap, order-aware)."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.17g}".encode())
    return h.hexdigest()[:32]


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:32]


class ResumeDir:
    """The directory at ``path`` for a run of ``identity`` over ``nblocks`` units; ``finished``
    counts the units already saved (0 for a fresh directory). A directory written for another
    model, calibration or configuration is refused with a ``ValueError`` naming what differs."""

    def __init__(self, path: str, identity: dict, nblocks: int):
        self.path, self.identity, self.nblocks = path, identity, nblocks
        os.makedirs(path, exist_ok=True)
        self.manifest_path = os.path.join(path, "manifest.json")
        self.finished = 0
        if os.path.exists(self.manifest_path):
            with open(self.manifest_path) as f:
                man = json.load(f)
            if man.get("format") != RESUME_FORMAT or man.get("version") != RESUME_VERSION:
                raise ValueError(f"resume_dir={path!r}: manifest format {man.get('format')!r} v{man.get('version')}; "
                                 f"expected {RESUME_FORMAT!r} v{RESUME_VERSION}")
            for key in ("model", "calibration", "config"):
                if man["identity"].get(key) != identity[key]:
                    what = {"model": "another model (weights or architecture differ)",
                            "calibration": "other calibration data",
                            "config": "another configuration"}[key]
                    detail = ""
                    if key == "config":
                        old, new = man["identity"]["config"], identity["config"]
                        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                        detail = f" (differing fields: {changes})"
                    raise ValueError(f"resume_dir={path!r} was written for {what}{detail}; use a fresh "
                                     "resume_dir or the original model/config")
            self.finished = int(man["finished"])
        self._write_manifest()

    def _write_manifest(self):
        man = {"format": RESUME_FORMAT, "version": RESUME_VERSION, "identity": self.identity,
               "nblocks": self.nblocks, "finished": self.finished}

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(man, f, indent=1, sort_keys=True)
        _atomic_write(self.manifest_path, write)

    def block_path(self, i: int) -> str:
        return os.path.join(self.path, f"block_{i:03d}.safetensors")

    def save_block(self, i: int, layers: Dict[str, nn.Module]) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, layer in layers.items():
            for b, t in layer.named_buffers():
                if t is not None:
                    tensors[f"{name}.{b}"] = t.detach().contiguous().cpu()
            meta[name] = layer_entry(layer)
        _atomic_write(self.block_path(i), lambda tmp: save_file(tensors, tmp, metadata={"layers": json.dumps(meta)}))
        self.finished = i + 1
        self._write_manifest()

    def load_block(self, i: int) -> Dict[str, nn.Module]:
        from safetensors import safe_open

        path = self.block_path(i)
        if not os.path.exists(path):
            raise ValueError(f"resume_dir={self.path!r}: manifest says {self.finished} blocks are finished "
                             f"but {os.path.basename(path)} is missing; use a fresh resume_dir")
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["layers"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        layers = {}
        for name, m in meta.items():
            layer = layer_from_entry(m)
            state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            layer.load_state_dict(state)
            layers[name] = layer
        return layers
