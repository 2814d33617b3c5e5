"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``temperature=0`` is greedy (argmax; top_k/top_p unused). Otherwise logits are divided by
    ``temperature``, cut to the ``top_k`` largest (0 = all) and to the smallest set whose
    probability reaches ``top_p`` (1.0 = all), and a token is drawn with a generator seeded by
    ``seed`` (None: torch's global generator)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"Sampling: temperature={self.temperature!r}; expected a number >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"Sampling: top_k={self.top_k!r}; expected an integer >= 0 (0 = no cut)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"Sampling: top_p={self.top_p!r}; expected a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """fp32 logits ``[B, V]`` after temperature, top-k and top-p (cut entries are -inf)."""
    x = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= sampling.top_p  # keeps the token that crosses p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def next_tokens(logits: Tensor, argmax: Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> Tensor:
    """``[B]`` token ids chosen from ``logits [B, V]`` (``argmax [B]``: their greedy choice)."""
    if sampling.greedy:
        return argmax
    probs = torch.softmax(filtered_logits(logits, sampling), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
