"""Causal LMs for ONNX Runtime with past key values: the prompt in one run, then one token per run.

The graph takes ``input_ids`` and ``position_ids`` ``(batch, sequence)``, ``attention_mask`` ``(batch,
past_sequence + sequence)`` and per layer ``past_key_values.{i}.key`` / ``.value`` ``(batch, kv_heads,
past_sequence, head_dim)`` (empty, ``past_sequence`` 0, for the prompt); it gives ``logits`` ``(batch, sequence,
vocab)`` and ``present.{i}.key`` / ``.value``, the next run's past. :func:`generate` is that loop, greedy.

Adapters in the KV cache: prefix tuning never enters it (adapterkit prepends the prefix in attention at every
step, which the graph records). Prompt tuning does: its P vectors sit in front of the sequence, so their keys
and values are the first P cache entries, and a causal model computes them from the prompt alone. They are
therefore constants, computed once in PyTorch at export (one prefill) and stored in the graph, which puts them
in front of the past it is given and leaves them out of the presents it returns: the caller's loop is the
same for every method, and its mask and positions count only its own tokens, as with ``generate()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.export import onnx_graph as ox
from adapterkit.export import output

TASK = "causal-lm"


def export_causal_lm(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    quantize: str | None = None,
    opset: int = ox.OPSET,
    dynamo: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a causal LM, with its active adapters, as an ONNX graph with past key values in folder ``out``.

    The inputs and outputs are the module docstring's; ``export.json`` lists them with the layer count, the KV
    heads and head size (to build the empty past) and the EOS token. ``tokenizer`` (may be None) is saved.
    """
    ox.check_quantize(quantize)
    ox.check_model(model, TASK)
    graph = CausalLMGraph(model, front_cache(model))
    inputs, outputs = graph.names()
    shapes = graph.shapes()

    def fill(tmp: Path) -> dict[str, Any]:
        ox.write_graph(graph, graph.example(), inputs, outputs, shapes, tmp, opset, dynamo, quantize)
        ox.save_tokenizer(tokenizer, tmp)
        described = ox.describe(shapes, inputs, {n: "int64" for n in inputs[:3]})
        header = ox.header(model, TASK, quantize, opset, dynamo, info)
        return header | described | graph.cache_info() | {"eos_token_id": eos_ids(model)}

    return output.write_export(out, fill)


