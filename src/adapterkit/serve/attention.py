"""Attention over the engine's KV cache (:mod:`.kv_cache`), so that no sequence ever sees another's
padding and no row's result depends on the others.

The engine runs a decoder with ``config._attn_implementation`` switched to ``adapterkit_serve`` (an
``AttentionInterface`` function registered here) for the length of one forward. That function gets the
layer's new keys and values for every row of the batch and writes them into each row's slot. Then:

* **a decoding step** (one new position per row, the plain sdpa or eager model): all rows at once,
  :func:`decode_all`: per chunk of the cache a batched ``q K^T``, the positions past a row's end masked,
  and the chunks combined by an online softmax in a fixed order. A row's arithmetic has the same shapes
  whatever the batch holds (the step always has ``max_batch`` rows); a chunk past a row's end adds exact
  zeros (its max is -inf: weight 0, sum 0, output 0), so more chunks for a longer neighbour change no bit;
* **a prefill**, or a model with attention prefixes (adapterkit's own attention function, one adapter per
  call): row by row, each row's query against its own keys through the model's attention function, with
  the shapes it has when the sequence runs alone.

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
from adapterkit.serve.kv_cache import CHUNK, SlotCache

NAME = "adapterkit_serve"
INNER = ("sdpa", "eager", "adapterkit_sdpa", "adapterkit_eager")  # attention functions we can run per sequence


@dataclasses.dataclass
class Row:
    """One sequence's row in a forward: its slot in the cache and the adapter it runs (None: the base model)."""

    slot: int
    adapter: str | None


@dataclasses.dataclass(frozen=True)
class Segment:
    """A chunk of one prompt in a packed prefill: ``count`` positions from ``start`` of ``slot``'s sequence,
    at rows ``first .. first + count - 1`` of the forward (one token a row)."""

    slot: int
    start: int
    first: int
    count: int


