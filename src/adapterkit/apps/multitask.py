"""The multi-task demo: one frozen MiniLM-L6, five tasks, adapters vs sequential fine-tuning.

``adapterkit multitask [--quick]`` uses the four VADER corpora (movie reviews, Amazon reviews,
tweets, NYT editorials; sentiment, non-neutral sentences, ``rating > 0``) and a fifth task,
source identification (which corpus a sentence comes from, 4-way). It prints one report:

1. sequential training with one Pfeiffer adapter (and head) per task: each task's test accuracy
   right after its training and after all five, which are equal, since nothing shared changes;
   sequential full fine-tuning of the same tasks in the same order (a head per task, the
   backbone shared) as the baseline, with what each earlier task loses;
2. AdapterFusion of the four sentiment adapters trained on the target task vs its single adapter;
3. the four sentiment adapters merged into one (linear and TIES) vs each part on its own task;
4. storage: one base model plus N adapter files vs N fine-tuned copies.

All heads have 4 outputs; a binary task reads the first two (so one model holds every head).
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.apps import demo
from adapterkit.apps.data import CORPORA, read_corpus, sentiment_splits
from adapterkit.core import adapters, fusion, io, merging
from adapterkit.core.composition import Fuse

SHORT = dict(zip(CORPORA, ("movie", "amazon", "tweets", "nyt"), strict=True))
TASKS = ("movie", "amazon", "tweets", "nyt", "source")
TARGET = "nyt"  # the fusion's target task
ADAPTER_LR, FUSION_LR, FULL_LR = 3e-3, 1e-3, 5e-5


@dataclasses.dataclass
class Sizes:
    train: int
    test: int
    epochs: float


def source_splits(seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Sentences labelled by corpus, balanced, in a seeded 80/10/10 split."""
    corpora = [[text for text, _ in read_corpus(name)] for name in CORPORA]
    n = min(map(len, corpora))
    rows = [(text, label) for label, texts in enumerate(corpora) for text in random.Random(seed).sample(texts, n)]
    random.Random(seed).shuffle(rows)
    a, b = int(0.8 * len(rows)), int(0.9 * len(rows))
    return {"train": rows[:a], "validation": rows[a:b], "test": rows[b:]}


def load_tasks(sizes: Sizes) -> dict[str, dict[str, list]]:
    raw = {SHORT[name]: sentiment_splits(name, seed=0) for name in CORPORA}
    raw["source"] = source_splits()
    return {
        task: {"train": demo.encode(s["train"][: sizes.train]), "test": demo.encode(s["test"][: sizes.test])}
        for task, s in raw.items()
    }


def classes(task: str) -> int:
    return 4 if task == "source" else 2


def train(model: nn.Module, data: Sequence, lr: float, sizes: Sizes, task: str, extra: Callable | None = None) -> float:
    """The demo's training loop, cross-entropy over the task's classes (+ ``extra()``); returns seconds."""

    def loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        value = nn.functional.cross_entropy(model(**inputs).logits[:, : classes(task)], labels)
        return value + extra() if extra else value

    return demo.train(model, data, demo.Run(task, task, lr, sizes.epochs), loss_fn=loss)


def accuracy(model: nn.Module, data: Sequence, task: str) -> float:
    return demo.accuracy(model, data, classes=classes(task))


