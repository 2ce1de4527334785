"""SmolLM2-135M-Instruct: LoRA training runs (adapterkit's precision and packing, against peft + transformers'
Trainer), gradient checkpointing's memory and time, and generation with adapters relative to the bare model.

    .venv/bin/python benchmarks/bench_llm.py [--rounds 6] [--steps 100] [--only training,checkpointing,generation]
        [--configs ak-fp32,ak-bf16,...] [--output benchmarks/results_llm.md]

Training: LoRA r=16, alpha 32, dropout 0, on q/k/v/o/gate/up/down (210 sites), batch 8, AdamW lr 2e-4,
linear schedule, clip 1.0, ``--steps`` steps on the same chat data (VADER tweets asked for their
sentiment, encoded once by ``adapterkit.training.tasks.Chat``: the same ids and labels for all), 2 threads,
fresh processes, the configurations in a rotating order in every round (all in this venv):

* ``ak-fp32``: adapterkit's defaults (fp32, batches grouped by length, logits only where a label is);
* ``ak-bf16``: the same under ``--autocast bf16`` (fp32 master weights);
* ``ak-bf16-packing``: ``--autocast bf16 --packing`` (each batch one unpadded row);
* ``peft-defaults``: peft + Trainer at Trainer's defaults (fp32, padded batches, random order);
* ``peft-grouped``: the same with ``train_sampling_strategy="group_by_length"`` (adapterkit's grouping);
* ``peft-bf16-flat``: Trainer with ``bf16=True`` and ``DataCollatorWithFlattening`` (padding-free). Its model
  runs with ``use_cache=False``: transformers 5.24 keeps a flattened row's examples apart on sdpa only when
  no KV cache is made (with one, SmolLM2's default in training, they attend across each other).

Tokens/s counts the non-padding tokens of the training loop (adapterkit's ``train_tokens_per_s``; for
Trainer, its tokens over ``train_runtime``); peak RSS is each child process's own (``os.wait4``); the final
loss is adapterkit's mean training loss over the last tenth of the steps.

Gradient checkpointing: adapterkit, the same LoRA, causal-lm on ``--gc-batch`` x ``--gc-length`` tokens
(8 x 1024: tweets joined into long texts), ``--gc-steps`` steps with and without ``--gradient-checkpointing``,
alternating; seconds per step (``train_examples_per_s``) and peak RSS.

Generation: one process, the same 8 left-padded chat prompts, 32 new tokens forced
(``min_new_tokens``), greedy with KV cache, configurations in turn in every round: the bare model,
one LoRA adapter (same config, random weights), the same adapter merged into the weights, and 8
different LoRA adapters, one per row (``PerRow``). Ratios are of medians, each vs the bare model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERKIT = {  # configuration -> `adapterkit train` options
    "ak-fp32": [],
    "ak-bf16": ["--autocast", "bf16"],
    "ak-bf16-packing": ["--autocast", "bf16", "--packing"],
}
PEFT = {  # configuration -> TrainingArguments and collator choices
    "peft-defaults": {"bf16": False, "flatten": False, "group_by_length": False},
    "peft-grouped": {"bf16": False, "flatten": False, "group_by_length": True},
    "peft-bf16-flat": {"bf16": True, "flatten": True, "group_by_length": False},
}
RATIOS = [  # (configuration, baseline, target tokens/s ratio)
    ("ak-bf16", "ak-fp32", 1.8),
    ("ak-bf16-packing", "peft-defaults", 2.0),
    ("ak-bf16-packing", "peft-bf16-flat", 1.3),
    ("ak-fp32", "peft-grouped", 1.0),
]

PEFT_TRAINER = r"""
import json, sys, torch
import transformers as T
from peft import LoraConfig, get_peft_model
model_dir, data, out, steps, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
TARGETS, options = json.loads(sys.argv[6]), json.loads(sys.argv[7])
torch.set_num_threads(threads)
rows = [json.loads(line) for line in open(data)]
tok = T.AutoTokenizer.from_pretrained(model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
torch.manual_seed(0)
model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.config.use_cache = False  # a flattened row's examples stay apart (sdpa) only without a KV cache
config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
model = get_peft_model(model, config)
sampling = "group_by_length" if options["group_by_length"] else "random"
args = T.TrainingArguments(output_dir=out, per_device_train_batch_size=8, learning_rate=2e-4, max_steps=steps,
                           weight_decay=0.01, warmup_steps=1, max_grad_norm=1.0, save_strategy="no", report_to=[],
                           use_cpu=True, logging_steps=10_000, dataloader_num_workers=0, bf16=options["bf16"],
                           train_sampling_strategy=sampling, seed=0)
if options["flatten"]:
    collate = T.DataCollatorWithFlattening()
else:
    collate = T.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
trainer = T.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
result = trainer.train()
seen = sum(len(r["input_ids"]) for r in rows[: steps * 8])  # the steps' tokens (one epoch or less)
print(json.dumps({"tokens_per_s": seen / result.metrics["train_runtime"]}))
"""


def conversations(n: int) -> list[list[dict[str, str]]]:
    from adapterkit.apps.data import read_corpus

    rows = [(t, s) for t, s in read_corpus("tweets") if abs(s) >= 1]
    rows = (rows * (n // len(rows) + 1))[:n]  # more steps than tweets: the data repeats
    question = "Is the sentiment of this tweet positive or negative? Answer in one word.\n\n"
    return [
        [
            {"role": "user", "content": question + t},
            {"role": "assistant", "content": "positive" if s > 0 else "negative"},
        ]
        for t, s in rows
    ]


def chat_data(folder: Path, model: str, n: int) -> tuple[Path, Path]:
    """The same conversations twice: a messages file for adapterkit, its encoding for Trainer."""
    from transformers import AutoTokenizer

    from adapterkit.training.tables import read_table
    from adapterkit.training.tasks import Chat

    messages = folder / "chat.jsonl"
    messages.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(n)))
    examples = Chat("text", "label", 128).encode(read_table(messages), AutoTokenizer.from_pretrained(model))
    encoded = folder / "encoded.jsonl"
    encoded.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return messages, encoded


def long_texts(folder: Path, model: str, n: int, length: int) -> Path:
    """``n`` texts of at least ``length`` tokens: tweets joined, one after another."""
    from transformers import AutoTokenizer

    from adapterkit.apps.data import read_corpus

    tokenizer = AutoTokenizer.from_pretrained(model)
    tweets, texts, current, k = [t for t, _ in read_corpus("tweets")], [], [], 0
    while len(texts) < n:
        current.append(tweets[k % len(tweets)])
        k += 1
        if len(tokenizer(" ".join(current))["input_ids"]) > length:
            texts.append(" ".join(current))
            current = []
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def child(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd``; its stdout and its own peak RSS in MiB."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=ENV, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        err = proc.stderr.read()
        out.seek(0)
        text = out.read()
    if status:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err[-3000:]}")
    return text, usage.ru_maxrss / 1024


def adapterkit_run(
    model: str, data: Path, folder: Path, steps: int, threads: int, extra: list[str], batch: int = 8
) -> dict:
    """One `adapterkit train` LoRA run (chat and 128 tokens unless ``extra`` says otherwise)."""
    out = folder / "ak-out"
    cmd = [sys.executable, "-m", "adapterkit", "train", "--model", model, "--data", str(data), "--output", str(out)]
    cmd += ["--task", "chat", "--adapter", "lora", "--set", "r=16", "--set", "alpha=32", "--set", "dropout=0.0"]
    cmd += ["--set", f"target_modules={json.dumps(TARGETS)}", "--max-steps", str(steps), "--batch-size", str(batch)]
    cmd += ["--lr", "2e-4", "--max-length", "128", "--save-steps", "100000", "--threads", str(threads), *extra]
    _, rss = child(cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    losses = [loss for _, loss in metrics["history"]["loss"]]
    seconds = metrics["steps"] * batch / max(metrics["train_examples_per_s"], 1e-9)  # steps and checkpoints
    return {
        "tokens_per_s": metrics["train_tokens_per_s"],
        "rss": rss,
        "loss": statistics.mean(losses[-max(1, len(losses) // 10) :]),
        "padding": metrics["padding_share"],
        "s_per_step": seconds / metrics["steps"],
    }


def peft_run(model: str, encoded: Path, folder: Path, steps: int, threads: int, options: dict) -> dict:
    cmd = [sys.executable, "-c", PEFT_TRAINER, model, str(encoded), str(folder / "hf"), str(steps), str(threads)]
    text, rss = child([*cmd, json.dumps(TARGETS), json.dumps(options)])
    return {"tokens_per_s": json.loads(text.splitlines()[-1])["tokens_per_s"], "rss": rss}


def training(model: str, rounds: int, steps: int, threads: int, configs: list[str]) -> list[str]:
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        messages, encoded = chat_data(Path(tmp), model, 8 * steps)
        for r in range(rounds):
            for name in configs[r % len(configs) :] + configs[: r % len(configs)]:  # rotate who goes first
                if name in ADAPTERKIT:
                    result = adapterkit_run(model, messages, Path(tmp), steps, threads, ADAPTERKIT[name])
                else:
                    result = peft_run(model, encoded, Path(tmp), steps, threads, PEFT[name])
                runs[name].append(result)
                print(f"round {r}: {name} {json.dumps(result)}", flush=True)
    return training_table(runs, rounds, steps, threads)


def training_table(runs: dict[str, list[dict]], rounds: int, steps: int, threads: int) -> list[str]:
    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    lines = [
        f"### Training: LoRA r=16 on all 7 projections, batch 8, {steps} steps, {threads} threads, "
        f"{rounds} rounds in rotating order, fresh processes",
        "",
        "| configuration | tokens/s (median) | peak RSS (MiB, median) | final loss | padding share |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in runs:
        loss = f"{med(name, 'loss'):.4f}" if name in ADAPTERKIT else "-"
        padding = f"{med(name, 'padding'):.3f}" if name in ADAPTERKIT else "-"
        lines.append(f"| {name} | {med(name, 'tokens_per_s'):.0f} | {med(name, 'rss'):.0f} | {loss} | {padding} |")
    lines += ["", "| comparison | tokens/s ratio (median of rounds) | target | peak RSS ratio (goal <= 1) |"]
    lines.append("|---|---:|---:|---:|")
    for name, base, target in RATIOS:
        if name in runs and base in runs:
            pairs = list(zip(runs[name], runs[base], strict=True))
            speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
            rss = statistics.median(a["rss"] / b["rss"] for a, b in pairs)
            verdict = "met" if speed >= target else "missed"
            lines.append(f"| {name} / {base} | {speed:.3f} | >= {target} ({verdict}) | {rss:.3f} |")
    if "ak-bf16" in runs and "ak-fp32" in runs:
        drift = med("ak-bf16", "loss") / med("ak-fp32", "loss") - 1
        lines += ["", f"Final loss, bf16 autocast vs fp32: {100 * drift:+.2f}% (target within 2%)."]
    return lines


def checkpointing(model: str, rounds: int, steps: int, threads: int, batch: int, length: int) -> list[str]:
    """adapterkit on ``batch`` x ``length`` tokens with and without --gradient-checkpointing."""
    shape = ["--task", "causal-lm", "--max-length", str(length)]
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = long_texts(Path(tmp), model, batch * steps, length)
        for r in range(rounds):
            for name in ("without", "with") if r % 2 == 0 else ("with", "without"):
                extra = shape + (["--gradient-checkpointing"] if name == "with" else [])
                result = adapterkit_run(model, data, Path(tmp), steps, threads, extra, batch)
                runs[name].append(result)
                print(f"round {r}: checkpointing {name} {json.dumps(result)}", flush=True)
    pairs = list(zip(runs["with"], runs["without"], strict=True))
    rss = statistics.median(a["rss"] / b["rss"] for a, b in pairs)
    step = statistics.median(a["s_per_step"] / b["s_per_step"] for a, b in pairs)
    return [
        f"### Gradient checkpointing: {batch} x {length} tokens, LoRA as above, {steps} steps, {threads} threads, "
        f"{rounds} alternating rounds",
        "",
        "| | s/step (median) | peak RSS (MiB, median) |",
        "|---|---:|---:|",
        *[
            f"| {name} checkpointing | {statistics.median(x['s_per_step'] for x in v):.2f} "
            f"| {statistics.median(x['rss'] for x in v):.0f} |"
            for name, v in runs.items()
        ],
        "",
        f"With / without: peak RSS **{rss:.3f}** (target <= 0.6, {'met' if rss <= 0.6 else 'missed'}), "
        f"step time **{step:.3f}** (target <= 1.4, {'met' if step <= 1.4 else 'missed'}).",
    ]


def generation(model_dir: str, rounds: int, threads: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adapterkit as ak
    from adapterkit.core.banks import Bank
    from adapterkit.core.composition import PerRow

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = [f"a{i}" for i in range(8)]
    for i, name in enumerate(names):
        ak.add_adapter(model, name, "lora", r=16, alpha=32, target_modules=TARGETS)
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    batch = _left_padded(tokenizer, prompts)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert out.shape[1] == batch["input_ids"].shape[1] + 32
        return 8 * 32 / (time.perf_counter() - start)

    def bare() -> float:
        ak.set_active(model, None)
        return run()

    def one() -> float:
        ak.set_active(model, "a0")
        return run()

    def merged() -> float:
        ak.set_active(model, None)
        ak.merge_adapter(model, "a0")
        try:
            return run()
        finally:
            ak.unmerge_adapter(model, "a0")

    def per_row() -> float:
        ak.set_active(model, PerRow(names))
        return run()

    def banked() -> float:  # what ak.generate(per_prompt=...) runs: the adapters stacked once per site
        ak.set_active(model, None)
        with Bank(model, names).use(names):
            return run()

    configs = {
        "bare model": bare,
        "one LoRA": one,
        "one LoRA, merged": merged,
        "8 LoRAs, one per row (PerRow, stacked per call)": per_row,
        "8 LoRAs, one per row (a Bank: `ak.generate(per_prompt=...)`)": banked,
    }
    speeds: dict[str, list[float]] = {k: [] for k in configs}
    run()  # warm-up
    for r in range(rounds):
        for label, fn in configs.items():
            speeds[label].append(fn())
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in speeds.items()), flush=True)
    base = statistics.median(speeds["bare model"])
    return [
        f"### Generation: 8 prompts, 32 new tokens each, greedy, KV cache, {threads} threads, {rounds} rounds",
        "",
        "| configuration | tokens/s (median) | vs bare model |",
        "|---|---:|---:|",
        *[f"| {k} | {statistics.median(v):.0f} | {statistics.median(v) / base:.3f} |" for k, v in speeds.items()],
    ]


def _left_padded(tokenizer, prompts: list[str]):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="training,checkpointing,generation", help="comma-separated sections")
    p.add_argument("--configs", default=",".join([*ADAPTERKIT, *PEFT]), help="training configurations")
    p.add_argument("--gc-batch", type=int, default=8)
    p.add_argument("--gc-length", type=int, default=1024)
    p.add_argument("--gc-steps", type=int, default=3)
    p.add_argument("--output")
    args = p.parse_args()
    from adapterkit.apps.models import smollm2

    model, only = str(smollm2()), args.only.split(",")
    lines = ["SmolLM2-135M-Instruct (fp32 weights), same venv (torch 2.13.0, transformers 5.24.0, peft 0.21.2).", ""]
    if "training" in only:
        lines += [*training(model, args.rounds, args.steps, args.threads, args.configs.split(",")), ""]
    if "checkpointing" in only:
        shape = (args.gc_batch, args.gc_length)
        lines += [*checkpointing(model, args.rounds, args.gc_steps, args.threads, *shape), ""]
    if "generation" in only:
        lines += generation(model, args.rounds, args.threads)
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