@dataclasses.dataclass
class Step:
    """What the attention function needs during one forward: the rows (None: a dummy row, whose output is
    discarded), the cache, the model's own attention implementation, and its adapterkit state (prefixes).

    A decoding step (``decode``) has one row per slot, row ``i`` in slot ``i``; its write positions and masks
    are built once here, not in every layer."""

    rows: list[Row | None]
    cache: SlotCache
    decode: bool = False
    inner: str = ""
    state: Any = None
    written: int = 0  # positions each row's cache got in this forward
    where: tuple[torch.Tensor, ...] = ()  # decode: the (chunk, slot, offset) of each row's new position
    past: list[torch.Tensor] = dataclasses.field(default_factory=list)  # decode: per chunk, positions past a row's end
    live: list[torch.Tensor | None] = dataclasses.field(default_factory=list)  # decode: per chunk, rows reaching it
    segments: list[Segment] | None = None  # a packed prefill: the prompts' chunks, one token a row

    def __post_init__(self) -> None:
        if self.decode:
            self._plan()

    def _plan(self) -> None:
        """Each row writes at its length (a dummy row at its slot's, uncommitted, position)."""
        lengths = torch.tensor(self.cache.lengths)
        self.cache.reserve(int(lengths.max()) + 1)
        slots = torch.arange(len(lengths))
        device = self.cache.device
        self.where = tuple(t.to(device) for t in (lengths // CHUNK, slots, lengths % CHUNK))
        positions = torch.arange(-(-(int(lengths.max()) + 1) // CHUNK) * CHUNK)
        past = (positions[None] > lengths[:, None])[:, None, None]  # (rows, 1, 1, positions)
        self.past = [t.to(device) for t in past.split(CHUNK, dim=-1)]
        # a chunk wholly past a row's end adds exact zeros to it: only the rows reaching the chunk attend it
        # (None: all), so a step costs what its rows' lengths need, not the longest row's for every row
        reach = [(lengths >= c * CHUNK).nonzero().squeeze(1) for c in range(len(self.past))]
        self.live = [None if len(rows) == len(lengths) else rows.to(device) for rows in reach]

    def start(self, row: Row) -> int:
        return self.cache.lengths[row.slot]

    def commit(self) -> None:
        """Each sequence's cache keeps the positions this forward gave it."""
        if self.segments is not None:
            for segment in self.segments:
                self.cache.lengths[segment.slot] += segment.count
            return
        for row in self.rows:
            if row is not None:
                self.cache.lengths[row.slot] += self.written


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
        return max((self.step.start(row) for row in self.step.rows if row is not None), default=0)


def serve_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """Each row's query against its own sequence's cache: all rows at once in a decoding step of a plain
    model, else row by row through the model's attention function."""
    step = current()
    if step is None:  # another thread called the model during an engine forward: plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    step.written = key.shape[2]
    if step.segments is not None:
        return _packed(step, module, query, key, value, *args, **kwargs), None
    if step.decode and not step.inner.startswith("adapterkit_"):
        step.cache.write_all(module.layer_idx, step.where, key, value)
        keys, values = step.cache.layers[module.layer_idx]
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return decode_all(query, keys, values, step.past, scaling, step.live), None
    return _row_by_row(step, module, query, key, value, *args, **kwargs), None


def _row_by_row(step: Step, module: nn.Module, query, key, value, *args, **kwargs) -> torch.Tensor:
    attend = _inner(step.inner, module)
    per_row = step.state is not None and step.inner.startswith("adapterkit_")  # prefixes: one adapter per call
    dummy = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    outs = []
    for i, row in enumerate(step.rows):
        if row is None:
            outs.append(dummy)
            continue
        start = step.start(row)
        step.cache.write(module.layer_idx, row.slot, start, key[i : i + 1], value[i : i + 1])
        keys, values = step.cache.read(module.layer_idx, row.slot, start + key.shape[2])
        # a copy, so that a row's query is laid out alike wherever it sits in the batch
        q = query[i : i + 1].contiguous()
        mask = _causal_mask(step.inner, q, keys)
        if per_row:
            with step.state.override(Stack(row.adapter) if row.adapter else Stack()):
                out, _ = attend(module, q, keys, values, mask, *args, **kwargs)
        else:
            out, _ = attend(module, q, keys, values, mask, *args, **kwargs)
        outs.append(out)
    return torch.cat(outs)


def _packed(step: Step, module: nn.Module, query, key, value, *args, **kwargs) -> torch.Tensor:
    """A packed prefill (one token a row): each segment's rows as one sequence, ``(1, heads, count, hd)``,
    against its slot's cache through the model's attention function, as that chunk runs alone."""
    attend = _inner(step.inner, module)
    out = query.new_zeros(query.shape[0], 1, query.shape[1], query.shape[3])  # dummy rows: zeros
    for seg in step.segments:
        rows = slice(seg.first, seg.first + seg.count)
        q, k, v = (t[rows, :, 0].transpose(0, 1)[None].contiguous() for t in (query, key, value))
        step.cache.write(module.layer_idx, seg.slot, seg.start, k, v)
        keys, values = step.cache.read(module.layer_idx, seg.slot, seg.start + seg.count)
        part, _ = attend(module, q, keys, values, _causal_mask(step.inner, q, keys), *args, **kwargs)
        out[rows, 0] = part[0]
    return out


def decode_all(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    past: list[torch.Tensor],
    scaling: float,
    live: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Every row's one query against its slot's cache: ``query`` (rows, heads, 1, hd), ``keys``/``values``
    (chunks, rows, kv_heads, CHUNK, hd), ``past[c]`` (rows, 1, 1, CHUNK) true past a row's end, ``live[c]``
    the rows that reach chunk ``c`` (None: all); returns (rows, 1, heads, hd) as transformers' attention
    functions do.

    Grouped-query heads share their kv head by a reshape (no copy of the cache); chunk ``c``'s scores,
    maximum ``m_c``, weights ``exp(s - m_c)``, their sum and weighted values are combined in chunk order.
    A chunk wholly past a row's end would have ``m_c = -inf`` and weight ``exp(m_c - m) = 0``, leaving the
    row's sums as they were to the bit: such rows are left out of it."""
    rows, heads, _, hd = query.shape
    q = query.reshape(rows, keys.shape[2], heads // keys.shape[2], hd)  # (rows, kv, group, hd)
    out, total, top = _chunk(q, keys[0], values[0], past[0], scaling)  # chunk 0 holds every row's position 0
    for c in range(1, len(past)):
        rows_c = None if live is None else live[c]
        if rows_c is None:
            out, total, top = _combine((out, total, top), _chunk(q, keys[c], values[c], past[c], scaling))
            continue
        if not len(rows_c):
            break  # no row reaches this chunk, nor any later one
        pick = (t.index_select(0, rows_c) for t in (q, keys[c], values[c], past[c]))
        mine = _combine(tuple(t.index_select(0, rows_c) for t in (out, total, top)), _chunk(*pick, scaling))
        out, total, top = (t.index_copy(0, rows_c, m) for t, m in zip((out, total, top), mine, strict=True))
    return (out / total).reshape(rows, heads, hd)[:, None]


def _chunk(q, keys, values, beyond, scaling):
    """One chunk's weighted values, weight sums and score maxima per row (-inf where all are masked)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scaling).masked_fill_(beyond, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)  # (rows, kv, group, 1)
    safe = peak.masked_fill(peak == float("-inf"), 0.0)
    weights = torch.exp(scores - safe)
    return torch.matmul(weights, values), weights.sum(dim=-1, keepdim=True), peak


def _combine(state, chunk):
    """The online softmax: the sums so far and a new chunk's, rescaled to their common maximum."""
    (out, total, top), (part, mass, peak) = state, chunk
    new_top = torch.maximum(top, peak)
    old_scale = torch.exp(top - new_top)
    safe = peak.masked_fill(peak == float("-inf"), 0.0)
    scale = torch.exp(safe - new_top).masked_fill_(peak == float("-inf"), 0.0)
    return out * old_scale + part * scale, total * old_scale + mass * scale, new_top


def _sdpa(module: nn.Module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
    """transformers' sdpa function for one unpadded sequence without its per-call overhead: ``(1, q, heads, hd)``.
    Causal by ``is_causal`` for a whole prompt, by ``attention_mask`` (:func:`_causal_mask`) for a chunk."""
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        is_causal=causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
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
    """None where sdpa masks causally by itself (``is_causal`` over a whole prompt) or one position is
    queried; else the mask of a prompt's chunk after its past (the last query sees every key): boolean for
    sdpa, additive for eager (both also for adapterkit's prefix functions over them)."""
    q, k = query.shape[2], keys.shape[2]
    sdpa = inner.endswith("sdpa")
    if q == 1 or (sdpa and q == k):
        return None
    future = torch.ones(q, k, dtype=torch.bool, device=query.device).triu(k - q + 1)
    if sdpa:
        return ~future[None, None]
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
    """For one forward: the model's attention switched to :func:`serve_attention`, ``step`` current; on
    success, each row's cache commits the positions it got."""
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
    step.commit()


def _register() -> None:
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, serve_attention)
