"""Composition blocks: how several adapters run together.

A block is a small frozen data class; blocks nest and round-trip through JSON (``to_dict`` /
:func:`from_dict`). The model's :class:`~adapterkit.core.state.State` holds one block (a list of names
is a :class:`Stack`) and every slot evaluates it at its host:

* ``Stack(a, b)``: ``b`` runs on ``a``'s output at every site.
* ``Average(a, b, weights=[.7, .3])``: the site's output is ``sum_i w_i out_i``, weights
  normalised to 1 (so for residual adapters ``out + sum_i w_i A_i(out)``).
* ``Fuse(a, b, c)``: AdapterFusion (Pfeiffer et al. 2021), a trained attention over the frozen
  bottleneck adapters' outputs (:mod:`adapterkit.core.fusion`).
* ``Arrow(a, b, c, top_k=3, temperature=1.0)``: Arrow routing among LoRA adapters (Ostapenko et al.
  2024, as peft implements it): per token and site, gradient-free, from each LoRA's weights alone.
* ``Split(a, b, splits=[3, 5])``: the first 3 positions through ``a``, the next 5 through ``b``.
* ``PerRow(["a", None, "b"])``: one adapter (or none, or a block) per row of the batch. Adapters
  of one method at one site run as one batched computation (stacked weights gathered per row).
* ``BatchSplit(a, b, batch_sizes=[2, 3])``: rows 0-1 through ``a``, rows 2-4 through ``b``.
* ``Parallel(a, b)``: the model's inputs are repeated once per branch; branch ``i`` sees rows
  ``i*B .. (i+1)*B - 1`` and the outputs come back concatenated along the batch.

Adapter modules say which blocks they can run in (``AdapterModule.blocks``); :func:`check_support`
turns a combination that makes no sense into an error naming it and the reason.

The blocks are :mod:`.blocks` (whole-batch) and :mod:`.rows` (per-row); the nesting rules, JSON and the
support checks :mod:`.grammar`; the text form :mod:`.text`.
"""

from __future__ import annotations

from adapterkit.core.composition.blocks import Arrow, Average, Block, Fuse, Split, Stack
from adapterkit.core.composition.grammar import ALLOWED, BLOCKS, check_support, contexts, from_dict, parse, walk
from adapterkit.core.composition.rows import CACHES, BatchSplit, Parallel, PerRow, Rows
from adapterkit.core.composition.text import parse_expression

__all__ = [
    "ALLOWED",
    "BLOCKS",
    "CACHES",
    "Arrow",
    "Average",
    "BatchSplit",
    "Block",
    "Fuse",
    "Parallel",
    "PerRow",
    "Rows",
    "Split",
    "Stack",
    "check_support",
    "contexts",
    "from_dict",
    "parse",
    "parse_expression",
    "walk",
]
