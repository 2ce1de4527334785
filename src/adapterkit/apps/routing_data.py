"""Data for the routing benchmark (``benchmarks/bench_routing.py``): two more chat tasks of other kinds than
the LLM demo's three (topic of a sentence, acronym of a phrase; generated, seeded), a held-out task for
composition (did the critic like the film: VADER's movie-review sentences, real), and general prompts
that belong to no task (generated from templates). Conversations are the LLM demo's
(:func:`adapterkit.apps.llm_data.conversation`); a split never repeats a question of another."""

from __future__ import annotations

import itertools
import random

from adapterkit.apps import llm_data
from adapterkit.apps.data import read_corpus

Conversation = llm_data.Conversation

TOPICS = {
    "sports": ["the striker scored twice", "the team won the final", "she ran the marathon", "the goalkeeper"
               " saved a penalty", "the coach picked a new captain", "he swam four laps"],
    "cooking": ["simmer the onions", "the dough needs to rest", "add a pinch of salt", "she baked a lemon cake",
                "roast the peppers", "he stirred the soup"],
    "weather": ["heavy rain is expected", "the wind picked up", "a cold front moves in", "it snowed all night",
                "the forecast says sunshine", "fog covered the valley"],
    "music": ["the band played a new song", "she tuned her violin", "the drummer kept the beat", "the choir"
              " sang in harmony", "he wrote a piano piece", "the album went gold"],
}  # fmt: skip
PLACES = ["this morning", "on Sunday", "in the old town", "last week", "after lunch", "near the coast", "again"]
WORDS = ["quick", "open", "data", "global", "mobile", "smart", "user", "energy", "travel", "secure", "digital",
         "network", "public", "system", "learning", "market", "health", "remote", "video", "cloud", "local",
         "service", "power", "green", "home", "light", "metal", "radio", "water", "zero"]  # fmt: skip
COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "Vietnam", "Chile", "Ghana"]
ACTIVITIES = ["fix a flat bike tire", "grow basil indoors", "learn to juggle", "clean a cast iron pan",
              "write a cover letter", "start running", "sleep better", "save money each month"]  # fmt: skip
THINGS = ["the sea", "autumn leaves", "a lighthouse", "city lights", "an old clock", "the moon"]
CONCEPTS = ["photosynthesis", "inflation", "gravity", "vaccines", "compound interest", "black holes"]
GENERAL = [
    *(f"What is the capital of {c}?" for c in COUNTRIES),
    *(f"How do I {a}?" for a in ACTIVITIES),
    *(f"Give me {n} tips to {a}." for n, a in itertools.product(("two", "three"), ACTIVITIES)),
    *(f"Write a short poem about {t}." for t in THINGS),
    *(f"Explain {c} in simple terms." for c in CONCEPTS),
    *(f"Why is {c} important?" for c in CONCEPTS),
    *(f"Tell me a fun fact about {c}." for c in COUNTRIES),
    *(f"Suggest a name for a cafe near {t}." for t in THINGS),
]
TOPIC_ASK = "Which topic is this sentence about: sports, cooking, weather or music? Answer in one word.\n\n"
ACRONYM_ASK = "Write the acronym of these words in capital letters.\n\n"
MOVIE_ASK = "Did the critic like this film? Answer yes or no.\n\n"


def topic(n: int, rng: random.Random) -> list[Conversation]:
    """``n`` sentences (an event and when or where) with their topic."""
    rows = []
    for _ in range(n):
        name = rng.choice(sorted(TOPICS))
        sentence = f"{rng.choice(TOPICS[name])} {rng.choice(PLACES)}."
        rows.append(llm_data.conversation(TOPIC_ASK + sentence[0].upper() + sentence[1:], name))
    return rows


def acronym(n: int, rng: random.Random) -> list[Conversation]:
    """``n`` phrases of 3-4 words with their acronym (the first letters, capitalised)."""
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 4))
        rows.append(llm_data.conversation(ACRONYM_ASK + " ".join(words), "".join(w[0] for w in words).upper()))
    return rows


def movies(n: int, rng: random.Random, margin: float = 1.0) -> list[Conversation]:
    """``n`` movie-review sentences (VADER's ground truth, rating beyond ``margin``), half liked, with yes/no."""
    rows = [(t, s) for t, s in read_corpus("movieReviewSnippets") if abs(s) >= margin]
    liked = [t for t, s in rows if s > 0]
    disliked = [t for t, s in rows if s < 0]
    picked = [(t, "yes") for t in rng.sample(liked, (n + 1) // 2)] + [(t, "no") for t in rng.sample(disliked, n // 2)]
    rng.shuffle(picked)
    return [llm_data.conversation(MOVIE_ASK + text, answer) for text, answer in picked]


BUILDERS = {"topic": topic, "acronym": acronym, "movies": movies}
SCORER = {"topic": "label", "acronym": "exact", "movies": "label"}


def splits(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[Conversation]]:
    """``{"train", "validation", "test": conversations}`` of one of :data:`BUILDERS`' tasks, no question twice."""
    total = sum(sizes.values())
    rng = random.Random(seed * 1000 + 100 + sorted(BUILDERS).index(task))
    seen: dict[str, Conversation] = {}
    for row in BUILDERS[task](4 * total, rng):
        seen.setdefault(row[1]["content"], row)
    rows = list(seen.values())[:total]
    cut = [0, sizes["train"], sizes["train"] + sizes["validation"], total]
    return {split: rows[cut[i] : cut[i + 1]] for i, split in enumerate(("train", "validation", "test"))}


def general(validation: int, test: int, seed: int = 0) -> dict[str, list[str]]:
    """General prompts (no task's): ``{"validation", "test": prompts}``, disjoint."""
    prompts = sorted(set(GENERAL))
    random.Random(seed).shuffle(prompts)
    return {"validation": prompts[:validation], "test": prompts[validation : validation + test]}
