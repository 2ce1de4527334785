"""Training throughput: ``adapterkit train`` vs the same training with peft 0.21.2 + ``transformers.Trainer``.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--examples 2048] [--output benchmarks/results_train.md]

Same model (MiniLM-L6, real weights), same data (the first ``--examples`` VADER movie-review
training sentences), LoRA r=8 alpha 8 on query/value, batch 32, max length 128, AdamW lr 1e-3,
linear schedule, grad-norm clip 1.0, 2 threads, one epoch, no evaluation, one checkpoint at the end
for adapterkit (Trainer: none). Each run is a fresh process; the libraries alternate in every
round. Throughput is training examples per second of the training loop (adapterkit's
``train_examples_per_s``; Trainer's ``train_samples_per_second``); the reported ratio is the median
of the per-round ratios adapterkit / peft.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
sys.path.insert(0, str(HERE))
from bench_peers import python_for  # noqa: E402  (the peers' venvs)

PEFT_TRAINER = r"""
import json, sys, time, torch
import transformers as T
from peft import LoraConfig, get_peft_model
model_dir, data, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
rows = [json.loads(line) for line in open(data)]
labels = sorted({r["label"] for r in rows})
tok = T.AutoTokenizer.from_pretrained(model_dir)
ds = [{**tok(r["text"], truncation=True, max_length=128), "labels": labels.index(r["label"])} for r in rows]
torch.manual_seed(0)
model = T.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                         task_type="SEQ_CLS"))
args = T.TrainingArguments(output_dir=sys.argv[5], per_device_train_batch_size=batch, learning_rate=1e-3,
                           num_train_epochs=1, weight_decay=0.01, save_strategy="no",
                           warmup_steps=max(1, int(0.06 * -(-len(ds) // batch))),
                           report_to=[], use_cpu=True, logging_steps=10_000, dataloader_num_workers=0)
trainer = T.Trainer(model=model, args=args, train_dataset=ds, data_collator=T.DataCollatorWithPadding(tok))
out = trainer.train()
print(json.dumps({"examples_per_s": out.metrics["train_samples_per_second"]}))
"""


def sentences(n: int, folder: Path) -> Path:
    from adapterkit.apps.data import sentiment_splits

    rows = sentiment_splits("movieReviewSnippets", seed=0)["train"][:n]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": ["neg", "pos"][y]}) + "\n" for t, y in rows))
    return path


def adapterkit_run(model: str, data: Path, folder: Path, batch: int, threads: int) -> float:
    out = folder / "ak-out"
    cmd = [sys.executable, "-m", "adapterkit", "train", "--model", model, "--data", str(data), "--output", str(out)]
    cmd += ["--adapter", "lora", "--epochs", "1", "--batch-size", str(batch), "--threads", str(threads)]
    cmd += ["--lr", "1e-3", "--max-length", "128", "--save-steps", "100000"]
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    metrics = json.loads((out / "metrics.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return metrics["train_examples_per_s"]


def peft_run(model: str, data: Path, folder: Path, batch: int, threads: int) -> float:
    cmd = [python_for("peft"), "-c", PEFT_TRAINER, model, str(data), str(batch), str(threads), str(folder / "hf")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"peft + Trainer failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])["examples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output")
    args = p.parse_args()
    from adapterkit.apps.demo import model_path

    model = model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = sentences(args.examples, Path(tmp))
        for r in range(args.rounds):
            ak = adapterkit_run(model, data, Path(tmp), args.batch_size, args.threads)
            pf = peft_run(model, data, Path(tmp), args.batch_size, args.threads)
            rows.append((ak, pf))
            print(f"round {r}: adapterkit {ak:.1f} ex/s, peft + Trainer {pf:.1f} ex/s, ratio {ak / pf:.3f}", flush=True)
    ratio = statistics.median(a / b for a, b in rows)
    lines = [
        f"MiniLM-L6, {args.examples} VADER sentences, LoRA r=8 (query, value), batch {args.batch_size}, "
        f"max length 128, {args.threads} threads, 1 epoch; {args.rounds} alternating rounds, fresh processes.",
        "",
        "| round | adapterkit train (ex/s) | peft 0.21.2 + Trainer (ex/s) | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {i} | {a:.1f} | {b:.1f} | {a / b:.3f} |" for i, (a, b) in enumerate(rows)],
        "",
        f"Median ratio adapterkit / peft + Trainer: **{ratio:.3f}** (goal >= 1).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
