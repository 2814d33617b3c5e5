"""``quantize(model, calibration, config)``: the one entry point of every method."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .config import QuantizeConfig
from .reconstruct import QuantizationError, _log_default, reconstruct

__all__ = ["quantize", "prepare_calibration", "QuantizeConfig", "QuantizationError"]


def prepare_calibration(calibration: Union[torch.Tensor, Sequence[torch.Tensor]], nsamples: int,
                        seqlen: int) -> torch.LongTensor:
    """``[nsamples, seqlen]`` token ids from a ``[n, L]`` tensor (first ``nsamples`` rows, first
    ``seqlen`` tokens of each) or a list of 1-D/``[1, L]`` tensors (concatenated, then cut into
    consecutive windows)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError(f"calibration: tensor of shape {tuple(calibration.shape)}; expected token ids "
                             "[nsamples, seqlen] (or a list of 1-D tensors)")
        ids = calibration
        if ids.shape[0] < nsamples or ids.shape[1] < seqlen:
            raise ValueError(f"calibration: shape {tuple(ids.shape)} is too short; nsamples={nsamples} x "
                             f"seqlen={seqlen} needs at least [{nsamples}, {seqlen}]")
        ids = ids[:nsamples, :seqlen]
    elif isinstance(calibration, (list, tuple)):
        if not calibration or not all(isinstance(t, torch.Tensor) for t in calibration):
            raise ValueError("calibration: expected a non-empty list of token-id tensors")
        flat = torch.cat([t.reshape(-1) for t in calibration])
        if flat.numel() < nsamples * seqlen:
            raise ValueError(f"calibration: {flat.numel()} tokens is too short; nsamples={nsamples} x "
                             f"seqlen={seqlen} needs at least {nsamples * seqlen}")
        ids = flat[:nsamples * seqlen].reshape(nsamples, seqlen)
    else:
        raise ValueError(f"calibration: got {type(calibration).__name__}; expected a LongTensor [nsamples, seqlen] "
                         "of token ids or a list of tensors")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"calibration: dtype {ids.dtype}; expected integer token ids")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"calibration: contains negative token id {int(ids.min())}; expected ids >= 0")
    return ids.long().contiguous()


def resolve_config(config: Optional[QuantizeConfig], overrides: dict) -> QuantizeConfig:
    """``config`` with ``overrides`` (field=value keywords) applied, validated."""
    if config is None:
        return QuantizeConfig(**overrides)
    if not isinstance(config, QuantizeConfig):
        raise ValueError(f"config: got {type(config).__name__}; expected quantizer.QuantizeConfig")
    if overrides:
        import dataclasses

        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(QuantizeConfig)})
        if unknown:
            raise ValueError(f"quantize: unknown keyword arguments {unknown}; expected QuantizeConfig fields")
        config = dataclasses.replace(config, **overrides)
    return config


def quantize(model: nn.Module, calibration: Union[torch.Tensor, Sequence[torch.Tensor]],
             config: Optional[QuantizeConfig] = None, log: Optional[Callable[[str], None]] = None,
             **overrides) -> nn.Module:
    """Quantize ``model`` in place by ``config`` (fields may also be given as keywords, e.g.
    ``device="cuda"``) and return it.

    The model stays on the CPU; ``config.device`` is where each block learns (a block moves there
    and comes back exported). For a model whose fp32 weights do not fit in memory, see
    :func:`quantizer.quantize_pretrained`.

    Every ``nn.Linear`` inside the model's blocks (except ``config.skip``) becomes a
    :class:`fxkernels.QuantLinear`, ready for :func:`fxkernels.save_quantized`. Linears outside
    the blocks stay float with a warning listing them. Raises ``ValueError`` for bad calibration,
    an unsupported architecture, a device that does not exist or a mismatching ``resume_dir``,
    :class:`~quantizer.engine.MemoryBudgetError` when a block needs more than ``memory_budget``, and
    :class:`QuantizationError` when learning diverges (finished blocks stay quantized).
    """
    config = resolve_config(config, overrides)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: got {type(model).__name__}; expected a torch.nn.Module")
    ids = prepare_calibration(calibration, config.nsamples, config.seqlen)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"calibration: token id {int(ids.max())} >= the model's vocab_size={vocab}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"model: its weights are on {device}; expected the model on the CPU (move it with .cpu() "
                         f"and pass device={str(device)!r}: each block then learns there)")
    return reconstruct(model, ids, config, log=log or _log_default)
