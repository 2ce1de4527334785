"""Attention over per-sequence KV caches, so that no sequence ever sees another's padding.

The engine runs a decoder with ``config._attn_implementation`` switched to ``adapterkit_serve`` (an
``AttentionInterface`` function registered here) for the length of one forward. That function gets the
layer's new keys and values for every row of the batch, appends each row's to its own sequence's cache
and attends row by row, calling the model's own attention function (sdpa, eager, or adapterkit's prefix
attention) on one sequence at a time. A row's attention therefore has the shapes it has when the sequence
runs alone: no padding, no mask built from other rows, no reduction whose length depends on the batch.

transformers builds no mask for an implementation without a registered mask function, and the model's
``cache`` argument is a :class:`StepCache` that stores nothing (the attention function does): its
``get_seq_length`` only tells adapters (prompt tuning) whether this forward is a prefill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.composition import Stack
from adapterkit.errors import AdapterError

NAME = "adapterkit_serve"
INNER = ("sdpa", "eager", "adapterkit_sdpa", "adapterkit_eager")  # attention functions we can run per sequence


class KV:
    """One sequence's keys and values, per layer ``(1, kv_heads, capacity, head_dim)``, grown by doubling."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # positions committed (a forward's writes count once it succeeded)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` (1, kv, T, hd) after the committed positions; return all keys and values."""
        end = self.length + key.shape[2]
        keys, values = self._room(layer, key, end)
        keys[:, :, self.length : end] = key
        values[:, :, self.length : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def _room(self, layer: int, key: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        stored = self.layers.get(layer)
        if stored is not None and stored[0].shape[2] >= end:
            return stored
        size = max(self.capacity, 2 * end if stored is not None else end)
        new = tuple(key.new_zeros(1, key.shape[1], size, key.shape[3]) for _ in range(2))
        if stored is not None:  # only committed positions are worth keeping
            for old, fresh in zip(stored, new, strict=True):
                fresh[:, :, : self.length] = old[:, :, : self.length]
        self.layers[layer] = new
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)


@dataclasses.dataclass
class Row:
    """One sequence's row in a forward: its cache and the adapter it runs (None: the base model)."""

    kv: KV
    adapter: str | None


@dataclasses.dataclass
class Step:
    """What the attention function needs during one forward: the rows (None: a dummy row, whose output is
    discarded), the model's own attention implementation, and its adapterkit state (for prefixes)."""

    rows: list[Row | None]
    inner: str
    state: Any = None
    written: int = 0  # positions each row's cache got in this forward


_CURRENT = threading.local()


def current() -> Step | None:
    return getattr(_CURRENT, "step", None)


class StepCache:
    """The model's ``cache`` argument during an engine forward: keys pass through to the attention function."""

    def __init__(self, step: Step) -> None:
        self.step = step

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest committed cache: 0 in a prefill, so prompt tuning inserts its prompt then only."""
        return max((row.kv.length for row in self.step.rows if row is not None), default=0)


def serve_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """Each row's query against its own sequence's cache, through the model's attention function."""
    step = current()
    if step is None:  # another thread called the model during an engine forward: plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    attend = _inner(step.inner, module)
    per_row = step.state is not None and step.inner.startswith("adapterkit_")  # prefixes: one adapter per call
    dummy = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    outs = []
    for i, row in enumerate(step.rows):
        if row is None:
            outs.append(dummy)
            continue
        keys, values = row.kv.write(module.layer_idx, key[i : i + 1], value[i : i + 1])
        # a copy, so that a row's query is laid out alike wherever it sits in the batch
        q = query[i : i + 1].contiguous()
        mask = _causal_mask(step.inner, q, keys)
        if per_row:
            with step.state.override(Stack(row.adapter) if row.adapter else Stack()):
                out, _ = attend(module, q, keys, values, mask, *args, **kwargs)
        else:
            out, _ = attend(module, q, keys, values, mask, *args, **kwargs)
        outs.append(out)
    step.written = key.shape[2]
    return torch.cat(outs), None


def _sdpa(module: nn.Module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
    """transformers' sdpa function for one unpadded sequence without its per-call overhead: ``(1, q, heads, hd)``."""
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2), None


def _inner(name: str, module: nn.Module):
    if name == "sdpa":
        return _sdpa
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping[name]


def _causal_mask(inner: str, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """None where the function masks causally by itself (sdpa's ``is_causal``, the prefix function);
    eager needs an additive mask when several positions are queried."""
    q, k = query.shape[2], keys.shape[2]
    if q == 1 or inner != "eager":
        return None
    future = torch.ones(q, k, dtype=torch.bool, device=query.device).triu(k - q + 1)
    return torch.zeros(q, k, dtype=query.dtype, device=query.device).masked_fill(future, torch.finfo(query.dtype).min)[
        None, None
    ]


def check_model(model: nn.Module, context: int) -> None:
    """Raise unless ``model`` is a decoder whose attention runs through transformers' ``AttentionInterface``
    over its whole context (no sliding window shorter than ``context``)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if name not in INNER or not getattr(model, "can_generate", lambda: False)():
        raise AdapterError(
            f"the serving engine runs causal LMs with sdpa or eager attention; {type(model).__name__} uses "
            f"{name!r}: load it with attn_implementation='sdpa'"
        )
    window = getattr(config, "sliding_window", None)
    if window and window < context and getattr(config, "use_sliding_window", True):
        raise AdapterError(
            f"{type(model).__name__} attends over a sliding window of {window} positions; the engine attends over "
            f"the whole context: set max_context <= {window}"
        )


@contextlib.contextmanager
def engine_forward(model: nn.Module, step: Step) -> Iterator[StepCache]:
    """For one forward: the model's attention switched to :func:`serve_attention`, ``step`` current."""
    _register()
    config = model.config
    step.inner = config._attn_implementation
    step.state = model.__dict__.get(st.STATE)
    _CURRENT.step = step
    config._attn_implementation = NAME
    try:
        yield StepCache(step)
    finally:
        config._attn_implementation = step.inner
        _CURRENT.step = None


def _register() -> None:
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, serve_attention)
