"""ONNX Runtime export of the demo's MiniLM sentiment classifier: PyTorch fp32 vs ONNX fp32 vs ONNX int8.

A LoRA adapter (r=8 on query and value) trains with the demo's loop, split and learning rate (``adapterkit
demo``'s ``lora`` row: 1.75 epochs over the 8,454 training sentences; ``--quick``: the quick demo's 2,400 for one
pass), is saved, and ``export_onnx`` writes it as an fp32 and an int8 graph. Each runtime is then measured in a
subprocess of its own (2 threads): load time (after imports: ``from_pretrained`` + ``load_adapter``, or the
onnxruntime session), examples/s at batch 1 (the first 200 test sentences) and batch 32 (the whole test split,
length-bucketed, one warm-up batch first), peak RSS of the process, and accuracy on the test split (1,058
sentences). The subprocesses read the same pre-tokenized sentences (the demo's tokenizer, max length 64), so
tokenizing is timed in none; the ONNX ones import neither torch nor transformers. ``/work/shared/tools/quiet``
runs before each timed subprocess (waiting up to ``$QUIET_WAIT`` s, default 300) and its line is recorded.

``rows()`` is what ``benchmarks/bench_export.py`` imports; ``python benchmarks/export_onnx_rows.py [--quick]``
prints the table (``--output FILE``: also writes it as Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUIET = "/work/shared/tools/quiet"
QUIET_WAIT = os.environ.get("QUIET_WAIT", "300")  # seconds quiet waits for the machine to calm down
THREADS = 2
BATCH = 32
SINGLE = 200  # sentences timed one at a time


def rows(quick: bool = False, train_threads: int = THREADS) -> list[dict[str, Any]]:
    """One row per runtime (PyTorch fp32, ONNX fp32, ONNX int8), measured in subprocesses.

    ``quick``: train on the quick demo's split; ``train_threads``: torch threads while training (1 runs faster
    than 2 when other processes share the cores; the timed rounds always use 2)."""
    with tempfile.TemporaryDirectory(prefix="export-onnx-bench-") as tmp:
        work = Path(tmp)
        training = train_adapter(work / "adapter", work / "test.json", quick, train_threads)
        exports = export_graphs(work)
        out = []
        for runtime, where in (("PyTorch fp32", work / "adapter"), *exports.items()):
            row = measure(runtime, where, work / "test.json")
            out.append({**row, **training, "files_mb": files_mb(runtime, where)})
        return out


def train_adapter(folder: Path, test_file: Path, quick: bool, threads: int) -> dict[str, Any]:
    """The demo's LoRA row, trained and saved; the test split written pre-tokenized."""
    import torch

    from adapterkit.apps import demo
    from adapterkit.apps.data import sentiment_splits
    from adapterkit.core import adapters, io

    torch.set_num_threads(threads)
    raw = sentiment_splits("movieReviewSnippets", seed=0)
    run = next(r for r in demo.RUNS if r.preset == "lora")
    if quick:
        raw["train"], run = raw["train"][: demo.QUICK_SIZES["train"]], demo.quick_run(run)
    train, test = demo.encode(raw["train"]), demo.encode(raw["test"])
    model = demo.load_model()
    adapters.add_adapter(model, "sentiment", "lora")
    adapters.train_adapter(model, "sentiment")
    seconds = demo.train(model, train, run)
    io.save_adapter(model, "sentiment", folder)
    test_file.write_text(json.dumps(test))
    split = f"{'quick' if quick else 'full'} train split ({len(train)} sentences, {run.epochs:g} epochs, lr {run.lr:g})"
    return {"trained_on": split, "train_s": seconds, "train_threads": threads}


def export_graphs(work: Path) -> dict[str, Path]:
    from adapterkit.apps.demo import model_path
    from adapterkit.export.onnx import export_onnx

    return {
        "ONNX fp32": export_onnx(model_path(), str(work / "adapter"), str(work / "fp32")),
        "ONNX int8": export_onnx(model_path(), str(work / "adapter"), str(work / "int8"), quantize="int8"),
    }


def files_mb(runtime: str, where: Path) -> dict[str, float]:
    """What each runtime loads from disk: the base checkpoint and the adapter folder, or the one graph."""
    if runtime.startswith("PyTorch"):
        from adapterkit.apps.demo import model_path

        base = sum(f.stat().st_size for f in Path(model_path()).glob("*.safetensors"))
        adapter = sum(f.stat().st_size for f in where.iterdir())
        return {"base": base / 1e6, "adapter": adapter / 1e6}
    return {"graph": sum(f.stat().st_size for f in where.glob("model.onnx*")) / 1e6}


