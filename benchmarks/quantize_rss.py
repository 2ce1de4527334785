"""Peak RSS, phase by phase, of a short ``adapterkit train`` LLM run with an fp32, int8 or int4 frozen base.

    .venv/bin/python benchmarks/quantize_rss.py [--bases fp32 int8] [--rounds 1] [--steps 4] [--extra OPTIONS]
        [--label TEXT] [--output FILE]

Each run is a fresh process: ``adapterkit train --task chat`` on SmolLM2-135M-Instruct (LoRA r=16 / alpha 32
on all 7 projections, batch 8, 128 tokens, AdamW; the README's conversations), 2 threads. Inside it,
``task_model``, ``quantize_base``, ``build_model`` and each step's end are wrapped to record, at each phase
boundary, VmRSS (resident now) and VmHWM (the highest resident since the previous boundary: the kernel's
high-water mark is reset there through ``/proc/self/clear_refs``). The run's peak is the highest VmHWM
of its phases (the reset resets ``ru_maxrss`` too, so ``ru_maxrss`` at the end is the last phase's).
RSS does not depend on the CPU's load, but ``uptime`` is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = r"""
import json, sys
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
phases = []
def mark(name):
    phases.append({"phase": name, **status()})
    try:  # from here on, VmHWM is the peak of the next phase
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
import torch
from adapterkit.apps import cli
from adapterkit.core import quantize
from adapterkit.training import loop, models
mark("imports")
def wrap(owner, name, label):
    inner = getattr(owner, name)
    def wrapper(*a, **k):
        out = inner(*a, **k)
        mark(label)
        return out
    setattr(owner, name, wrapper)
wrap(models, "task_model", "load")
wrap(quantize, "quantize_base", "quantize")
wrap(loop, "build_model", "build")
after_step = loop.Run._after_step
def step_end(self, *a, **k):
    after_step(self, *a, **k)
    mark("step 1" if self.loop.position.step == 1 else f"step {self.loop.position.step}")
loop.Run._after_step = step_end
code = cli.main(sys.argv[1:])
mark("end")
print("RSS " + json.dumps({"phases": phases, "peak": max(p["VmHWM"] for p in phases)}))
sys.exit(code)
"""


def conversations(folder: Path) -> Path:
    """The README's "LLM recipes" data: every training conversation of the LLM demo's tasks."""
    from adapterkit.apps.llm_data import task_splits

    rows = [c for task in task_splits().values() for c in task["train"]]
    path = folder / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in rows))
    return path


def command(model: str, data: Path, out: Path, base: str, steps: int, extra: list[str]) -> list[str]:
    """The ``adapterkit train`` arguments (after ``-c CHILD``) of one run."""
    cmd = ["train", "--model", model, "--data", str(data), "--output", str(out), "--task", "chat"]
    cmd += ["--adapter", "lora", "--set", "r=16", "--set", "alpha=32", "--set", f"target_modules={json.dumps(TARGETS)}"]
    cmd += ["--max-steps", str(steps), "--batch-size", "8", "--max-length", "128", "--lr", "2e-4"]
    cmd += ["--save-steps", "100000", "--threads", "2"]
    return cmd + ([] if base == "fp32" else ["--quantize", base]) + extra


def run(model: str, data: Path, folder: Path, base: str, steps: int, extra: list[str]) -> dict:
    """One fresh process: its phases (VmRSS, VmHWM in MiB) and its ``ru_maxrss`` peak."""
    out = folder / f"out-{base}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-c", CHILD, *command(model, data, out, base, steps, extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{base} failed:\n{proc.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RSS "))
    return json.loads(line[4:])


def table(runs: list[tuple[str, int, dict]]) -> list[str]:
    """Markdown: per run, each phase's VmRSS at its end / VmHWM during it (MiB), and the peak."""
    longest = max((result["phases"] for _, _, result in runs), key=len)
    names = list(dict.fromkeys(p["phase"] for p in longest))
    lines = ["| base | round | " + " | ".join(names) + " | peak |"]
    lines.append("|---|---:|" + "---:|" * (len(names) + 1))
    for base, r, result in runs:
        seen = {p["phase"]: f"{p['VmRSS']:.0f} / {p['VmHWM']:.0f}" for p in result["phases"]}
        cells = [seen.get(name, "-") for name in names]
        lines.append(f"| {base} | {r} | " + " | ".join(cells) + f" | **{result['peak']:.0f}** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--extra", default="", help="more `adapterkit train` options: '--autocast bf16 --packing'")
    parser.add_argument("--label", default="", help="a heading for this run's table (e.g. before / after)")
    parser.add_argument("--output", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    from adapterkit.apps.models import smollm2

    model = str(smollm2())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = conversations(Path(tmp))
        for r in range(args.rounds):
            for base in args.bases[r % len(args.bases) :] + args.bases[: r % len(args.bases)]:
                result = run(model, data, Path(tmp), base, args.steps, shlex.split(args.extra))
                runs.append((base, r, result))
                print(f"{base} round {r}: {json.dumps(result)}", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    options = f"options added: `{args.extra}`; " if args.extra else ""
    lines = [f"### {args.label}".rstrip(), "", f"{options}`uptime` after the runs: {load}", "", *table(runs), ""]
    print("\n".join(lines))
    if args.output:
        with args.output.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
