"""Choosing a request's next token from its logits: greedy, or sampled with temperature and nucleus top-p."""

from __future__ import annotations

import dataclasses
import math

import torch

from adapterkit.errors import AdapterError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen: greedy (``temperature`` 0) or sampled with nucleus ``top_p``,
    reproducibly for a given ``seed``; the completion ends before the first of the ``stop`` strings."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise AdapterError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        finite = math.isfinite(self.temperature) and math.isfinite(self.top_p)
        if not finite or not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise AdapterError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not all(isinstance(s, str) and s for s in stop):
            raise AdapterError(f"stop strings must be non-empty strings, got {list(stop)!r}")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> tuple[int, float]:
    """The next token for one row's finite ``logits`` (vocab,) and its log-probability (before temperature)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    # In float64 with the maximum subtracted first, any temperature a client may send (1e-40 included)
    # divides into finite numbers, and the likeliest token always stays in the nucleus, however small top_p is
    # (in float32 both underflowed: probabilities of nan, or an empty nucleus).
    scaled = (logits.double() - logits.max()) / sampling.temperature
    sorted_probs, order = torch.softmax(scaled, dim=-1).sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
    keep[0] = True
    token = int(order[torch.multinomial(sorted_probs * keep, 1, generator=generator)])
    return token, float(logprobs[token])


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Per row of ``logits`` (rows, vocab): whether every value is finite (a NaN or inf weight gives neither)."""
    return torch.isfinite(logits).all(dim=-1).tolist()
