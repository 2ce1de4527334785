"""What bounds the serving engine's time to first token under a burst: prefill cost, and why it runs alone.

    .venv/bin/python benchmarks/serve_prefill_bound.py [--output benchmarks/results_serve_prefill_bound.md]

SmolLM2-135M-Instruct (fp32, 2 threads). (1) 16 prompts of 20 tokens prefilled one at a time (as the
engine does) vs in one batched forward, alternating rounds, best of each. (2) The row-count classes of
this CPU's matmul for SmolLM2's linear shapes: the row counts M at which row 0's result changes (its
values alone are fed each time, so only M differs). A batched prefill feeds ``sum of prompt lengths``
rows; a request's logits would then depend on who else arrived with it, unless every class boundary
was avoided.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536), "down_proj": (1536, 576)}


def best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def row_classes(fan_in: int, fan_out: int, largest: int = 1200) -> list[int]:
    """The row counts at which row 0 of ``x[:M] @ W.T`` starts to differ from the previous count's."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(fan_out, fan_in, generator=g), torch.randn(largest, fan_in, generator=g)
    starts, previous = [], None
    for m in range(1, largest):
        row = F.linear(x[:m], weight)[0]
        if previous is None or not torch.equal(row, previous):
            starts.append(m)
        previous = row
    return starts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from adapterkit.apps.models import smollm2

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2()), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 40000, (16, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = best(lambda: [model(ids[i : i + 1], logits_to_keep=1) for i in range(16)])
        batched = best(lambda: model(ids, logits_to_keep=1))
        alone = min(alone, best(lambda: [model(ids[i : i + 1], logits_to_keep=1) for i in range(16)]))
    lines = [
        "SmolLM2-135M-Instruct, fp32, 2 threads; 16 prompts of 20 tokens.",
        "",
        f"- prefilled one at a time: {alone:.3f} s; in one batched forward: {batched:.3f} s "
        f"(**{alone / batched:.2f}x** faster batched); one prompt alone: {alone / 16:.3f} s.",
        "",
        "| linear (in, out) | row counts M where row 0's result changes |",
        "|---|---|",
        *[f"| {name} {shape} | {', '.join(map(str, row_classes(*shape)))} |" for name, shape in SHAPES.items()],
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
