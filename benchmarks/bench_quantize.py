"""A quantized frozen base (``adapterkit.core.quantize``) on SmolLM2-135M-Instruct: fp32 vs int8 vs int4.

    .venv/bin/python benchmarks/bench_quantize.py [--rounds 2] [--steps 2] [--new-tokens 32] [--output FILE]

Each configuration runs in a fresh process (so its peak RSS is its own), alternating in every round:
load the fp32 checkpoint, quantize the backbone's Linear weights (int4: groups of 32), add LoRA r=8 (the
default targets), then time ``--steps`` training steps (AdamW, the first one included) on a batch of 8 x 64
random tokens, and greedy generation of ``--new-tokens`` (LoRA active, unmerged) after a 4-token warm-up.
2 threads. Base bytes: parameters and buffers outside adapters (quantized tensors: integers, scales and
zero points). Peak RSS: ``ru_maxrss`` of the child at its end (loading included: the fp32 checkpoint is
read before it is quantized). Ratios are the medians of the per-round ratios to fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ("fp32", "int8", "int4")

CHILD = r"""
import json, resource, sys, time, torch
import transformers as T
import adapterkit as ak
from adapterkit.apps.models import smollm2
from adapterkit.core.quantize import base_bytes, quantize_base
bits, steps, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
T.logging.set_verbosity_error()
path = smollm2()
tok = T.AutoTokenizer.from_pretrained(path)
model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
if bits != "fp32":
    quantize_base(model, bits)
size = base_bytes(model)
torch.manual_seed(0)
ak.add_adapter(model, "a", "lora", r=8)
ak.train_adapter(model, "a", train_head=False)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
batch = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
def step():
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward(); opt.step(); opt.zero_grad()
    return loss.item()
start = time.perf_counter()
for _ in range(steps):
    step()
train_s = time.perf_counter() - start
model.eval()
question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
inputs = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    gen_s = time.perf_counter() - start
answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"base_bytes": size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_tokens_per_s": 8 * 64 * steps / train_s, "gen_tokens_per_s": new_tokens / gen_s,
                  "answer": answer}))
"""


def run(bits: str, steps: int, new_tokens: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, bits, str(steps), str(new_tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--output", default=str(HERE / "results_quantize.md"))
    parser.add_argument("--note", default="", help="a line added under the table (e.g. other load on the CPU)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
        for bits in order:
            results[bits].append(run(bits, args.steps, args.new_tokens))
            print(r, bits, results[bits][-1], flush=True)
    Path(args.output).write_text(report(results, args))


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    keys = ("base_bytes", "peak_rss_mb", "train_tokens_per_s", "gen_tokens_per_s")
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r=8 (default targets), 2 threads; train: batch 8 x 64 tokens, {args.steps} "
        f"timed AdamW step(s) (the first included); generation: {args.new_tokens} greedy tokens after a 4-token "
        f"warm-up; {args.rounds} alternating rounds, "
        "one fresh process per configuration and round.",
        "",
        "| round | base | base bytes | peak RSS (MB) | train tokens/s | generation tokens/s | answer |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in range(args.rounds):
        for bits in CONFIGS:
            m = results[bits][r]
            lines.append(
                f"| {r} | {bits} | {m['base_bytes']:,} | {m['peak_rss_mb']:.0f} | {m['train_tokens_per_s']:.1f} "
                f"| {m['gen_tokens_per_s']:.1f} | {m['answer'][:40]!r} |"
            )
    lines += ["", "Median of the per-round ratios to fp32:", "", "| base | " + " | ".join(keys) + " |"]
    lines.append("|---|" + "---:|" * len(keys))
    for bits in CONFIGS[1:]:
        ratios = [
            statistics.median(results[bits][r][k] / results["fp32"][r][k] for r in range(args.rounds)) for k in keys
        ]
        lines.append(f"| {bits} / fp32 | " + " | ".join(f"{x:.3f}" for x in ratios) + " |")
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
