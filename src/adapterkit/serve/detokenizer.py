"""Completion text from token ids: incremental decoding, stop strings held back while they may form."""

from __future__ import annotations

from adapterkit.core.generation import shown_upto


class TextDeltas:
    """A completion's text as its tokens come: decoded incrementally (never splitting a multi-byte
    character), cut before the first stop string, and held back while a stop string may be forming."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.start = self.read = 0  # decode window: ids[start:read] were decoded, ids[read:] are new
        self.decoded = ""  # everything decoded so far (emitted + held)
        self.held = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Text to emit now, and whether a stop string ended the completion."""
        self.ids.append(token)
        before = self._decode(self.ids[self.start : self.read])
        after = self._decode(self.ids[self.start :])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # an incomplete character: wait
            return "", False
        self.start, self.read = self.read, len(self.ids)
        return self._push(after[len(before) :])

    def finish(self) -> tuple[str, bool]:
        """The rest of the text at the end (what incremental decoding held back), checked for stops."""
        full = self._decode(self.ids)
        emit, stopped = self._push(full[len(self.decoded) :] if full.startswith(self.decoded) else "")
        if stopped:
            return emit, True
        emit, self.held = emit + self.held, ""
        return emit, False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _push(self, delta: str) -> tuple[str, bool]:
        self.decoded += delta
        self.held += delta
        upto, stopped = shown_upto(self.held, self.stops)
        emit, self.held = self.held[:upto], "" if stopped else self.held[upto:]
        return emit, stopped
