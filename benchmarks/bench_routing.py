"""Task-agnostic routing on SmolLM2-135M-Instruct (issue 26): one LoRA per task, then a shuffled mix of the
tasks' held-out prompts (task hidden) and general prompts of no task, answered per row.

Tasks: the LLM demo's three (sentiment, extraction, arithmetic) and two of other kinds (topic of a
sentence, acronym of a phrase; ``adapterkit.apps.routing_data``). Each adapter is LoRA r=8 (the LLM demo's
preset and rate), trained on its task's 100 training conversations for one epoch (13 steps of 8); its routing signature
comes from those same inputs. The router's threshold is chosen on the validation splits (20 per task and
24 general prompts); everything below is on the test splits.

Rows: base model zero-shot; oracle (the right adapter given); the router (top-1); top-2 mixing (a weighted
``Average`` of the two best LoRAs per row); Arrow (peft's, top_k 3, over all five LoRAs); a uniform
``Average`` of all five (AdapterSoup-like); a TF-IDF + logistic-regression classifier trained on the same
signature samples, its "none" threshold on max probability chosen on the same validation data.
Then the latency routing adds to a request, and composition (``ak.compose``, 10 examples) for a held-out
task: did the critic like the film (VADER movie reviews, yes/no).

    .venv/bin/python benchmarks/bench_routing.py            # trains once into --work, then evaluates
    .venv/bin/python benchmarks/bench_routing.py --test 10  # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from serve_load import quiet_line  # one quiet check for every benchmark (benchmarks/ is on the path)

import adapterkit as ak
from adapterkit.apps import llm_data, llm_demo, routing_data
from adapterkit.apps.demo import Run
from adapterkit.core.routing import has_signature
from adapterkit.files import cache_dir
from adapterkit.training.answers import SCORERS

TASKS = ("sentiment", "extraction", "arithmetic", "topic", "acronym")
SCORER = {**llm_data.SCORER, **routing_data.SCORER}
RUN = Run("lora (r=8)", "lora", lr=5e-3, epochs=1)


SIZES = {"train": 100, "validation": 20, "test": 40}  # per task; --test answers the first N test prompts only


def splits() -> dict[str, dict[str, list]]:
    demo = llm_data.task_splits(0, SIZES)
    extra = {task: routing_data.splits(task, SIZES) for task in ("topic", "acronym", "movies")}
    return {**{t: demo[t] for t in llm_data.TASKS}, **extra}


def prompts(rows: list) -> list:
    return [list(row[:-1]) for row in rows]


def adapters(model, tok, data, work: Path, run: Run) -> dict[str, Path]:
    """One LoRA per task, trained once (kept in ``work``) with its routing signature."""
    folders = {}
    for task in TASKS:
        folder = folders[task] = work / task
        if not has_signature(folder):
            ak.add_adapter(model, task, run.preset)
            ak.train_adapter(model, task)
            seconds, _ = llm_demo.train(model, tok, data[task]["train"], run)
            print(f"trained {task} in {seconds:.0f} s", file=sys.stderr)
            ak.save_adapter(model, task, folder)
            ak.save_signature(folder, ak.signature(model, tok, prompts(data[task]["train"])))
            ak.delete_adapter(model, task)
    model.requires_grad_(False)
    return folders


def generate(model, tok, rows: list, setups: list, task: str) -> float:
    """Accuracy on ``rows`` of ``task``, each prompt answered through its setup."""
    gold = [row[-1]["content"] for row in rows]
    max_tokens = 2 * max(len(tok(g, add_special_tokens=False)["input_ids"]) for g in gold) + 8
    predicted = []
    for start in range(0, len(rows), 16):
        chunk = slice(start, start + 16)
        predicted += ak.generate(model, tok, prompts(rows[chunk]), max_tokens=max_tokens, per_prompt=setups[chunk])
    extra = {"labels": sorted(set(gold))} if SCORER[task] == "label" else {}
    return SCORERS[SCORER[task]](predicted, gold, **extra)["accuracy"]


class TfidfRouter:
    """A "semantic router": TF-IDF + logistic regression over the signature samples' user text, "none"
    below a max-probability threshold chosen on validation."""

    def __init__(self, data, general_val) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        texts = [ak.routing.routing_text(p) for t in TASKS for p in prompts(data[t]["train"])]
        labels = [t for t in TASKS for _ in data[t]["train"]]
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts)
        self.model = LogisticRegression(max_iter=2000).fit(self.vectorizer.transform(texts), labels)
        val = [(p, t) for t in TASKS for p in prompts(data[t]["validation"])] + [(p, None) for p in general_val]
        probs = self._probs([p for p, _ in val])
        best = max(sorted({float(p.max()) for p in probs}), key=lambda c: self._hits(probs, [t for _, t in val], c))
        self.threshold = best

    def _probs(self, items):
        return self.model.predict_proba(self.vectorizer.transform([ak.routing.routing_text(p) for p in items]))

    def _decide(self, probs, cut):
        return [self.model.classes_[p.argmax()] if p.max() >= cut else None for p in probs]

    def _hits(self, probs, truth, cut) -> int:
        return sum(d == t for d, t in zip(self._decide(probs, cut), truth, strict=True))

    def route(self, items) -> list[str | None]:
        return self._decide(self._probs(items), self.threshold)


def routing_rows(router, top2, tfidf, data, general) -> dict[str, dict]:
    """Each routed row's decisions on the test mix: in-task correct, general to the base model, overall."""
    items = [(p, t) for t in TASKS for p in prompts(data[t]["test"])] + [(p, None) for p in general]
    random.Random(0).shuffle(items)  # the task is hidden: one mix
    found = {}
    for name, decide in (("router (top-1)", router.route), ("TF-IDF + logistic regression", tfidf.route)):
        chosen = decide([p for p, _ in items])
        found[name] = _routing_scores(chosen, [t for _, t in items])
    found["top-2 mixing"] = found["router (top-1)"]  # its first choice is the router's
    return found


