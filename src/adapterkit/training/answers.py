"""Scoring generated answers against gold answers: exact match, a label word, the fields of a JSON object.

Each scorer is a pure function of the predicted and gold strings and returns its metrics as a dict
(``accuracy`` first). :func:`evaluate_generations` generates the answers of held-out conversations
greedily (:func:`adapterkit.core.generation.generate`) and scores them with one of :data:`SCORERS`.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from adapterkit.core.generation import generate
from adapterkit.errors import AdapterError

Messages = list[dict[str, str]]
_LEADING = re.compile(r"^(?:(?!-\d)[\s" + re.escape(string.punctuation) + r"])+")  # keeps a minus sign
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def normalise(text: str) -> str:
    """Lower case, no whitespace or punctuation at the ends, single spaces; ``"1,200.0"`` -> ``"1200"``."""
    text = " ".join(str(text).lower().split())
    text = _LEADING.sub("", text).rstrip(string.punctuation + " ")
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return text


def exact_match(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """The share of predictions equal to their gold answer once both are :func:`normalise`\\ d."""
    _check(predicted, gold)
    return {"accuracy": _mean(normalise(p) == normalise(g) for p, g in zip(predicted, gold, strict=True))}


def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The label word that appears first in ``text`` (whole words, any case), or None."""
    words = sorted({normalise(label) for label in labels}, key=len, reverse=True)  # "not bad" before "bad"
    found = re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", normalise(text)) if words else None
    return found.group(1) if found else None


def label_accuracy(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """The share of predictions whose first label word (:func:`first_label`) is the gold label; none is wrong."""
    _check(predicted, gold)
    hits = (first_label(p, labels) == normalise(g) for p, g in zip(predicted, gold, strict=True))
    return {"accuracy": _mean(hits)}


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first ``{...}`` in ``text`` that parses as a JSON object (nested braces allowed), or None."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def json_match(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, Any]:
    """Rows whose first JSON object has every field of the gold object equal, and each field's accuracy.

    Values compare as :func:`normalise`\\ d text (``34`` equals ``"34"``); objects and lists compare exactly.
    """
    _check(predicted, gold)
    golds = [json.loads(g) for g in gold]
    found = [first_json_object(p) or {} for p in predicted]
    fields = list(dict.fromkeys(key for g in golds for key in g))
    per_field = {
        key: _mean(_same(f.get(key), g[key]) for f, g in zip(found, golds, strict=True) if key in g) for key in fields
    }
    rows = (all(_same(f.get(k), v) for k, v in g.items()) for f, g in zip(found, golds, strict=True))
    return {"accuracy": _mean(rows), "parsed": _mean(bool(f) for f in found), "fields": per_field}


def _same(value: Any, gold: Any) -> bool:
    if value is None or isinstance(gold, (dict, list)):
        return value == gold
    return normalise(str(value)) == normalise(str(gold))


SCORERS: dict[str, Callable[..., dict[str, Any]]] = {"exact": exact_match, "label": label_accuracy, "json": json_match}


def evaluate_generations(
    model: nn.Module,
    tokenizer,
    rows: Sequence[Messages],
    scorer: str,
    batch_size: int = 32,
    max_tokens: int | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Generate (greedily) the last, assistant message of each conversation from the ones before it; score.

    ``max_tokens`` None: twice the longest gold answer's token count plus 8 (room for a differently
    formatted right answer, e.g. indented JSON). ``labels`` (scorer ``"label"``)
    defaults to the distinct gold answers. Returns the scorer's metrics, ``n`` and the ``predictions``.
    """
    if scorer not in SCORERS:
        raise AdapterError(f"unknown scorer {scorer!r}; choose from {', '.join(SCORERS)}")
    if not rows or any(not row or row[-1].get("role") != "assistant" for row in rows):
        raise AdapterError("each row must be a conversation whose last message is the gold assistant answer")
    prompts, gold = [list(row[:-1]) for row in rows], [row[-1]["content"] for row in rows]
    if max_tokens is None:
        max_tokens = 2 * max(len(tokenizer(g, add_special_tokens=False)["input_ids"]) for g in gold) + 8
    was_training = model.training
    model.eval()
    predicted: list[str] = []
    for start in range(0, len(prompts), batch_size):
        predicted += generate(model, tokenizer, prompts[start : start + batch_size], max_tokens=max_tokens)
    model.train(was_training)
    extra = {"labels": labels or sorted(set(gold))} if scorer == "label" else {}
    return SCORERS[scorer](predicted, gold, **extra) | {"n": len(gold), "predictions": predicted}


def _check(predicted: Sequence[str], gold: Sequence[str]) -> None:
    if len(predicted) != len(gold):
        raise AdapterError(f"{len(predicted)} predictions for {len(gold)} gold answers")


def _mean(values) -> float:
    values = list(values)
    return sum(map(bool, values)) / len(values) if values else 0.0
