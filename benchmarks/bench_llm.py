"""SmolLM2-135M-Instruct: a LoRA training run, adapterkit vs peft + transformers' Trainer, and generation
with adapters relative to the bare model.

    .venv/bin/python benchmarks/bench_llm.py [--rounds 3] [--steps 8] [--output benchmarks/results_llm.md]

Training: LoRA r=16, alpha 32, dropout 0, on q/k/v/o/gate/up/down (210 sites), batch 8, AdamW lr 2e-4,
linear schedule, clip 1.0, ``--steps`` steps on the same chat data (VADER tweets asked for their
sentiment, encoded once by ``adapterkit.training.tasks.Chat``: the same ids and labels for both),
2 threads, fresh processes alternating in every round. Both libraries get the same options:
adapterkit groups batches by length and computes logits only where a label is, so peft + Trainer
runs with ``train_sampling_strategy="group_by_length"`` (its sampler does the same grouping); the logits saving has no
Trainer option. Tokens/s counts the non-padding tokens of the training loop (adapterkit's
``train_tokens_per_s``; for Trainer, its tokens over ``train_runtime``); peak RSS is each child
process's own (``os.wait4``).

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

PEFT_TRAINER = r"""
import json, sys, torch
import transformers as T
from peft import LoraConfig, get_peft_model
model_dir, data, out, steps, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
TARGETS = json.loads(sys.argv[6])
torch.set_num_threads(threads)
rows = [json.loads(line) for line in open(data)]
tok = T.AutoTokenizer.from_pretrained(model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
torch.manual_seed(0)
model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
model = get_peft_model(model, config)
args = T.TrainingArguments(output_dir=out, per_device_train_batch_size=8, learning_rate=2e-4, max_steps=steps,
                           weight_decay=0.01, warmup_steps=1, max_grad_norm=1.0, save_strategy="no", report_to=[],
                           use_cpu=True, logging_steps=10_000, dataloader_num_workers=0,
                           train_sampling_strategy="group_by_length",
                           seed=0)
collate = T.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
trainer = T.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
result = trainer.train()
seen = sum(len(r["input_ids"]) for r in rows[: steps * 8])  # approximately what the steps saw (one epoch or less)
print(json.dumps({"tokens_per_s": seen / result.metrics["train_runtime"]}))
"""


def chat_data(folder: Path, n: int) -> tuple[Path, Path]:
    """The same conversations twice: a messages file for adapterkit, its encoding for Trainer."""
    from transformers import AutoTokenizer

    from adapterkit.apps.data import read_corpus
    from adapterkit.apps.models import smollm2
    from adapterkit.training.tables import read_table
    from adapterkit.training.tasks import Chat

    rows = [(t, s) for t, s in read_corpus("tweets") if abs(s) >= 1][:n]
    question = "Is the sentiment of this tweet positive or negative? Answer in one word.\n\n"
    convs = [
        [
            {"role": "user", "content": question + t},
            {"role": "assistant", "content": "positive" if s > 0 else "negative"},
        ]
        for t, s in rows
    ]
    messages = folder / "chat.jsonl"
    messages.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    examples = Chat("text", "label", 128).encode(read_table(messages), AutoTokenizer.from_pretrained(smollm2()))
    encoded = folder / "encoded.jsonl"
    encoded.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return messages, encoded


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


def adapterkit_run(model: str, data: Path, folder: Path, steps: int, threads: int) -> tuple[float, float]:
    out = folder / "ak-out"
    cmd = [sys.executable, "-m", "adapterkit", "train", "--model", model, "--data", str(data), "--output", str(out)]
    cmd += ["--task", "chat", "--adapter", "lora", "--set", "r=16", "--set", "alpha=32", "--set", "dropout=0.0"]
    cmd += ["--set", f"target_modules={json.dumps(TARGETS)}", "--max-steps", str(steps), "--batch-size", "8"]
    cmd += ["--lr", "2e-4", "--max-length", "128", "--save-steps", "100000", "--threads", str(threads)]
    _, rss = child(cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return metrics["train_tokens_per_s"], rss


def peft_run(model: str, encoded: Path, folder: Path, steps: int, threads: int) -> tuple[float, float]:
    text, rss = child(
        [
            sys.executable,
            "-c",
            PEFT_TRAINER,
            model,
            str(encoded),
            str(folder / "hf"),
            str(steps),
            str(threads),
            json.dumps(TARGETS),
        ]
    )
    return json.loads(text.splitlines()[-1])["tokens_per_s"], rss


def training(model: str, rounds: int, steps: int, threads: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        messages, encoded = chat_data(Path(tmp), 8 * steps)
        for r in range(rounds):
            ak, ak_rss = adapterkit_run(model, messages, Path(tmp), steps, threads)
            pf, pf_rss = peft_run(model, encoded, Path(tmp), steps, threads)
            rows.append((ak, pf, ak_rss, pf_rss))
            print(
                f"round {r}: adapterkit {ak:.0f} tok/s {ak_rss:.0f} MiB, peft {pf:.0f} tok/s {pf_rss:.0f} MiB",
                flush=True,
            )
    ratio = statistics.median(a / b for a, b, _, _ in rows)
    rss = statistics.median(a / b for _, _, a, b in rows)
    return [
        f"### Training: LoRA r=16 on all 7 projections, batch 8, {steps} steps, {threads} threads, "
        f"{rounds} alternating rounds, fresh processes",
        "",
        "| round | adapterkit (tok/s) | peft + Trainer (tok/s) | ratio | adapterkit RSS (MiB) | peft RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {i} | {a:.0f} | {b:.0f} | {a / b:.3f} | {c:.0f} | {d:.0f} |" for i, (a, b, c, d) in enumerate(rows)],
        "",
        f"Median tokens/s ratio adapterkit / peft + Trainer: **{ratio:.3f}** (goal >= 1); "
        f"peak RSS ratio: **{rss:.3f}** (goal <= 1).",
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["training", "generation"])
    p.add_argument("--output")
    args = p.parse_args()
    from adapterkit.apps.models import smollm2

    model = str(smollm2())
    lines = ["SmolLM2-135M-Instruct (fp32), same venv (torch 2.13.0, transformers 5.24.0, peft 0.21.2).", ""]
    if args.only != "generation":
        lines += [*training(model, args.rounds, args.steps, args.threads), ""]
    if args.only != "training":
        lines += generation(model, args.rounds, args.threads)
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
