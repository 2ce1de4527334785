"""The encoder routes: ``POST /v1/embeddings`` (OpenAI's) and ``/v1/classify`` (adapterkit's), each text
through the adapter it names and that adapter's own task head."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adapterkit.core.backbone import head_parameters
from adapterkit.serve.plumbing import ENCODER, ApiError, Authorized, State, adapter_source, needs, read_body
from adapterkit.serve.registry import Direct, Loaded
from adapterkit.serve.schemas import Classify, Embeddings


# -- encoders -------------------------------------------------------------------------------------
async def embeddings(request: Request, s: State = Authorized) -> Any:
    body = await read_body(request, Embeddings, s.limits.max_body_bytes)
    needs(s, ENCODER, "/v1/embeddings")
    vectors, tokens = await _encode(s, body.model, body.texts(), _pooled)
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def classify(request: Request, s: State = Authorized) -> Any:
    body = await read_body(request, Classify, s.limits.max_body_bytes)
    needs(s, ENCODER, "/v1/classify")
    if not head_parameters(s.engine.model):
        raise ApiError(400, f"{s.name} has no classification head: use /v1/embeddings")
    rows, tokens = await _encode(s, body.model, body.texts(), _probabilities)
    labels = s.engine.model.config.id2label
    data = [_labelled(i, row, labels) for i, row in enumerate(rows)]
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _labelled(index: int, row: list[float], labels: dict[int, str]) -> dict[str, Any]:
    best = max(range(len(row)), key=row.__getitem__)
    scores = {str(labels.get(i, i)): round(p, 6) for i, p in enumerate(row)}
    return {"index": index, "label": str(labels.get(best, best)), "score": round(row[best], 6), "scores": scores}


async def _encode(s: State, model: str, texts: list[str], read) -> tuple[list[list[float]], int]:
    """``read(model, batch)`` on the tokenized texts in the model's own thread, with the adapter and its head."""
    source = adapter_source(s, model)

    def tokenize():
        with s.tokenizers.borrow() as tokenizer:
            limit = s.limits.max_prompt_tokens
            return tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")

    batch = await run_in_threadpool(tokenize)
    tokens = int(batch["attention_mask"].sum())
    s.metrics.prompt_tokens.inc(tokens)
    if source is None:
        return await _run(s, None, read, batch), tokens
    async with s.registry.use(source) as entry:
        return await _run(s, entry, read, batch), tokens


async def _run(s: State, entry: Loaded | None, read, batch) -> list[list[float]]:
    head = entry.head if entry else s.registry.base_head

    def forward(model) -> list[list[float]]:
        if head:  # the adapter's own task head (each adapter may have trained one)
            for key, param in head_parameters(model).items():
                param.data.copy_(head[key])
        return read(model, batch)

    runner: Direct = s.engine
    future = runner.run(entry.inner if entry else None, forward)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), s.limits.request_timeout)
    except TimeoutError:
        raise ApiError(504, "the request ran past the server's time limit", "timeout", code="timeout") from None


def _pooled(model, batch) -> list[list[float]]:
    """Mean of the last hidden states over the real tokens (no padding)."""
    import torch

    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


def _probabilities(model, batch) -> list[list[float]]:
    import torch

    with torch.no_grad():
        return model(**batch).logits.float().softmax(-1).tolist()


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    import struct

    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
