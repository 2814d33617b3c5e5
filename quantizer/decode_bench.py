"""End-to-end decode speed: greedy tokens/s at batch 1, and the dequantized reference model that
a quantized model must agree with token for token."""

from __future__ import annotations

import copy
import gc
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from fxkernels.nn import QuantLinear, set_submodule


def dequantized_reference(model: nn.Module) -> nn.Module:
    """A float copy in which every QuantLinear is an nn.Linear holding its dequantized weight:
    what the quantized model computes, without any quantized kernel."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear):
            if m.spec.act_bits:
                raise ValueError(f"dequantized_reference: layer {name!r} quantizes activations; "
                                 "no float model computes the same function")
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.float_weight()
            if m.bias is not None:
                lin.bias.data = m.bias.clone()
            set_submodule(ref, name, lin)
    return ref


@torch.inference_mode()
def greedy_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Tuple[torch.Tensor, float]:
    """``(generated ids [new_tokens], seconds spent after the prompt)``: a plain KV-cache greedy loop
    (the per-token work a serving loop does, without generate()'s bookkeeping)."""
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    secs = time.perf_counter() - t
    return torch.cat(tokens, dim=1)[0], secs


def interleaved_medians(contenders: Dict[str, Callable[[], Tuple[float, ...]]], rounds: int,
                        warm_up: bool = True) -> Dict[str, Tuple[float, ...]]:
    """``name -> medians`` of each contender's figures over ``rounds`` rounds that run the
    contenders in turn (after one untimed call each when ``warm_up``).

    Interleaving puts every contender through the same stretches of a shared machine's load, so
    their ratio holds even when the host's speed drifts between minutes (it did, by up to 1.5x).
    The garbage collector's existing objects are frozen while timing: with several models loaded a
    full collection takes ~1 s and would land in whichever round happened to trigger it."""
    if warm_up:
        for measure in contenders.values():
            measure()
    seen: Dict[str, List[Tuple[float, ...]]] = {name: [] for name in contenders}
    gc.collect()
    gc.freeze()
    try:
        for _ in range(rounds):
            for name, measure in contenders.items():
                seen[name].append(measure())
    finally:
        gc.unfreeze()
    return {n: tuple(sorted(col)[len(col) // 2] for col in zip(*v)) for n, v in seen.items()}


def compare_tokens_per_second(models: Dict[str, nn.Module], ids: torch.Tensor, new_tokens: int = 32,
                              rounds: int = 5) -> Dict[str, float]:
    """Median decode rate of each model (:func:`greedy_decode`) over interleaved rounds."""
    for m in models.values():
        greedy_decode(m, ids, 4)
    measures = {name: (lambda m=m: ((new_tokens - 1) / greedy_decode(m, ids, new_tokens)[1],))
                for name, m in models.items()}
    return {name: r[0] for name, r in interleaved_medians(measures, rounds, warm_up=False).items()}