def measure(runtime: str, where: Path, test_file: Path) -> dict[str, Any]:
    """Run this script's ``--measure`` in a fresh process, after the quiet check."""
    quiet = subprocess.run([QUIET, QUIET_WAIT], capture_output=True, text=True).stdout.strip()
    cmd = [sys.executable, __file__, "--measure", runtime, str(where), str(test_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"runtime": runtime, **json.loads(done.stdout.strip().splitlines()[-1]), "quiet": quiet}


# The subprocess side.


def batches(data: list, size: int) -> list:
    """Length-sorted batches of ``(ids (B, T) int64, mask, labels)``, padded with MiniLM's [PAD] 0."""
    import numpy as np

    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    out = []
    for start in range(0, len(order), size):
        group = [data[i] for i in order[start : start + size]]
        ids = np.zeros((len(group), max(len(s) for s, _ in group)), dtype=np.int64)
        for row, (seq, _) in enumerate(group):
            ids[row, : len(seq)] = seq
        out.append((ids, (ids != 0).astype(np.int64), np.array([label for _, label in group])))
    return out


def torch_predictor(adapter: Path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from adapterkit.apps.demo import model_path
    from adapterkit.core.io import load_adapter

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2).eval()
    load_adapter(model, adapter, activate=True)
    loaded = time.perf_counter() - start

    @torch.no_grad()
    def predict(ids, mask):
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()

    return predict, loaded


def onnx_predictor(folder: Path):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    start = time.perf_counter()
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter() - start
    names = [i.name for i in session.get_inputs()]

    def predict(ids, mask):
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return session.run(None, {n: feed[n] for n in names})[0]

    return predict, loaded


def measure_here(runtime: str, where: Path, test_file: Path) -> dict[str, Any]:
    data = json.loads(test_file.read_text())
    predict, loaded = (torch_predictor if runtime.startswith("PyTorch") else onnx_predictor)(where)
    big, single = batches(data, BATCH), batches(data[:SINGLE], 1)
    predict(*big[0][:2])  # warm-up
    start = time.perf_counter()
    correct = sum(int((predict(ids, mask).argmax(-1) == labels).sum()) for ids, mask, labels in big)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for ids, mask, _ in single:
        predict(ids, mask)
    alone = time.perf_counter() - start
    return {
        "load_s": loaded,
        "ex_s_b1": len(single) / alone,
        "ex_s_b32": len(data) / batched,
        "test_acc": correct / len(data),
        "test_n": len(data),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``: reset by exec, unlike ``ru_maxrss``, which a subprocess
    inherits from the parent it was forked from)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table, ratios against the PyTorch fp32 row."""
    ref = next(r for r in rows if r["runtime"].startswith("PyTorch"))
    lines = [
        "| runtime | files on disk | load | ex/s batch 1 | ex/s batch 32 | peak RSS | test acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        files = " + ".join(f"{k} {v:.1f} MB" for k, v in r["files_mb"].items())
        speed = [f"{r[k]:.0f} ({r[k] / ref[k]:.2f}x)" for k in ("ex_s_b1", "ex_s_b32")]
        lines.append(
            f"| {r['runtime']} | {files} | {r['load_s']:.2f} s | {speed[0]} | {speed[1]} | "
            f"{r['peak_rss_mb']:.0f} MB | {100 * r['test_acc']:.1f} |"
        )
    return "\n".join(lines)


def report(rows: list[dict[str, Any]]) -> str:
    """The table, the training it measured, and each subprocess's quiet line."""
    first = rows[0]
    head = (
        f"MiniLM-L6 + LoRA (r=8) trained on the demo's {first['trained_on']} in {first['train_s']:.0f} s "
        f"({first['train_threads']} torch threads); every timed round on {THREADS} threads, test split "
        f"{first['test_n']} sentences."
    )
    quiet = "\n".join(f"- {r['runtime']}: `{r['quiet']}`" for r in rows)
    return f"{head}\n\n{table(rows)}\n\nBefore each timed subprocess:\n{quiet}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train on the quick demo's split (2,400, one pass)")
    parser.add_argument("--train-threads", type=int, default=THREADS, help="torch threads while training")
    parser.add_argument("--output", help="also write the report to this Markdown file")
    parser.add_argument("--measure", nargs=3, metavar=("RUNTIME", "WHERE", "TEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        runtime, where, test = args.measure
        print(json.dumps(measure_here(runtime, Path(where), Path(test))))
        return
    text = report(rows(args.quick, args.train_threads))
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