def _routing_scores(chosen, truth) -> dict[str, float]:
    inside = [(c, t) for c, t in zip(chosen, truth, strict=True) if t is not None]
    outside = [c for c, t in zip(chosen, truth, strict=True) if t is None]
    return {
        "accuracy": sum(c == t for c, t in zip(chosen, truth, strict=True)) / len(truth),
        "in_task": sum(c == t for c, t in inside) / len(inside),
        "general_to_base": sum(c is None for c in outside) / max(1, len(outside)),
    }


def setups_of(row: str, task: str, rows: list, router, top2, tfidf) -> list:
    n, items = len(rows), prompts(rows)
    return {
        "base model (zero-shot)": lambda: [None] * n,
        "oracle (right adapter)": lambda: [task] * n,
        "router (top-1)": lambda: router.setups(items),
        "top-2 mixing": lambda: top2.setups(items),
        "Arrow (top 3)": lambda: [ak.Arrow(*TASKS, top_k=3)] * n,
        "uniform average": lambda: [ak.Average(*TASKS)] * n,
        "TF-IDF + logistic regression": lambda: tfidf.route(items),
    }[row]()


ROWS = ["base model (zero-shot)", "oracle (right adapter)", "router (top-1)", "top-2 mixing", "Arrow (top 3)",
        "uniform average", "TF-IDF + logistic regression"]  # fmt: skip


def accuracy_table(model, tok, data, router, top2, tfidf, routed) -> list[str]:
    lines = ["| row | " + " | ".join(TASKS) + " | mean | routing acc | in-task routed right | general to base |"]
    lines.append("|---|" + "---:|" * (len(TASKS) + 4))
    for row in ROWS:
        accs = [generate(model, tok, data[t]["test"], setups_of(row, t, data[t]["test"], router, top2, tfidf), t)
                for t in TASKS]  # fmt: skip
        r = routed.get(row)
        routing = (
            f"{100 * r['accuracy']:.1f} | {100 * r['in_task']:.1f} | {100 * r['general_to_base']:.1f}"
            if r
            else "- | - | -"
        )
        lines.append(
            f"| {row} | "
            + " | ".join(f"{100 * a:.1f}" for a in accs)
            + f" | {100 * statistics.mean(accs):.1f} | {routing} |"
        )
        print(lines[-1], file=sys.stderr)
    return lines


