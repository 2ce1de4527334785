"""Import times of adapterkit's entry points beside peft's, each in a fresh interpreter, same venv.

``python benchmarks/import_times.py [rounds]``: median wall time of ``python -c "import X"`` minus that
of ``python -c "pass"`` over alternating rounds; also whether torch got imported.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

TARGETS = [
    "adapterkit",
    "adapterkit.hub.server",
    "adapterkit.core.adapters",
    "peft",
]


def once(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main(rounds: int = 5) -> None:
    times: dict[str, list[float]] = {t: [] for t in ["(empty)", *TARGETS]}
    for _ in range(rounds):
        for target in times:
            times[target].append(once("pass" if target == "(empty)" else f"import {target}"))
    base = statistics.median(times.pop("(empty)"))
    print("| import | median s (minus an empty interpreter) | imports torch |")
    print("|---|---:|---|")
    for target, seconds in times.items():
        torch = subprocess.run(
            [sys.executable, "-c", f"import sys, {target}; print('torch' in sys.modules)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"| `import {target}` | {statistics.median(seconds) - base:.3f} | {torch} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
