"""``adapterkit train --fsdp`` on SmolLM2-135M: 1 process vs 2 gloo ranks with DDP and with FSDP2 (CPU).

    .venv/bin/python benchmarks/bench_fsdp.py [--steps 4] [--output benchmarks/results_fsdp.md]

Same model (SmolLM2-135M-Instruct, real weights, fp32), same data (VADER movie-review snippets joined
and cut into rows of 80 words, so that every row is exactly ``--max-length`` 64 tokens: the ranks'
token means then weigh the same as one process's), LoRA (preset defaults), causal-lm, global batch 4,
lr 1e-3, no evaluation, 1 torch thread per process. Each run is fresh processes (``torchrun
--standalone --nproc_per_node=2`` for the two distributed ones), each rank running ``adapterkit``'s
CLI in this script's worker mode, which records its memory: peak RSS of the whole process (loading
included), RSS once the model is wrapped (sharded) and the peak RSS while training (``VmHWM`` reset
through ``/proc/self/clear_refs`` after wrapping). Parameter shares come from ``metrics.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def memory() -> dict[str, float]:
    """This process's resident and peak resident memory (MiB) from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def worker(report: Path, argv: list[str]) -> None:
    """Run ``adapterkit`` with ``argv`` and write this rank's memory to ``report``/rank-N.json."""
    from adapterkit.apps import cli
    from adapterkit.training.distributed import Distributed

    seen: dict[str, float] = {}
    wrap = Distributed.wrap

    def measured_wrap(self, model, **kwargs):
        wrapped = wrap(self, model, **kwargs)
        gc.collect()
        seen["rss_after_wrap_mib"] = memory()["VmRSS"]
        seen["peak_before_training_mib"] = memory()["VmHWM"]
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the training's own peak from here
        return wrapped

    Distributed.wrap = measured_wrap
    assert cli.main(argv) == 0
    seen["peak_while_training_mib"] = memory()["VmHWM"]
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))


def rows(folder: Path, n: int) -> Path:
    from adapterkit.apps.data import sentiment_splits

    words = " ".join(t for t, _ in sentiment_splits("movieReviewSnippets", seed=0)["train"]).split()
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[i * 80 : (i + 1) * 80])}) + "\n" for i in range(n)))
    return path


def run(name: str, work: Path, model: Path, steps: int, launcher: list[str], *extra: str) -> dict:
    out, report = work / name, work / f"{name}-memory"
    argv = ["train", "--model", str(model), "--data", str(work / "train.jsonl"), "--task", "causal-lm"]
    argv += ["--adapter", "lora", "--max-steps", str(steps), "--batch-size", "4", "--max-length", "64"]
    argv += ["--save-steps", str(steps), "--threads", "1", "--output", str(out), *extra]
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", str(report), "--", *argv]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = [json.loads(f.read_text()) for f in sorted(report.glob("rank-*.json"))]
    return {"name": name, "metrics": metrics, "ranks": ranks, "adapter": out / "adapter"}


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def table(runs: list[dict], single: dict) -> list[str]:
    lines = ["| run | loss per step | max abs loss diff vs 1 proc | max abs adapter diff vs 1 proc | base params "
             "held per rank (share) | s/step | RSS after wrap, MiB | peak RSS training, MiB | peak RSS whole, MiB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    one = [v for _, v in single["metrics"]["history"]["loss"]]
    for r in runs:
        m, d = r["metrics"], r["metrics"]["distributed"]
        losses = [v for _, v in m["history"]["loss"]]
        held = d.get("base_params_per_rank") or [m["total_params"] - m["trainable_params"]] * d["world_size"]
        share = d.get("base_share_per_rank") or [1.0] * d["world_size"]
        per_step = 4 / m["train_examples_per_s"]
        cells = [
            r["name"],
            ", ".join(f"{v:.6f}" for v in losses),
            f"{max(abs(a - b) for a, b in zip(losses, one, strict=True)):.2e}",
            f"{max_diff(r['adapter'], single['adapter']):.2e}",
            " / ".join(f"{n:,} ({s:.3f})" for n, s in zip(held, share, strict=True)),
            f"{per_step:.2f}",
            " / ".join(f"{x['rss_after_wrap_mib']:.0f}" for x in r["ranks"]),
            " / ".join(f"{x['peak_while_training_mib']:.0f}" for x in r["ranks"]),
            " / ".join(f"{x['peak_before_training_mib']:.0f}" for x in r["ranks"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--output", default=str(HERE / "results_fsdp.md"))
    p.add_argument("--model", help="another transformers folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.argv)
    from adapterkit.apps.models import smollm2

    model = Path(args.model) if args.model else smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows(work, 4 * args.steps)
        single = run("1 process", work, model, args.steps, [sys.executable])
        ddp = run("2 ranks DDP", work, model, args.steps, LAUNCH)
        fsdp = run("2 ranks FSDP", work, model, args.steps, LAUNCH, "--fsdp")
        lines = table([single, ddp, fsdp], single)
        total, trainable = single["metrics"]["total_params"], single["metrics"]["trainable_params"]
        ddp_vs_fsdp = max_diff(ddp["adapter"], fsdp["adapter"])
    head = [
        f"# `adapterkit train --fsdp` on {model.name} (CPU, gloo)",
        "",
        f"`{' '.join(sys.argv)}`; torch {__import__('torch').__version__}; {args.steps} steps, global batch 4, "
        f"max length 64, LoRA; {total:,} parameters of which {trainable:,} train (base: {total - trainable:,}).",
        "Per-rank values are rank 0 / rank 1. s/step: training loop only (4 / train_examples_per_s). "
        "RSS after wrap: the process once the model is wrapped (sharded); peak RSS training: the peak from "
        "then to the end; peak RSS whole: the peak up to wrapping (the full model is loaded on every rank).",
        "",
        *lines,
        "",
        f"Max abs adapter difference DDP vs FSDP: {ddp_vs_fsdp:.2e}.",
    ]
    Path(args.output).write_text("\n".join(head) + "\n")
    print("\n".join(head))


if __name__ == "__main__":
    main()
