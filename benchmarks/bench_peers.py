"""adapterkit vs peft 0.21.2 vs AdapterHub adapters 1.3.0, measured in one run, alternating.

    .venv/bin/python benchmarks/bench_peers.py [--rounds 2] [--output benchmarks/results_peers.md]

Each peer gets its own venv under ``benchmarks/.venvs/`` (created on first use from PyPI; adapters
pins transformers 4.57). Every (library, method) pair runs in a fresh process
(``peer_worker.py``) on a bert-base config with random weights, batch 16, seq 128, 2 threads. Times
are reported as ratios to a baseline measured by the same library: training step vs that
library's full fine-tuning step (a separate process), inference vs the bare model with the same
weights, run alternately in the same process (median of the paired ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
PEERS = {
    "peft": ["torch==2.13.0", "transformers==5.24.0", "peft==0.21.2"],
    "adapters": ["torch==2.13.0", "adapters==1.3.0"],
}
METHODS = ["none", "pfeiffer", "houlsby", "lora", "dora", "ia3", "prefix", "prompt"]


def python_for(lib: str) -> str:
    if lib == "adapterkit":
        return sys.executable
    venv = VENVS / lib
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEERS[lib]], check=True)
    return str(venv / "bin" / "python")


SKIPPED: dict[tuple[str, str], str] = {}


def measure(lib: str, method: str) -> dict | None:
    cmd = [python_for(lib), str(HERE / "peer_worker.py"), lib, method]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{lib} {method} failed:\n{out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if "skip" in result:
        SKIPPED[(lib, method)] = result["skip"]
        return None
    return result


def run(rounds: int) -> dict[tuple[str, str], list[dict]]:
    libs = ["adapterkit", "peft", "adapters"]
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for method in METHODS:
            for lib in libs[r % 3 :] + libs[: r % 3]:  # rotate who goes first
                result = measure(lib, method)
                if result is not None:
                    results.setdefault((lib, method), []).append(result)
                    print(json.dumps(result), flush=True)
    return results


def med(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def report(results: dict[tuple[str, str], list[dict]]) -> str:
    lines = [
        "| method | library | trainable | step / full-FT step | inference overhead | merged LoRA overhead "
        "| peak RSS (MB) | saved size |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS[1:]:
        for lib in ["adapterkit", "peft", "adapters"]:
            rows = results.get((lib, method))
            if not rows:
                continue
            full = results[(lib, "none")]
            step = med(rows, "step_s") / med(full, "step_s")
            infer = med(rows, "infer_ratio") - 1
            merged = (
                f"{100 * (med(rows, 'merged_ratio') - 1):+.1f}%"
                if "merged_ratio" in rows[0]
                else ("fails" if "merge_error" in rows[0] else "n/a")
            )
            lines.append(
                f"| {method} | {lib} | {rows[0]['trainable']:,} | {step:.3f} | {100 * infer:+.1f}% | {merged} "
                f"| {med(rows, 'peak_rss_mb'):.0f} | {rows[0]['saved_bytes'] / 1e6:.2f} MB |"
            )
    for (lib, method), reason in sorted(SKIPPED.items()):
        lines.append(f"\nnot measured: {lib} {method}: {reason}")
    for lib in ["adapterkit", "peft", "adapters"]:
        if (lib, "none") in results:
            full = results[(lib, "none")]
            lines.append(
                f"\n{lib}: full fine-tuning step {med(full, 'step_s'):.2f} s, bare inference "
                f"{med(full, 'base_infer_s'):.2f} s (medians)"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS[1:]), help="comma-separated subset")
    parser.add_argument("--output", default=str(HERE / "results_peers.md"))
    parser.add_argument("--setup", action="store_true", help="only create the peers' venvs (for tests and CI)")
    args = parser.parse_args()
    if args.setup:
        print(*(python_for(lib) for lib in PEERS))
        return
    METHODS[1:] = args.methods.split(",")
    text = report(run(args.rounds))
    print(text)
    header = "bert-base config, random weights, batch 16, seq 128, 2 threads; medians over rounds.\n\n"
    Path(args.output).write_text(header + text + "\n")


if __name__ == "__main__":
    main()