@torch.no_grad()
def front_cache(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the active adapters put in the cache before the first token (prompt tuning's P positions; nothing
    for other methods): a one-token prefill's cache without that token's entry, per layer."""
    training = model.training
    model.eval()
    try:
        cache = model(input_ids=torch.tensor([[first_token(model)]]), use_cache=True).cache
    finally:
        model.train(training)
    extra = cache.get_seq_length() - 1
    return [(layer.keys[:, :, :extra].clone(), layer.values[:, :, :extra].clone()) for layer in cache.layers]


def first_token(model: nn.Module) -> int:
    bos = model.config.bos_token_id
    return bos if isinstance(bos, int) else 0


def eos_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence tokens (generation config first)."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    eos = model.config.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class CausalLMGraph(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *presents)``: the traced function.

    ``front``: per layer the constant cache entries (prompt tuning's) put before the caller's past and
    taken out of the presents; their length is what the graph's positions and mask add for them."""

    def __init__(self, model: nn.Module, front: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        _, self.kv_heads, self.front_length, self.head_dim = front[0][0].shape
        self.layers = len(front)
        for i, (k, v) in enumerate(front):
            self.register_buffer(f"front_key_{i}", k, persistent=False)
            self.register_buffer(f"front_value_{i}", v, persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past: torch.Tensor):
        from transformers import DynamicCache

        pairs = [self.with_front(i, past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,  # transformers 5.24 name; past_key_values is its deprecated alias
            use_cache=True,
        )
        layers = out.cache.layers
        presents = [t[:, :, self.front_length :] for layer in layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)

    def with_front(self, i: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.front_length:
            return key, value
        batch = key.shape[0]
        front_key, front_value = getattr(self, f"front_key_{i}"), getattr(self, f"front_value_{i}")
        return (
            torch.cat([front_key.expand(batch, -1, -1, -1), key], dim=2),
            torch.cat([front_value.expand(batch, -1, -1, -1), value], dim=2),
        )

    def names(self) -> tuple[list[str], list[str]]:
        pairs = [(i, kv) for i in range(self.layers) for kv in ("key", "value")]
        past = [f"past_key_values.{i}.{kv}" for i, kv in pairs]
        presents = [f"present.{i}.{kv}" for i, kv in pairs]
        return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *presents]

    def shapes(self) -> dict[str, list[int | str]]:
        """Every input's and output's shape; names are the dynamic axes."""
        inputs, outputs = self.names()
        tokens = ["batch", "sequence"]
        shapes = {"input_ids": tokens, "attention_mask": ["batch", "total_sequence"], "position_ids": tokens}
        shapes |= {n: ["batch", self.kv_heads, "past_sequence", self.head_dim] for n in inputs[3:]}
        shapes["logits"] = ["batch", "sequence", self.model.config.vocab_size]
        return shapes | {n: ["batch", self.kv_heads, "total_sequence", self.head_dim] for n in outputs[1:]}

    def example(self, batch: int = 2, new: int = 3, past: int = 4) -> tuple:
        """Trace inputs: a non-empty past (the decode path, which also serves the prompt with an empty past)
        and a left-padded first row (the graph builds the mask from ``attention_mask``, never skips it)."""
        ids = torch.arange(batch * new).view(batch, new) % (self.model.config.vocab_size - 3) + 3
        mask = torch.ones(batch, past + new, dtype=torch.long)
        mask[0, :2] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        g = torch.Generator().manual_seed(0)
        shape = (batch, self.kv_heads, past, self.head_dim)
        cache = [torch.randn(shape, generator=g) for _ in range(2 * self.layers)]
        return (ids, mask, positions, *cache)

    def cache_info(self) -> dict[str, Any]:
        return {
            "num_layers": self.layers,
            "num_kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "front_cache_length": self.front_length,
        }


def generate(
    folder: str | Path,
    input_ids: Sequence[Sequence[int]] | np.ndarray,
    max_new_tokens: int,
    *,
    attention_mask: np.ndarray | None = None,
    stop_at_eos: bool = True,
    pad_token_id: int | None = None,
    session: Any = None,
    threads: int | None = None,
) -> np.ndarray:
    """Greedy decoding by onnxruntime on an exported causal LM: ``(batch, max_new_tokens)`` new tokens.

    The prompt (left-padded rows: pass ``attention_mask``) runs once with an empty past, then one token per run,
    each run's presents fed back as the next past. With ``stop_at_eos`` a row that produced an EOS token gets
    ``pad_token_id`` (default: the first EOS) after it, as ``generate()`` does, and the loop ends when all have.
    """
    meta = ox.manifest(folder)
    sess = session or ox.session(folder, threads)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    past_names = [i["name"] for i in meta["inputs"][3:]]
    empty = np.zeros((ids.shape[0], meta["num_kv_heads"], 0, meta["head_dim"]), np.float32)
    past = {name: empty for name in past_names}
    eos = meta["eos_token_id"] if stop_at_eos else []
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    done = np.zeros(ids.shape[0], dtype=bool)
    tokens = []
    for _ in range(max_new_tokens):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        logits, *presents = sess.run(None, feed)
        nxt = np.where(done, pad, logits[:, -1].argmax(-1))
        tokens.append(nxt)
        done |= np.isin(nxt, eos)
        if done.all():
            break
        past = dict(zip(past_names, presents, strict=True))
        ids, positions = nxt[:, None], positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return np.stack(tokens, axis=1)
