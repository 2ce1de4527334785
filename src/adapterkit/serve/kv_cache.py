"""The engine's KV cache: one persistent buffer per layer holding every slot's keys and values.

Layer ``l`` keeps ``K, V`` of shape ``(chunks, slots, kv_heads, CHUNK, head_dim)``: slot ``s`` holds its
sequence's positions ``[0, lengths[s])``, position ``p`` at chunk ``p // CHUNK``, offset ``p % CHUNK``.
Every chunk ``K[c]`` is one contiguous ``(slots, kv_heads, CHUNK, head_dim)`` block, so a decoding step
attends every row at once, chunk by chunk, with the same shapes whatever the rows' lengths
(:func:`adapterkit.serve.attention.decode_all`). The buffers grow by whole chunks when the longest
sequence needs room, and are allocated as the slots' maximum: ``max_batch`` sequences fit at any length.

Positions past a slot's length hold whatever was there (they are masked), but only finite values: a slot
is zeroed when a new sequence takes it, so a former occupant's NaN never meets a zero weight (0 x NaN).
"""

from __future__ import annotations

import torch

CHUNK = 256  # positions per chunk: a row attends over whole chunks, the tail masked


class SlotCache:
    """Keys and values of ``slots`` sequences, per layer (see the module's docstring)."""

    def __init__(self, slots: int, device: torch.device | str = "cpu") -> None:
        self.slots, self.device = slots, torch.device(device)
        self.lengths = [0] * slots  # committed positions per slot
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chunks = 1

    @torch.inference_mode()  # the buffers are made in the engine's forwards: inference tensors
    def reset(self, slot: int) -> None:
        """A new sequence takes ``slot``: no positions, and only zeros where the last one's were."""
        self.lengths[slot] = 0
        for keys, values in self.layers.values():
            keys[:, slot].zero_()
            values[:, slot].zero_()

    @torch.inference_mode()
    def reserve(self, end: int) -> None:
        """Room for positions ``[0, end)`` in every slot (whole chunks, doubling)."""
        needed = -(-end // CHUNK)
        if needed <= self.chunks:
            return
        self.chunks = max(needed, 2 * self.chunks)
        for layer, pair in self.layers.items():
            self.layers[layer] = tuple(self._grown(t) for t in pair)

    def _grown(self, old: torch.Tensor) -> torch.Tensor:
        new = old.new_zeros(self.chunks, *old.shape[1:])
        new[: old.shape[0]] = old
        return new

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s ``K, V``, allocated on first use with ``like``'s (batch, kv_heads, _, head_dim)."""
        if layer not in self.layers:
            shape = (self.chunks, self.slots, like.shape[1], CHUNK, like.shape[3])
            self.layers[layer] = (like.new_zeros(shape), like.new_zeros(shape))
        return self.layers[layer]

    def write(self, layer: int, slot: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """One sequence's ``key``/``value`` (1, kv, T, hd) at positions ``start .. start + T - 1``."""
        keys, values = self.buffers(layer, key)
        end = start + key.shape[2]
        for c in range(start // CHUNK, -(-end // CHUNK)):
            lo, hi = max(start, c * CHUNK), min(end, (c + 1) * CHUNK)
            keys[c, slot, :, lo - c * CHUNK : hi - c * CHUNK] = key[0, :, lo - start : hi - start]
            values[c, slot, :, lo - c * CHUNK : hi - c * CHUNK] = value[0, :, lo - start : hi - start]

    def write_all(self, layer: int, where: tuple[torch.Tensor, ...], key: torch.Tensor, value: torch.Tensor) -> None:
        """One new position per slot (a decoding step): ``where`` = (chunk, slot, offset) index tensors."""
        keys, values = self.buffers(layer, key)
        chunk, slot, offset = where
        keys[chunk, slot, :, offset] = key[:, :, 0]
        values[chunk, slot, :, offset] = value[:, :, 0]

    def read(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values ``(1, kv, end, hd)`` (a view when they lie in one chunk)."""
        keys, values = self.layers[layer]
        used = -(-end // CHUNK)
        if used == 1:
            return keys[0, slot, :, :end][None], values[0, slot, :, :end][None]
        k, v = (torch.cat(list(t[:used, slot]), dim=1)[None, :, :end] for t in (keys, values))
        return k, v

    def used_bytes(self) -> int:
        """Bytes of the committed positions (what the running sequences hold)."""
        if not self.layers:
            return 0
        keys = next(iter(self.layers.values()))[0]
        per_position = 2 * len(self.layers) * keys.shape[2] * keys.shape[4] * keys.element_size()
        return sum(self.lengths) * per_position

    def nbytes(self) -> int:
        """Bytes allocated."""
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)
