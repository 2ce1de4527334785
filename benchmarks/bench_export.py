"""On-device export: llama.cpp (GGUF f32 / f16 / q8_0, base + one task's LoRA adapter file) against PyTorch fp32.

    .venv/bin/python benchmarks/bench_export.py [--only gguf|onnx] [--output benchmarks/results_export.md]

SmolLM2-135M-Instruct with one task's adapter: adapterkit's ``lora`` preset (r=8, alpha=8, q_proj and v_proj,
as ``adapterkit llm-demo`` trains it), B random with a fixed seed (a trained adapter has the same size and
cost). Each runtime is measured in its own fresh process (2 threads): load time (model + adapter, until it can
generate), single-stream greedy tokens/s (64 new tokens after a short prompt, after one warm-up run), peak RSS
(the worker's ``VmHWM``), and greedy-token agreement with PyTorch fp32 on 8 prompts x 16 tokens (tokens equal at
equal positions; prompts identical in full). llama.cpp runs through llama-cpp-python (built by scripts/setup.sh) with
the adapter loaded at run time (``lora_path``). The ONNX rows come from ``benchmarks/export_onnx_rows.py``
(``rows()``), when that file exists. ``../shared/tools/quiet`` runs before each timed round; its line is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

TYPES = ("f32", "f16", "q8_0")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\nx =",
    "Water boils at a temperature of",
    "<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n",
]
AGREE_TOKENS, SPEED_TOKENS, THREADS = 16, 64, 2


def quiet_line() -> str:
    """The machine's quiet check (../shared/tools/quiet) before a timed round, as the result records it."""
    tool = HERE.parents[1] / "shared" / "tools" / "quiet"
    if not tool.exists():
        return "quiet: tool not found"
    return subprocess.run([sys.executable, str(tool), "60"], capture_output=True, text=True).stdout.strip()


def make_adapter(folder: Path) -> Path:
    """One task's adapter (the ``lora`` preset), saved beside the base."""
    import torch
    import transformers as T

    import adapterkit as ak
    from adapterkit.apps.models import smollm2

    model = T.AutoModelForCausalLM.from_pretrained(smollm2(), dtype=torch.float32)
    ak.add_adapter(model, "task", "lora")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ak.save_adapter(model, "task", folder / "adapter")


def worker(kind: str, base: str, adapter: str) -> dict:
    """Run in a fresh process: load, warm up, time generation, agreement tokens, peak RSS."""
    import time

    start = time.perf_counter()
    generate = load_llama(base, adapter) if kind == "llama" else load_torch(base, adapter)
    loaded = time.perf_counter() - start
    prompt = PROMPTS[0]
    generate(prompt, 8)  # warm-up
    start = time.perf_counter()
    tokens = generate(prompt, SPEED_TOKENS)
    seconds = time.perf_counter() - start
    assert len(tokens) == SPEED_TOKENS
    agree = [generate(p, AGREE_TOKENS) for p in PROMPTS]
    # VmHWM, this process's own peak: ru_maxrss keeps the parent's RSS at fork across exec on Linux
    status = Path("/proc/self/status").read_text().splitlines()
    rss = int(next(x for x in status if x.startswith("VmHWM")).split()[1]) / 1024
    return {"load_s": loaded, "tokens_per_s": SPEED_TOKENS / seconds, "rss_mb": rss, "tokens": agree}


def load_torch(base: str, adapter: str):
    import torch
    import transformers as T

    import adapterkit as ak

    torch.set_num_threads(THREADS)
    model = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    ak.load_adapter(model, adapter, activate=True)

    def generate(prompt: str, n: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        return out[0, ids.shape[1] :].tolist()

    return generate


def load_llama(base: str, adapter: str):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=base, lora_path=adapter, n_ctx=512, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False)  # fmt: skip
    n_vocab = llm.n_vocab()

    def generate(prompt: str, n: int) -> list[int]:  # greedy: the argmax of llama.cpp's logits
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
        out = []
        for _ in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            llm.eval(out[-1:])
        return out

    return generate


def measure(kind: str, base: Path, adapter: Path) -> dict:
    """A timed round in its own process, after the quiet check."""
    quiet = quiet_line()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    args = [sys.executable, __file__, "--worker", kind, str(base), str(adapter)]
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{run.stderr[-3000:]}")
    result = {**json.loads(run.stdout.strip().splitlines()[-1]), "quiet": quiet}
    print({k: v for k, v in result.items() if k != "tokens"}, file=sys.stderr, flush=True)
    return result


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    same = sum(a == b for row, ref in zip(tokens, reference, strict=True) for a, b in zip(row, ref, strict=True))
    whole = sum(row == ref for row, ref in zip(tokens, reference, strict=True))
    return f"{100 * same / sum(map(len, reference)):.0f}% ({whole}/{len(reference)} prompts)"


