"""Token classification (NER, tagging): word-level tags, scored by entity F1."""

from __future__ import annotations

from collections.abc import Sequence

from adapterkit.training.tables import Table
from adapterkit.training.tasks.base import IGNORE, Example, Task
from adapterkit.training.tasks.metrics import accuracy


class TokenClassification(Task):
    """Tokens (a list, or a string split on spaces) and one tag per token; the first sub-word carries it."""

    name, auto_class = "token-classification", "AutoModelForTokenClassification"
    metrics = ("f1", "precision", "recall", "accuracy")  # entity-level (as seqeval/conlleval), token accuracy

    def _pairs(self, table: Table) -> list[tuple[list[str], list[str]]]:
        words = table.column(self.text_column, "--text-column")
        tags = table.column(self.label_column, "--label-column")
        pairs = []
        for i, (w, t) in enumerate(zip(words, tags, strict=True)):
            w = w.split() if isinstance(w, str) else list(w)
            t = t.split() if isinstance(t, str) else list(t)
            if len(w) != len(t):
                raise table.fail(i, self.label_column, f"{len(w)} tokens but {len(t)} tags")
            pairs.append((w, [str(tag) for tag in t]))
        return pairs

    def fit_labels(self, table: Table) -> None:
        self.labels = sorted({tag for _, tags in self._pairs(table) for tag in tags})

    def model_kwargs(self):
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels))}

    def loss_terms(self, examples):
        """One per tagged sub-word: the model's loss is their mean."""
        return max(1, sum(sum(y != IGNORE for y in e["labels"]) for e in examples))

    def encode(self, table: Table, tokenizer) -> list[Example]:
        index, examples = {tag: i for i, tag in enumerate(self.labels)}, []
        for i, (words, tags) in enumerate(self._pairs(table)):
            unknown = [t for t in tags if t not in index]
            if unknown:
                raise table.fail(
                    i, self.label_column, f"unknown tag {unknown[0]!r}; the training data has {self.labels}"
                )
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
            previous, labels = None, []
            for word in enc.word_ids():
                labels.append(IGNORE if word is None or word == previous else index[tags[word]])
                previous = word
            examples.append({"input_ids": enc["input_ids"], "labels": labels})
        return examples

    def predict(self, model, batch):
        best = model(**batch).logits.argmax(-1)
        return [row[gold != IGNORE].tolist() for row, gold in zip(best, batch["labels"], strict=True)]

    def gold(self, examples):
        return [[y for y in e["labels"] if y != IGNORE] for e in examples]

    def score(self, predicted, gold):
        """Entity-level precision, recall and F1 over every sentence's chunks, and token accuracy."""
        found, wanted = set(), set()
        for i, (p, g) in enumerate(zip(predicted, gold, strict=True)):
            found |= {(i, *chunk) for chunk in entities([self.labels[t] for t in p])}
            wanted |= {(i, *chunk) for chunk in entities([self.labels[t] for t in g])}
        hits = len(found & wanted)
        precision = hits / len(found) if found else float(not wanted)
        recall = hits / len(wanted) if wanted else float(not found)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "f1": f1,
            "precision": precision,
            "recall": recall,
            "accuracy": accuracy(sum(predicted, []), sum(gold, [])),
        }


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The chunks ``(type, first, last)`` of one sentence's tags, read as conlleval and seqeval's default
    mode read them: IOB1, IOB2 and IOBES prefixes (``B-PER``), ``O`` outside; a tag without such a
    prefix is one type (runs of it form one chunk)."""
    chunks, start, kind, prev = set(), None, None, "O"
    for i, tag in enumerate([*tags, "O"]):
        mark, here = _split_tag(tag)
        ends = prev in "ES" or (prev != "O" and (mark in "BSO" or here != kind))
        if start is not None and ends:
            chunks.add((kind, start, i - 1))
            start = None
        if mark in "BS" or (mark != "O" and (prev in "ESO" or here != kind)):
            start = i
        prev, kind = mark, here
    return chunks


def _split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", None)``, ``"PER"`` -> ``("I", "PER")``."""
    if tag == "O":
        return "O", None
    if len(tag) > 1 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag
