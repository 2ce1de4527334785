"""Causal language modelling and chat: texts or conversations, their answers alone trained."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from adapterkit.training.tables import DataError, Table
from adapterkit.training.tasks.base import IGNORE, Example, Task, pack_batch


class CausalLM(Task):
    """Language modelling on a text column; the loss is over the text's tokens (padding ignored).

    Logits are computed only at the positions that predict a labelled token (``logits_to_keep``):
    the output layer over a 49k-word vocabulary is a fifth of a 135M model's compute, and a chat
    example's prompt carries no loss. Examples are batched by length, so padding stays small.
    """

    name, auto_class = "causal-lm", "AutoModelForCausalLM"
    metrics = ("perplexity", "loss")
    lower_is_better = frozenset({"perplexity", "loss"})
    group_by_length = True
    packs = True

    def pack(self, examples):
        return pack_batch(examples)

    def encode(self, table: Table, tokenizer) -> list[Example]:
        texts = [str(t) for t in table.column(self.text_column, "--text-column")]
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [{"input_ids": i, "labels": list(i)} for i in ids]

    def loss_terms(self, examples):
        """One per labelled token (the first token predicts nothing)."""
        return max(1, sum(sum(y != IGNORE for y in e["labels"][1:]) for e in examples))

    def loss(self, model, batch):
        """The mean cross-entropy over labelled tokens, as ``model(**batch).loss``."""
        nll, counted = token_nll(model, batch)
        return nll.sum() / counted.sum().clamp(min=1)

    def predict(self, model, batch):
        nll, counted = token_nll(model, batch)
        return list(zip(nll.sum(-1).tolist(), counted.sum(-1).tolist(), strict=True))

    def gold(self, examples):
        return [None] * len(examples)

    def score(self, predicted, gold):
        loss = sum(n for n, _ in predicted) / max(1, sum(c for _, c in predicted))
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}


class Chat(CausalLM):
    """Conversations through the model's chat template; the loss is on the assistant's turns only.

    The column (``--text-column``; ``messages`` when left at ``text``) holds a list of
    ``{"role", "content"}`` messages per row (a JSON string in CSV). Each assistant turn's tokens are
    what the template adds after the prompt up to that turn (with the generation prompt): the
    system and user turns, the assistant header and the padding are masked out of the loss.
    """

    name = "chat"

    def __init__(self, text_column: str, label_column: str, max_length: int, labels: list[str] | None = None):
        super().__init__("messages" if text_column == "text" else text_column, label_column, max_length, labels)

    def encode(self, table: Table, tokenizer) -> list[Example]:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--task chat needs a tokenizer with a chat template (an instruct model's)")
        column = table.column(self.text_column, "--text-column")
        return [
            self._example(table, i, tokenizer, conversation(table, i, self.text_column, v))
            for i, v in enumerate(column)
        ]

    def _example(self, table: Table, row: int, tokenizer, messages: list[dict[str, str]]) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _render(tokenizer, messages[:k], prompt=True)
            full = _render(tokenizer, messages[: k + 1], prompt=False)
            if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
                raise table.fail(
                    row, self.text_column, "the chat template does not render this conversation turn by turn"
                )
            labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt) :]
            ids = full
        if not ids:
            raise table.fail(row, self.text_column, "no assistant message to learn from")
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}


def _render(tokenizer, messages: list[dict[str, str]], prompt: bool) -> list[int]:
    if not messages:
        return []
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)["input_ids"])


def conversation(table: Table, row: int, column: str, value: Any) -> list[dict[str, str]]:
    """One row's conversation, checked: a list of {"role": str, "content": str}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise table.fail(row, column, f"not a JSON list of messages ({e})") from None
    fits = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )
    if not fits:
        raise table.fail(row, column, 'expected a list of {"role": ..., "content": ...} messages')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each labelled token's negative log-likelihood (0 elsewhere) and the mask of labelled tokens.

    Position p predicts token p + 1; logits are computed only at the positions some row needs. No KV cache:
    none is needed, and with one transformers would not detect a packed row (:func:`pack_batch`).
    """
    targets = batch["labels"][:, 1:]  # B x (L-1)
    counted = targets != IGNORE
    where = counted.any(0).nonzero().squeeze(1)  # the positions that predict a labelled token
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=where, use_cache=False).logits.float()  # B x len(where) x V
    kept = targets[:, where]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), kept, ignore_index=IGNORE, reduction="none")
    return nll, counted[:, where]
