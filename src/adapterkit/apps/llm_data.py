"""Three instruction tasks with checkable answers for the LLM demo, built offline and deterministically.

* ``sentiment``: real sentences (VADER's ``tweets`` and ``amazonReviewSnippets`` ground truth, mean
  rating at least 1 away from neutral), answered ``positive`` or ``negative`` (scored by label);
* ``extraction``: a made-up customer record written as one of several sentences, answered as the
  JSON object of its fields (scored field by field);
* ``arithmetic``: two- or three-step word problems with + and - on numbers up to 50, answered with
  one equation per step ending in the result (scored by exact match: every step and the result right).

Each example is a conversation: a short system message (the same for every task and row: SmolLM2's
template otherwise adds a 15-token default one), the question, and the gold answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from adapterkit.apps.data import read_corpus

Conversation = list[dict[str, str]]
SYSTEM = "Answer briefly."
SCORER = {"sentiment": "label", "extraction": "json", "arithmetic": "exact"}
TASKS = tuple(SCORER)
SIZES = {"train": 100, "validation": 20, "test": 40}  # per task

FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Grace", "Noah"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Brown", "Okafor", "Petrov", "Kim"]
CITIES = ["Lyon", "Denver", "Osaka", "Cairo", "Leipzig", "Porto", "Pune", "Leeds", "Lagos", "Kazan", "Busan"]
PRODUCTS = ["desk lamp", "rain jacket", "coffee grinder", "bike helmet", "phone case", "yoga mat", "kettle"]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells"]


def conversation(question: str, answer: str) -> Conversation:
    """The messages of one example: the shared system message, the question, the gold answer."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def sentiment(n: int, rng: random.Random, margin: float = 1.0) -> list[Conversation]:
    """``n`` review and tweet sentences, half positive and half negative, with their label."""
    rows = [(t, s) for name in ("tweets", "amazonReviewSnippets") for t, s in read_corpus(name) if abs(s) >= margin]
    by_label = {label: [t for t, s in rows if (s > 0) == (label == "positive")] for label in ("positive", "negative")}
    picked = []
    for label, texts in by_label.items():
        picked += [(text, label) for text in rng.sample(texts, (n + 1) // 2)]
    rng.shuffle(picked)
    ask = "Is this text positive or negative? Answer in one word.\n\n"
    return [conversation(ask + text, label) for text, label in picked[:n]]


EXTRACTION_TEMPLATES = [
    "{name}, {age}, from {city}, bought a {product} (order {order}).",
    "Order {order}: a {product} for {name} ({age} years old), shipping to {city}.",
    "Customer {name} lives in {city}, is {age}, and placed order {order} for a {product}.",
    "A {product} was ordered by {name} of {city}; order number {order}; customer age {age}.",
    "{city} resident {name}, aged {age}, asked about order {order} ({product}).",
]


def record(rng: random.Random) -> dict[str, str | int]:
    """A made-up customer: name, age, city and an order number (the product is a distractor)."""
    return {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(18, 80),
        "city": rng.choice(CITIES),
        "order": rng.randint(1000, 99999),
    }


def extraction(n: int, rng: random.Random) -> list[Conversation]:
    """Records written as varied sentences; the answer is the JSON object of their four fields."""
    out = []
    for _ in range(n):
        fields = record(rng)
        text = rng.choice(EXTRACTION_TEMPLATES).format(product=rng.choice(PRODUCTS), **fields)
        ask = "Extract name, age, city and order number as JSON with keys name, age, city, order.\n\n"
        out.append(conversation(ask + text, json.dumps(fields)))
    return out


def word_problem(rng: random.Random) -> tuple[str, str]:
    """A story of two or three + / - steps on a count that stays between 0 and 99, and its worked answer.

    The answer shows one operation per step and ends with the result (``"28 + 43 = 71, 71 - 7 = 64"``):
    asked for the number alone, every row of the quick demo (full fine-tuning too) scored 0 on this
    135M model, which adds two numbers but not three or four at once.
    """
    name, other = rng.sample(FIRST, 2)
    thing = rng.choice(OBJECTS)
    count = rng.randint(5, 50)
    text, steps = [f"{name} has {count} {thing}."], []
    for _ in range(rng.randint(2, 3)):
        if rng.random() < 0.5 and count > 1:
            k = rng.randint(1, min(count, 30))
            steps.append(f"{count} - {k} = {count - k}")
            count -= k
            text.append(rng.choice([f"{name} gives {k} to {other}.", f"{name} loses {k}.", f"{name} sells {k}."]))
        else:
            k = rng.randint(1, min(50, 99 - count))
            steps.append(f"{count} + {k} = {count + k}")
            count += k
            text.append(
                rng.choice([f"{other} gives {name} {k} more.", f"{name} finds {k} more.", f"{name} buys {k} more."])
            )
    text.append(f"How many {thing} does {name} have now? Show each step, then the result.")
    return " ".join(text), ", ".join(steps)


def result(answer: str) -> int:
    """The number an arithmetic answer ends with."""
    return int(answer.rsplit("=", 1)[-1])


def arithmetic(n: int, rng: random.Random) -> list[Conversation]:
    """``n`` word problems, each answered with its steps and result (scored by exact match of the whole)."""
    return [conversation(*word_problem(rng)) for _ in range(n)]


BUILDERS: dict[str, Callable[[int, random.Random], list[Conversation]]] = {
    "sentiment": sentiment,
    "extraction": extraction,
    "arithmetic": arithmetic,
}


def task_splits(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, dict[str, list[Conversation]]]:
    """``{task: {"train", "validation", "test": conversations}}``; the same seed gives the same data.

    Every task draws its examples at once and cuts them, so no question is in two splits; the
    generated tasks also drop repeated questions first.
    """
    sizes = sizes or SIZES
    total = sum(sizes.values())
    out = {}
    for k, task in enumerate(TASKS):
        rng = random.Random(seed * 1000 + k)
        rows = _unique(BUILDERS[task](2 * total, rng))[:total]
        cuts = [0, sizes["train"], sizes["train"] + sizes["validation"], total]
        out[task] = {split: rows[cuts[i] : cuts[i + 1]] for i, split in enumerate(("train", "validation", "test"))}
    return out


def _unique(rows: list[Conversation]) -> list[Conversation]:
    seen: dict[str, Conversation] = {}
    for row in rows:
        seen.setdefault(row[1]["content"], row)
    return list(seen.values())
