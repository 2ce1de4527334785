"""Which requests run: a bounded FIFO of waiting requests and ``max_batch`` slots for running ones.

The engine asks the scheduler once per step; the scheduler knows nothing of the model. It is not
thread-safe by itself: the engine holds its lock around :meth:`Scheduler.add` and :meth:`Scheduler.admit`
(the only calls that touch the waiting queue from other threads' side).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator

import torch

from adapterkit.serve.detokenizer import TextDeltas
from adapterkit.serve.sampler import Sampling
from adapterkit.serve.stream import QueueFull, Stream


@dataclasses.dataclass(eq=False)
class Request:
    """One request in the engine: its prompt, adapter (None: the base model), sampling, and state."""

    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    stream: Stream
    text: TextDeltas
    generator: torch.Generator | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    prefilled: int = 0  # prompt positions in the cache: a long prompt is prefilled in chunks
    images: torch.Tensor | None = None  # (rows, width): the image features of the prompt's image positions
    image_token: int | None = None  # the token id of those positions

    def image_rows(self, end: int) -> torch.Tensor | None:
        """The image features of prompt positions ``[prefilled, end)`` (None: the prompt has no images)."""
        if self.images is None:
            return None
        before = self.prompt[: self.prefilled].count(self.image_token)
        return self.images[before : before + self.prompt[self.prefilled : end].count(self.image_token)]

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def position(self) -> int:
        """The position of the last token (the one the next step feeds)."""
        return len(self.prompt) + len(self.stream.tokens) - 1


class Scheduler:
    """Waiting requests (at most ``max_queue``) and running ones, one per slot (``max_batch`` slots)."""

    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.max_queue = max_queue

    def add(self, request: Request) -> None:
        """Queue ``request``; :class:`QueueFull` at the bound."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound); retry later")
        self.waiting.append(request)

    def admit(self) -> Iterator[tuple[int, Request]]:
        """Waiting requests moved into free slots, oldest first (cancelled ones are yielded with slot -1)."""
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            if request.stream.cancelled:
                yield -1, request
                continue
            slot = self.slots.index(None)
            self.slots[slot] = request
            yield slot, request

    def running(self) -> list[tuple[int, Request]]:
        """The running requests with their slots."""
        return [(i, r) for i, r in enumerate(self.slots) if r is not None]

    def cancelled(self) -> list[tuple[int, Request]]:
        """Running requests whose client went away."""
        return [(i, r) for i, r in self.running() if r.stream.cancelled]

    def free(self, slot: int) -> None:
        """Slot ``slot`` is free again (its request ended)."""
        self.slots[slot] = None

    def requests(self) -> list[Request]:
        """Every request the engine holds, waiting or running."""
        return [*self.waiting, *(r for r in self.slots if r is not None)]

    def busy(self) -> bool:
        return any(r is not None for r in self.slots)

    def prefilling(self) -> list[tuple[int, Request]]:
        """Running requests whose prompt is not all in the cache yet, oldest first."""
        return sorted(((i, r) for i, r in self.running() if r.prefilling), key=lambda pair: pair[1].submitted)

    def decoding(self) -> list[Request | None]:
        """Per slot: its request if it decodes (its prompt all in the cache), else None."""
        return [r if r is not None and not r.prefilling else None for r in self.slots]