def latency(model, tok, data, router, rounds: int = 3) -> list[str]:
    """Seconds to route one request alone vs to answer it (its task's answer length), alternating."""
    rows = [(t, r) for t in TASKS for r in data[t]["test"][:4]]
    spent = {"route": [], "answer": []}
    for _ in range(rounds):
        for _, row in rows:
            gold = len(tok(row[-1]["content"], add_special_tokens=False)["input_ids"])
            start = time.perf_counter()
            choice = router.route([row[:-1]])
            spent["route"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ak.generate(model, tok, [row[:-1]], max_tokens=2 * gold + 8, per_prompt=choice)
            spent["answer"].append(time.perf_counter() - start)
    share = sum(spent["route"]) / sum(spent["answer"])
    return [
        f"Routing one request alone (early exit at the middle layer, {len(rows)} prompts x {rounds} rounds): median "
        f"{1000 * statistics.median(spent['route']):.1f} ms; answering it through the chosen adapter: median "
        f"{1000 * statistics.median(spent['answer']):.0f} ms; routing adds **{100 * share:.2f}%** (target <= 3%)."
    ]


def composition(model, tok, data) -> list[str]:
    """The held-out task from 10 examples (ak.compose) vs zero-shot and each single adapter."""
    rows, shots = data["movies"]["test"], data["movies"]["train"][:10]
    result = ak.compose(model, tok, list(TASKS), shots, name="movies", budget=40, seed=0)
    lines = ["| on the held-out task (movies, yes/no) | accuracy |", "|---|---:|"]
    for label, setup in [("base model (zero-shot)", None), *((t, t) for t in TASKS),
                         ("uniform average", ak.Average(*TASKS)), ("composed (10 examples)", "movies")]:  # fmt: skip
        lines.append(f"| {label} | {100 * generate(model, tok, rows, [setup] * len(rows), 'movies'):.1f} |")
        print(lines[-1], file=sys.stderr)
    weights = ", ".join(f"{t} {w:+.2f}" for t, w in zip(TASKS, result.weights, strict=True))
    return [*lines, "", f"Mixing weights found: {weights}."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test", type=int, default=40, help="test conversations answered per task (routing: all 40)")
    p.add_argument("--epochs", type=float, default=RUN.epochs, help="training epochs (a smoke test: 0.1)")
    p.add_argument("--work", type=Path, default=cache_dir() / "bench_routing" / "v2", help="the adapters kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["accuracy", "latency", "compose"], help="one part")
    args = p.parse_args()
    model, tok = llm_demo.load(args.threads)
    data = splits()
    answered = {t: {**s, "test": s["test"][: args.test]} for t, s in data.items()}
    general = routing_data.general(24, 44)
    run = dataclasses.replace(RUN, epochs=args.epochs)
    folders = adapters(model, tok, data, args.work, run)
    validation = {t: prompts(data[t]["validation"]) for t in TASKS} | {None: general["validation"]}
    router = ak.Router.build(model, tok, [folders[t] for t in TASKS], validation=validation)
    top2, tfidf = router.with_config(top_k=2), TfidfRouter(data, general["validation"])
    out = [
        f"# Routing (issue 26): SmolLM2-135M-Instruct, 5 LoRAs; routing on {SIZES['test']} test prompts per task "
        f"+ {len(general['test'])} general, answers on {args.test} per task",
        "",
        f"Command: `{' '.join(['python', *sys.argv])}`",
        "",
        f"Router threshold chosen on validation: {router.config.threshold:.3f} ({router.calibration})",
        "",
    ]
    if args.only in (None, "accuracy"):
        routed = routing_rows(router, top2, tfidf, data, general["test"])
        out += accuracy_table(model, tok, answered, router, top2, tfidf, routed) + [""]
    if args.only in (None, "latency"):
        out += [quiet_line()] + latency(model, tok, data, router) + [""]
    if args.only in (None, "compose"):
        out += composition(model, tok, answered)
    print("\n".join(out))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
