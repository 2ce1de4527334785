"""``adapterkit serve`` with many more adapters on disk than it keeps loaded: the time to first token of a
request whose adapter must be loaded, and whether the server's memory stays flat over a long run.

    .venv/bin/python benchmarks/serve_soak.py [--adapters 1000] [--resident 64] [--requests 10000]
        [--output benchmarks/results_serve_soak.md]

SmolLM2-135M-Instruct (fp32), the real server in its own process (2 torch threads), ``--adapters`` LoRAs
(r=8 on q/v, random weights; each written as adapterkit saves one: its config and a safetensors file) named
on the command line, at most ``--resident`` kept loaded (``--max-adapters``). 16 client threads send
``--requests`` streamed completions (a short prompt, 2 tokens, greedy), each for an adapter drawn uniformly
at random. A request counts as *cold* when its adapter was not among the last ``--resident`` distinct
adapters asked for (the server's LRU must have evicted it, so it loads from disk), *warm* when it was asked
for in the last 16 requests. The server's RSS (``/proc``) is read every 500 requests; after the first
20% (warm-up: the LRU filled, the allocator settled) it should stay within 10%.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import Server, pct, quiet_line, request  # noqa: E402

PROMPT = "Say hello."


def adapters(model_dir: str, folder: Path, count: int) -> dict[str, str]:
    """``count`` LoRAs: one saved by adapterkit, the rest its copies with other random weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import adapterkit as ak

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ak.add_adapter(model, "a0", "lora", r=8)
    ak.save_adapter(model, "a0", folder / "a0")
    first = folder / "a0"
    weights = next(p for p in first.iterdir() if p.suffix == ".safetensors")
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(0)
    out = {"a0": str(first)}
    for i in range(1, count):
        target = folder / f"a{i}"
        shutil.copytree(first, target)
        save_file({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in tensors.items()}, target / weights.name)
        out[f"a{i}"] = str(target)
    return out


def rss(pid: int) -> int:
    """The process's resident set, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--resident", type=int, default=64)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--output")
    args = p.parse_args()
    from adapterkit.apps.models import smollm2

    model_dir = str(smollm2())
    rng = random.Random(0)
    order = [f"a{rng.randrange(args.adapters)}" for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        sources = adapters(model_dir, Path(tmp), args.adapters)
        server = Server(model_dir, sources, args.clients, extra=["--max-adapters", str(args.resident)])
        lock, recent, kinds, samples = threading.Lock(), collections.OrderedDict(), {}, []
        ttft: dict[str, list[float]] = {"cold": [], "warm": [], "all": []}
        done = 0

        def one(k: int) -> None:
            nonlocal done
            name = order[k]
            with lock:  # the server's LRU as the clients can know it: the last distinct adapters asked for
                kind = "warm" if name in order[max(0, k - 16) : k] else "cold" if name not in recent else "other"
                recent[name] = None
                recent.move_to_end(name)
                while len(recent) > args.resident:
                    recent.popitem(last=False)
            first, _, _ = request(server.url, name, tokens=2, prompt=PROMPT)
            with lock:
                kinds[k] = kind
                ttft["all"].append(first)
                if kind in ttft:
                    ttft[kind].append(first)
                done += 1
                if done % 500 == 0:
                    samples.append((done, rss(server.process.pid)))

        quiet = quiet_line()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(one, range(args.requests)))
        finally:
            server.stop()
        seconds = time.perf_counter() - started
    after = [b for n, b in samples if n > args.requests * 0.2]
    spread = max(after) / min(after) - 1
    lines = [
        f"SmolLM2-135M-Instruct, fp32 base, 2 threads; {args.adapters} LoRA adapters (r=8, q/v) on disk, "
        f"`--max-adapters {args.resident}`; {args.requests} streamed completions of 2 tokens from "
        f"{args.clients} clients, each for a uniformly random adapter; {seconds:.0f} s in all.",
        "",
        f"- {quiet}",
        "",
        "| requests | count | TTFT p50 | TTFT p99 |",
        "|---|---:|---:|---:|",
        *[
            f"| {k} | {len(v)} | {pct(v, 0.5):.3f} s | {pct(v, 0.99):.3f} s |"
            for k, v in [("cold (loaded from disk)", ttft["cold"]), ("warm", ttft["warm"]), ("all", ttft["all"])]
            if v
        ],
        "",
        "| after requests | server RSS |",
        "|---:|---:|",
        *[f"| {n} | {b / 2**20:.0f} MiB |" for n, b in samples],
        "",
        f"RSS after warm-up (the first 20% of requests): {min(after) / 2**20:.0f}-{max(after) / 2**20:.0f} MiB, "
        f"a spread of **{spread:.1%}** (target: within 10%); mean {statistics.mean(after) / 2**20:.0f} MiB.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
