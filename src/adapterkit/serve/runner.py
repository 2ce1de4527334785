"""Runs the model for the engine: one forward over a batch of rows, each row through its own sequence's
KV cache and its own adapter, with a fixed row count so that no row's result depends on the others.

``prefill`` runs one chunk of one request's prompt alone (the chunks lie at fixed positions, so a prompt
is cut alike under any load); ``decode`` runs one token for every slot (``max_batch`` rows; free slots are
dummy rows whose outputs are discarded: a CPU matmul's row result depends on the number of rows,
``benchmarks/serve_prefill_bound.py``). A step that fails is retried one adapter at a time
(:meth:`Runner.isolate`): by batch invariance, the healthy rows get exactly what the joint step gave.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from adapterkit.core import images
from adapterkit.core import state as st
from adapterkit.core.banks import Bank
from adapterkit.core.composition import Stack
from adapterkit.serve.attention import Row, Segment, Step, engine_forward
from adapterkit.serve.kv_cache import SlotCache
from adapterkit.serve.scheduler import Request

Logits = list[torch.Tensor | None]  # per row: the last position's logits, or None (a dummy or failed row)


class Runner:
    """The model's forwards for the engine (in the engine thread only)."""

    def __init__(self, model: nn.Module, max_batch: int) -> None:
        self.model, self.max_batch = model, max_batch
        self.device = next(model.parameters()).device
        self.cache = SlotCache(max_batch, self.device)
        self.bank = Bank(model)  # the loaded adapters' tables, per site: rewritten only when they change

    def changed(self) -> None:
        """The model's adapters may have changed (a call ran on it): the bank follows."""
        self.bank.sync()

    def start(self, slot: int, request: Request) -> None:
        """``request`` takes ``slot``: an empty cache with room for all its positions."""
        self.cache.reset(slot)
        self.cache.reserve(len(request.prompt) + request.sampling.max_tokens + 1)

    def prefill(self, slot: int, request: Request, end: int) -> torch.Tensor:
        """Prompt positions ``[request.prefilled, end)`` alone through the model and its adapter, into
        ``slot``'s cache: the last position's logits."""
        start = request.prefilled
        ids = torch.tensor([request.prompt[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        with _fed([request.image_rows(end)]):
            return self.forward([Row(slot, request.adapter)], ids, positions)[0]

    def prefill_packed(self, chunks: list[tuple[int, Request, int]], rows: int) -> Logits:
        """Several prompts' chunks ``(slot, request, end)`` in one forward of exactly ``rows`` tokens, one
        token a row (the rest dummy rows): per chunk, the logits of its last position."""
        ids, positions, names, segments = [], [], [], []
        for slot, request, end in chunks:
            start = request.prefilled
            segments.append(Segment(slot, start, len(ids), end - start))
            ids += request.prompt[start:end]
            positions += range(start, end)
            names += [Row(slot, request.adapter)] * (end - start)
        pad = rows - len(ids)
        ids, positions, names = ids + [0] * pad, positions + [0] * pad, names + [None] * pad
        step = Step(names, self.cache, segments=segments)
        last = [s.first + s.count - 1 for s in segments]
        keep = last + [0] * (self.max_batch - len(last))  # a fixed row count for the LM head too
        with self.head_rows(keep) as kept, _fed([request.image_rows(end) for _, request, end in chunks]):
            logits = self.run(step, torch.tensor(ids, device=self.device)[:, None], torch.tensor(positions)[:, None])
        return [logits[i] for i in (range(len(last)) if kept else last)]

    @contextlib.contextmanager
    def head_rows(self, keep: list[int]):
        """Inside the block the LM head computes only rows ``keep`` of its input (yields True), unless it
        carries adapters (whose per-row setup covers every row: yields False, all rows computed)."""
        head = self.model.get_output_embeddings()
        if head is None or st.SLOT in head._modules:
            yield False
            return
        index = torch.tensor(keep, device=self.device)
        handle = head.register_forward_pre_hook(lambda module, args: (args[0].index_select(0, index), *args[1:]))
        try:
            yield True
        finally:
            handle.remove()

    def packs_prompts(self) -> bool:
        """Whether prompts may share a forward: not where adapterkit's prefix attention runs (one adapter a
        call) or an adapter must see its prompt whole."""
        return self.model.config._attn_implementation in ("sdpa", "eager")

    def chunks_prompts(self, adapter: str | None) -> bool:
        """Whether prompts through ``adapter`` may be prefilled in chunks (not where a prompt is inserted on
        a prompt's first forward: prompt tuning)."""
        return adapter not in self.bank.whole

    def release(self, slot: int) -> None:
        """``slot``'s sequence ended: its positions are free (zeroed when the next sequence takes it)."""
        self.cache.lengths[slot] = 0

    def decode(self, slots: list[Request | None]) -> tuple[Logits, dict[int, Exception]]:
        """One token for every running sequence in one forward of ``len(slots)`` rows: the logits per row,
        and the rows whose adapter failed (then the others ran again without them, :meth:`isolate`)."""
        rows = [Row(i, r.adapter) if r is not None else None for i, r in enumerate(slots)]
        ids = torch.tensor([[r.stream.tokens[-1] if r else 0] for r in slots], device=self.device)
        positions = torch.tensor([[r.position if r else 0] for r in slots], device=self.device)
        try:
            return list(self.forward(rows, ids, positions)), {}
        except Exception:  # noqa: BLE001 (one adapter's failure: find it, the others go on)
            return self.isolate(rows, ids, positions)

    def isolate(self, rows: list[Row | None], ids: torch.Tensor, positions: torch.Tensor):
        """A failed step again, one adapter's rows at a time: the logits of the rows that ran, and the
        exception of each row whose adapter failed."""
        logits: Logits = [None] * len(rows)
        failed: dict[int, Exception] = {}
        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            if row is not None:
                groups.setdefault(row.adapter, []).append(i)
        for members in groups.values():
            alone = [row if i in members else None for i, row in enumerate(rows)]
            try:
                out = self.forward(alone, ids, positions)
            except Exception as e:  # noqa: BLE001
                failed.update(dict.fromkeys(members, e))
                continue
            for i in members:
                logits[i] = out[i]
        return logits, failed

    def forward(self, rows: list[Row | None], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The last position's logits (rows, vocab) in float32; commits what each row's cache got. A forward
        of one position per slot is a decoding step (every row attends at once)."""
        return self.run(Step(rows, self.cache, decode=ids.shape == (self.max_batch, 1)), ids, positions)

    def run(self, step: Step, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``step``'s forward: the last position's logits per row, in float32."""
        positions = positions.to(self.device)
        setup = self.setup([r.adapter if r else None for r in step.rows])
        with torch.inference_mode(), setup, engine_forward(self.model, step) as cache:
            out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().cpu()  # sampled on the CPU (its generators), one copy a step

    def setup(self, names: list[str | None]):
        """Row ``i`` through adapter ``names[i]`` (one slot index per row into the bank); the base model
        where no row has one."""
        if any(names):
            return self.bank.use(names)
        state = self.model.__dict__.get(st.STATE)
        return state.override(Stack()) if state is not None else contextlib.nullcontext()


def _fed(rows: list[torch.Tensor | None]):
    """The image features of a prefill's image positions, in the order its ids hold them (or nothing)."""
    found = [r for r in rows if r is not None and len(r)]
    return images.feeding(torch.cat(found)) if found else contextlib.nullcontext()