def gguf_rows(work: Path) -> tuple[list[dict], list[str]]:
    from adapterkit.apps.models import smollm2
    from adapterkit.export.gguf import export_gguf

    base_dir = smollm2()
    adapter = work / "adapter" if (work / "adapter" / "adapter.safetensors").exists() else make_adapter(work)
    torch_run = measure("torch", base_dir, adapter)
    sizes = (base_dir / "model.safetensors").stat().st_size, (adapter / "adapter.safetensors").stat().st_size
    rows = [row("PyTorch fp32 (transformers + adapterkit)", "fp32", sizes, torch_run, torch_run)]
    quiets = [f"PyTorch fp32: {torch_run['quiet']}"]
    for kind in TYPES:
        out = work / kind
        if not (out / "export.json").exists():  # a rerun measures the files an earlier run wrote
            export_gguf(str(base_dir), str(adapter), out, kind)
        files = out / f"model.{kind}.gguf", out / f"task.lora.{kind}.gguf"
        run = measure("llama", *files)
        rows.append(row("llama.cpp (llama-cpp-python 0.3.36)", kind, [f.stat().st_size for f in files], run, torch_run))
        quiets.append(f"llama.cpp {kind}: {run['quiet']}")
        if kind == "q8_0":
            quiets.append(targets(run, torch_run, files))
    return rows, quiets


def targets(run: dict, ref: dict, files) -> str:
    """Issue 27's targets for q8_0: >= 3x PyTorch fp32's tokens/s, <= 0.4x its peak RSS, adapter <= 2% of base."""
    speed, rss = run["tokens_per_s"] / ref["tokens_per_s"], run["rss_mb"] / ref["rss_mb"]
    share = files[1].stat().st_size / files[0].stat().st_size
    marks = [f"tokens/s {speed:.2f}x (>= 3x: {'met' if speed >= 3 else 'NOT met'})",
             f"peak RSS {rss:.2f}x (<= 0.4x: {'met' if rss <= 0.4 else 'NOT met'})",
             f"adapter {100 * share:.2f}% of base (<= 2%: {'met' if share <= 0.02 else 'NOT met'})"]  # fmt: skip
    return "targets, llama.cpp q8_0 vs PyTorch fp32: " + "; ".join(marks)


def row(runtime: str, kind: str, sizes, run: dict, ref: dict) -> dict:
    base, adapter = sizes
    return {
        "runtime": runtime,
        "type": kind,
        "base MB": f"{base / 1e6:.1f}",
        "adapter MB": f"{adapter / 1e6:.2f} ({100 * adapter / base:.2f}% of base)",
        "load s": f"{run['load_s']:.2f}",
        "tokens/s": f"{run['tokens_per_s']:.1f} ({run['tokens_per_s'] / ref['tokens_per_s']:.2f}x)",
        "peak RSS MB": f"{run['rss_mb']:.0f} ({run['rss_mb'] / ref['rss_mb']:.2f}x)",
        "greedy agreement": agreement(run["tokens"], ref["tokens"]),
    }


def onnx_rows() -> list[dict]:
    """The ONNX engineer's rows (``benchmarks/export_onnx_rows.py``'s ``rows()``), imported by path."""
    path = HERE / "export_onnx_rows.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("export_onnx_rows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rows()


def table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["gguf", "onnx"])
    parser.add_argument("--output", help="also write the result (Markdown) here")
    parser.add_argument("--work", help="keep the adapter and GGUF files here (a rerun reuses them)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    sections = [f"# On-device export ({' '.join(['bench_export.py', *sys.argv[1:]])})", "", __doc__.split("\n\n", 2)[2]]
    if args.only != "onnx":
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(args.work or scratch)
            work.mkdir(parents=True, exist_ok=True)
            rows, quiets = gguf_rows(work)
        sections += ["## llama.cpp (GGUF) vs PyTorch fp32, SmolLM2-135M-Instruct + one LoRA", "", table(rows), ""]
        sections += ["Quiet checks before each timed round:", "", *[f"- {q}" for q in quiets], ""]
    if args.only != "gguf":
        rows = onnx_rows()
        sections += ["## ONNX Runtime", "", table(rows) if rows else "(benchmarks/export_onnx_rows.py not present)", ""]
    text = "\n".join(sections)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
