"""Convert a GGUF file into an fp32 Hugging Face directory one tensor at a time.

The file is read through the ``gguf`` package's memory-mapped reader. Each tensor is de-quantized,
passed through transformers' tensor processor for the file's architecture (the same code
``from_pretrained(..., gguf_file=...)`` runs, e.g. undoing llama.cpp's q/k row permutation or
Gemma's norm offset) and renamed with transformers' GGUF -> Hugging Face name map, then written
straight to the shard on disk (:class:`fxkernels.checkpoint.ShardSink`, which holds no shard in
memory). De-quantization runs a slab of rows at a time into the tensor's float32 array, and the
file's pages are dropped once a tensor is written, so peak memory is about one fp32 tensor (two
for a tensor the processor reorders, such as q/k), never the model; for MoE processors that
assemble one tensor from several GGUF tensors, one block's assembled tensors. The config and
tokenizer come from transformers' GGUF config/tokenizer loaders, which read metadata only (their
parse of a large vocabulary is a transient peak of its own: ~0.7 GB for 262k tokens).

The directory is written into a temporary sibling that replaces the target only once complete
(:func:`fxkernels.checkpoint.atomic_directory`): weights as ``model.safetensors`` or, past
``max_shard_size``, ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, plus
``config.json``, ``generation_config.json`` and the tokenizer files.

A GGUF without an ``output.weight`` tensor has tied embeddings: transformers' config says
``tie_word_embeddings=True`` and no ``lm_head.weight`` is written, so loading the directory ties
``lm_head`` to ``model.embed_tokens`` exactly as loading the GGUF does.

Architectures that transformers loads through its newer GGUF path (``transformers.integrations.
gguf``: weight converters applied inside ``from_pretrained``, e.g. qwen35, lfm2) have no per-tensor
processor here; for them :func:`gguf_to_hf_dir` falls back to the whole-model conversion
(:func:`whole_model_convert`), which holds the fp32 model in memory once.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

DEFAULT_SHARD_SIZE = "2GB"
DEQUANT_CHUNK_ELEMENTS = 1 << 22  # float32 values de-quantized per call (16 MiB)
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _read_gguf(gguf_path: str):
    """``gguf.GGUFReader`` of the file, with a clear error for a file that is not a complete GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - the venv installs it with transformers' GGUF support
        raise ImportError("converting a GGUF file needs the `gguf` package: pip install gguf") from e
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"gguf_path={gguf_path!r}: no such GGUF file")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the reader raises ValueError, struct/index errors or reshape errors on bad bytes
        raise ValueError(f"gguf_path={gguf_path!r} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "expected a complete GGUF (v2/v3) file - it may be truncated or corrupt") from e
    size = os.path.getsize(gguf_path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ValueError(f"gguf_path={gguf_path!r}: tensor {t.name!r} needs bytes up to offset {end} but "
                             f"the file has {size} bytes; expected a complete GGUF file (truncated download?)")
    return reader


def _architecture(reader, gguf_path: str) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"gguf_path={gguf_path!r} has no 'general.architecture' metadata; expected a GGUF "
                         "model file written by llama.cpp's converter")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _supported_error(gguf_path: str, arch: str, cause: Exception) -> ValueError:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return ValueError(f"gguf_path={gguf_path!r} has architecture {arch!r}, which transformers' GGUF "
                      f"integration does not support ({cause}); supported: "
                      f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")


def _block_of(name: str) -> int:
    """The block a GGUF tensor belongs to (``blk.N.*``), -1 for the others (embeddings, final norm, head)."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else -1


def _dequantize(data: np.ndarray, qtype, chunk_elements: int = DEQUANT_CHUNK_ELEMENTS) -> np.ndarray:
    """``gguf.dequantize`` of a tensor, a slab of rows at a time into one float32 array.

    GGUF blocks never span rows, so each row de-quantizes on its own and the values are those of
    one whole-tensor call; what the chunking bounds is the package's temporaries (several arrays
    of the tensor's full size when called on the whole of it). The result is writable and never a
    view of the memory-mapped file."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] < 2:
        return np.array(dequantize(data, qtype), dtype=np.float32, order="C")
    rows = data.reshape(-1, data.shape[-1])
    cols = dequantize(rows[:1], qtype).shape[-1]
    step = max(1, chunk_elements // max(cols, 1))
    out = np.empty((rows.shape[0], cols), dtype=np.float32)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], qtype)
    return out.reshape(*data.shape[:-1], cols)


def _drop_pages(file_map, offset: int, nbytes: int) -> None:
    """Tell the kernel a converted tensor's pages of the memory-mapped file are not needed again.

    They are clean file pages, reclaimable anyway, but until dropped they count in the process's
    resident size, which would then grow to the size of the GGUF file."""
    if file_map is None or not hasattr(mmap, "MADV_DONTNEED") or nbytes <= 0:
        return
    start = offset - offset % mmap.PAGESIZE
    try:
        file_map.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
    except (OSError, ValueError):  # advice only: a platform that refuses it keeps the pages cached
        pass


def _to_fp32(weights) -> torch.Tensor:
    """A float32, C-contiguous torch tensor sharing ``weights``' memory when it can."""
    arr = np.asarray(weights)
    if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(arr)


def whole_model_convert(gguf_path: str, out_dir: str) -> str:
    """The whole-model conversion: ``from_pretrained(gguf_file=...)`` in fp32, then saved (atomically).
    Holds the fp32 model in memory; used for architectures without per-tensor processors."""
    from fxkernels.checkpoint import atomic_directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise _supported_error(gguf_path, _architecture(_read_gguf(gguf_path), gguf_path), e) from e
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the weights.
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    del model
    with atomic_directory(out_dir) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


def _config_and_tokenizer(gguf_path: str, arch: str):
    from transformers import AutoConfig, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise _supported_error(gguf_path, arch, e) from e
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return config, tok


def gguf_to_hf_dir(gguf_path: str, out_dir: str, max_shard_size: Union[int, str, None] = DEFAULT_SHARD_SIZE,
                   log: Callable[[str], None] = print, _after_tensor: Optional[Callable[[str], None]] = None) -> str:
    """Write ``out_dir``: the GGUF file de-quantized to an fp32 Hugging Face directory, one tensor at a time.

    ``max_shard_size``: bytes or a size string (``"2GB"``); ``None`` writes one ``model.safetensors``.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file) for a
    truncated or corrupt one or an architecture transformers' GGUF integration does not support.
    ``_after_tensor`` (tests) is called with each Hugging Face tensor name once it is written.
    Returns ``out_dir``.
    """
    from fxkernels.checkpoint import ShardSink, atomic_directory, parse_shard_size
    from transformers import AutoModelForCausalLM
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parse_shard_size(max_shard_size, "max_shard_size")
    t0 = time.time()
    reader = _read_gguf(gguf_path)
    arch = _architecture(reader, gguf_path)
    if is_gguf_arch_supported(arch):
        log(f"{os.path.basename(gguf_path)}: architecture {arch!r} has no per-tensor converter; "
            "converting the whole model in memory")
        return whole_model_convert(gguf_path, out_dir)
    # only the tensors' names, types and memory-mapped data are kept: the reader's metadata fields
    # (numpy views per vocabulary string: ~0.7 GB for a 262k-token vocabulary) are let go before
    # transformers reads the metadata again for the config and the tokenizer
    tensors = sorted(((t.name, t.tensor_type, t.data, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors),
                     key=lambda t: _block_of(t[0]))
    file_map = getattr(reader.data, "_mmap", None)
    del reader

    config, tok = _config_and_tokenizer(gguf_path, arch)
    config.dtype = torch.float32
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # the processor gets the config dict parsed from the GGUF metadata (head counts for the q/k
    # permutation, ...), as in transformers' loader: not the Hugging Face config, whose defaults
    # can fill in keys the file lacks and so change what the processor does
    parsed = load_gguf_checkpoint(gguf_path, return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed)
    key_map = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict().keys())
    # names that share the input embedding's parameter (lm_head when tied): loading ties them, not the file
    embedding = skeleton.get_input_embeddings().weight
    tied = {n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is embedding}
    log(f"converting {os.path.basename(gguf_path)} to fp32 tensor by tensor (cached in {out_dir}) ...")

    # Processors that assemble one Hugging Face tensor from several GGUF tensors (MoE gate + up)
    # write into `pending`; all of a block's parts live in that block, so the block is walked as a
    # unit (tensors sorted by block) and its assembled tensors are written when the next one starts.
    written = set()
    with atomic_directory(out_dir) as tmp:
        # the small files first, so the tokenizer (a large vocabulary) is freed before the tensors
        config.architectures = [type(skeleton).__name__]
        config.save_pretrained(tmp)
        if skeleton.can_generate() and skeleton.generation_config is not None:
            skeleton.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del tok
        sink = ShardSink(tmp, max_shard_bytes=max_shard_size)

        def emit(name: str, tensor: torch.Tensor) -> None:
            sink.add(name, tensor)
            written.add(name)
            if _after_tensor is not None:
                _after_tensor(name)

        pending: Dict[str, Dict[str, torch.Tensor]] = {"tensors": {}}
        block = None
        while tensors:
            gguf_name, qtype, data, offset, nbytes = tensors.pop(0)
            if _block_of(gguf_name) != block:
                for name, tensor in pending["tensors"].items():
                    emit(name, tensor.to(torch.float32))
                pending["tensors"].clear()
                block = _block_of(gguf_name)
            try:
                weights = _dequantize(data, qtype)
            except NotImplementedError as e:
                raise ValueError(f"gguf_path={gguf_path!r}: tensor {gguf_name!r} has type {qtype.name}, "
                                 f"which the gguf package cannot de-quantize ({e})") from e
            result = processor.process(weights=weights, name=gguf_name, tensor_key_mapping=key_map,
                                       parsed_parameters=pending)
            del weights, data
            _drop_pages(file_map, offset, nbytes)
            if result.name is None or result.name not in key_map:
                continue  # assembled into `pending`, or not a model tensor (transformers skips it too)
            hf_name, tensor = key_map[result.name], _to_fp32(result.weights)
            del result
            emit(hf_name, tensor)
            del tensor
        for name, tensor in pending["tensors"].items():
            emit(name, tensor.to(torch.float32))
        pending["tensors"].clear()

        missing = sorted(expected - written - tied)
        if missing:
            log(f"warning: {os.path.basename(gguf_path)} holds no tensor for {len(missing)} model weights "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); transformers leaves them "
                "freshly initialized when it loads the file, and so will loading this directory")
        sink.finish()
    log(f"converted in {time.time() - t0:.0f} s")
    return out_dir