class Heads:
    """One classifier per task, swapped in and out of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.init, self.saved = self._get(), {}

    def _get(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.classifier.state_dict().items()}

    def fresh(self) -> None:
        self.model.classifier.load_state_dict(self.init)

    def keep(self, task: str) -> None:
        self.saved[task] = self._get()

    def use(self, task: str) -> None:
        self.model.classifier.load_state_dict(self.saved[task])


def sequential(model: nn.Module, tasks: dict, sizes: Sizes, log, label: str, lr: float, start, select):
    """Train the tasks in order (``start(task)`` first), then test each again (``select(task)``).

    Returns each task's test accuracy right after its training and after all of them, and the heads.
    """
    heads, right_after = Heads(model), {}
    for task in TASKS:
        start(task)
        heads.fresh()
        train(model, tasks[task]["train"], lr, sizes, task)
        heads.keep(task)
        right_after[task] = accuracy(model, tasks[task]["test"], task)
        log(f"  {label} {task:<7} test acc {100 * right_after[task]:.1f}")
    after_all = {}
    for task in TASKS:
        select(task)
        heads.use(task)
        after_all[task] = accuracy(model, tasks[task]["test"], task)
    return right_after, after_all, heads


def sequential_adapters(model: nn.Module, tasks: dict, sizes: Sizes, log) -> tuple[dict, dict, Heads]:
    """One Pfeiffer adapter (and head) per task on the frozen model."""

    def start(task: str) -> None:
        torch.manual_seed(0)  # one shared init, so that merged parameters average task updates
        adapters.add_adapter(model, task, "pfeiffer")
        adapters.train_adapter(model, task)

    return sequential(
        model, tasks, sizes, log, "adapter", ADAPTER_LR, start, lambda task: adapters.set_active(model, task)
    )


def four_way(model: nn.Module) -> nn.Module:
    """MiniLM's classifier with 4 outputs: every task's head fits it."""
    model.config.num_labels = 4
    model.classifier = nn.Linear(model.config.hidden_size, 4)
    return model


def sequential_full(tasks: dict, sizes: Sizes, log) -> tuple[dict, dict]:
    """Every weight trains on each task in turn; a head per task, the backbone shared."""
    model = four_way(demo.load_model())
    right_after, after_all, _ = sequential(model, tasks, sizes, log, "full FT", FULL_LR, lambda t: None, lambda t: None)
    return right_after, after_all


def fused(model: nn.Module, heads: Heads, tasks: dict, sizes: Sizes) -> float:
    """Fusion of the four sentiment adapters, trained (with a new head) on the target task."""
    setup = Fuse(*[SHORT[c] for c in CORPORA])
    fusion.add_fusion(model, setup)
    fusion.train_fusion(model, setup)
    heads.fresh()
    train(model, tasks[TARGET]["train"], FUSION_LR, sizes, TARGET, extra=lambda: fusion.fusion_regularization(model))
    return accuracy(model, tasks[TARGET]["test"], TARGET)


def merged(model: nn.Module, heads: Heads, tasks: dict) -> dict[str, dict[str, float]]:
    """Each sentiment task's accuracy with its own adapter and with merged ones (its own head)."""
    parts = [SHORT[c] for c in CORPORA]
    methods = {"linear": dict(method="linear", weights=[0.25] * 4), "ties": dict(method="ties", density=0.5)}
    for label, kwargs in methods.items():
        merging.combine_adapters(model, parts, into=f"merged_{label}", **kwargs)
    out: dict[str, dict[str, float]] = {}
    for task in parts:
        heads.use(task)
        for setup in (task, "merged_linear", "merged_ties"):
            adapters.set_active(model, setup)
            out.setdefault(setup if setup.startswith("merged") else "own adapter", {})[task] = accuracy(
                model, tasks[task]["test"], task
            )
    return out


def storage(model: nn.Module) -> dict[str, float]:
    """MB on disk: the base model (``save_pretrained``) and the tasks' adapter folders (with heads)."""
    with tempfile.TemporaryDirectory() as tmp:
        demo.load_model().save_pretrained(Path(tmp) / "base")
        for task in TASKS:
            io.save_adapter(model, task, Path(tmp) / task)
        return {"base": _size(Path(tmp) / "base"), "adapters": sum(_size(Path(tmp) / task) for task in TASKS)}


def _size(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def report(results: dict[str, Any], sizes: Sizes) -> str:
    a_after, a_all, f_after, f_all = (results[k] for k in ("a_after", "a_all", "f_after", "f_all"))
    lines = [
        f"MiniLM-L6, 5 tasks trained in order {', '.join(TASKS)} ({sizes.train} training sentences each, "
        f"{sizes.epochs:g} epochs; test sets of up to {sizes.test})",
        "",
        "| task | adapter: right after | adapter: after all 5 | change | full FT: right after | "
        "full FT: after all 5 | change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        cells = [a_after[task], a_all[task], a_all[task] - a_after[task]]
        cells += [f_after[task], f_all[task], f_all[task] - f_after[task]]
        text = [f"{100 * v:+.1f}" if i % 3 == 2 else f"{100 * v:.1f}" for i, v in enumerate(cells)]
        lines.append(f"| {task} | " + " | ".join(text) + " |")
    m = results["merged"]
    parts = [SHORT[c] for c in CORPORA]
    lines += [
        "",
        f"AdapterFusion of the 4 sentiment adapters on {TARGET}: test acc {100 * results['fusion']:.1f} "
        f"vs its single adapter {100 * a_after[TARGET]:.1f}",
        "",
        "| sentiment task | own adapter | merged (linear, 1/4 each) | merged (TIES, density 0.5) |",
        "|---|---:|---:|---:|",
    ]
    for task in parts + ["mean"]:
        row = [
            sum(m[k].values()) / 4 if task == "mean" else m[k][task]
            for k in ("own adapter", "merged_linear", "merged_ties")
        ]
        lines.append(f"| {task} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    st = results["storage"]
    n = len(TASKS)
    lines += [
        "",
        f"Storage for {n} tasks: base model {st['base']:.1f} MB + {n} adapter folders {st['adapters']:.2f} MB "
        f"= {st['base'] + st['adapters']:.1f} MB, vs {n} fine-tuned copies {n * st['base']:.1f} MB",
    ]
    return "\n".join(lines)


def main(quick: bool = False, output: str | None = None, threads: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    sizes = Sizes(train=600, test=300, epochs=3) if quick else Sizes(train=2000, test=600, epochs=2)
    tasks = load_tasks(sizes)
    log = lambda text: print(text, flush=True)  # noqa: E731
    model = four_way(demo.load_model())
    results: dict[str, Any] = {}
    results["a_after"], results["a_all"], heads = sequential_adapters(model, tasks, sizes, log)
    results["f_after"], results["f_all"] = sequential_full(tasks, sizes, log)
    results["merged"] = merged(model, heads, tasks)
    results["storage"] = storage(model)
    results["fusion"] = fused(model, heads, tasks, sizes)
    text = report(results, sizes)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return results
