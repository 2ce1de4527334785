"""Tokenizing requests off the engine and off any shared lock: a small pool of tokenizer copies.

A fast tokenizer's truncation and padding settings live in its Rust backend and are changed by a call
that asks for them, so two threads must not share one. Each request borrows a copy for its call alone:
a 4 MB prompt ties up one copy, never the others (a single shared lock made every request wait ~1 s
behind such a prompt). Before any copy is borrowed, a prompt that has more characters than its token
limit could ever hold is refused by its length alone (:meth:`Tokenizers.surely_over`).
"""

from __future__ import annotations

import contextlib
import copy
import queue
from collections.abc import Iterator
from typing import Any

COPIES = 4  # requests tokenized at once; more wait for a copy (each is a few MB)
SLACK = 4  # normalisation can merge a few code points into one (combining accents): room for it


class Tokenizers:
    """``copies`` deep copies of ``tokenizer``, lent one thread at a time."""

    def __init__(self, tokenizer: Any, copies: int = COPIES) -> None:
        self.tokenizer = tokenizer  # the original: read-only uses (chat_template, eos_token, decode in the engine)
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(copies):
            self.free.put(copy.deepcopy(tokenizer))
        self.longest = max(map(len, tokenizer.get_vocab()), default=1)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        """A copy for this block only (waits while every copy is lent)."""
        tokenizer = self.free.get()
        try:
            yield tokenizer
        finally:
            self.free.put(tokenizer)

    def surely_over(self, chars: int, limit: int) -> bool:
        """Whether a text of ``chars`` characters must give more than ``limit`` tokens: no token's text is
        longer than the vocabulary's longest entry (byte-level and sentencepiece entries spell out their
        text, or more), so such a text is refused without tokenizing it."""
        return chars > SLACK * limit * self.longest
