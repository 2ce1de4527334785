"""``adapterkit serve`` under load, over HTTP on loopback: many adapters in one batch vs the bare model,
vs one request at a time, and latency.

    .venv/bin/python benchmarks/serve_load.py [--clients 16] [--requests 2] [--output benchmarks/results_serve_load.md]

SmolLM2-135M-Instruct (``--dtype`` fp32 or bf16), the real server (``adapterkit serve`` in its own process,
2 torch threads),
``--clients`` concurrent clients each sending ``--requests`` streamed ``/v1/completions`` (the same
20-token prompt, ``max_tokens`` 16, greedy), every request for its own adapter in turn. Adapters:
LoRA r=8 on q/v with random weights (1, 8 or 64 distinct), and a mix of LoRA, IA3, Pfeiffer and
Houlsby. Every adapter is loaded by one warm-up request first (not timed).
Throughput: completion tokens (from ``usage``) over the wall time of the whole load. The baseline
serves the same 64-adapter load one request at a time (``--max-batch 1``), as a server that swaps the
active adapter per request without per-row batching must when every request names another adapter.
The loads alternate, ``--rounds`` times (timings drift on a shared machine): a setup's throughput is
its tokens over its seconds summed across rounds.
Latency: time to first streamed token (TTFT) and to the end, unloaded (one request at a time), under
the 64-adapter load above (all clients start at once: a burst), and under a steady load (requests for
the 64 adapters arriving at random, Poisson, ``--rate`` per second); p50 and p99 over the requests.
Bounds, measured in this process on the same base: the burst's prefill bound (the 16 prompts in one
batched forward, best of 3) and transformers' own ``generate`` of one prompt (16 tokens, greedy, best of
3) against one request served alone. A long prompt (~1,500 tokens) arriving while ``--clients - 1``
streams decode: their inter-token latency p99 before it arrived and while it was prefilled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from processes import free_port, wait_healthy

PROMPT = "Write a short, friendly note to a neighbour about a lost cat called Pepper. "
TOKENS = 16


def adapters(model_dir: str, folder: Path) -> dict[str, str]:
    """64 LoRAs and one IA3, Pfeiffer and Houlsby adapter with random weights, saved once."""
    from transformers import AutoModelForCausalLM

    import adapterkit as ak

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    kinds = {f"lora{i}": ("lora", {"r": 8}) for i in range(64)} | {
        "ia3": ("ia3", {}),
        "pfeiffer": ("pfeiffer", {}),
        "houlsby": ("houlsby", {}),
    }
    out = {}
    for i, (name, (preset, options)) in enumerate(kinds.items()):
        ak.add_adapter(model, name, preset, **options)
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for key, p in model.named_parameters():
                if f".{name}." in key:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ak.save_adapter(model, name, folder / name)
        ak.delete_adapter(model, name)
        out[name] = str(folder / name)
    return out


def quiet_line() -> str:
    """The machine's quiet check (../shared/tools/quiet) before a timed round, as the result records it."""
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "quiet"
    if not tool.exists():
        return "quiet: tool not found"
    return subprocess.run([sys.executable, str(tool), "120"], capture_output=True, text=True).stdout.strip()


def limit_line(model_dir: str, dtype: str, rows: int, bare: float) -> str:
    """The machine's limit for the bare model's decoding steps: the step's FLOPs (every Linear, the LM head
    included, for ``rows`` tokens) over this CPU's throughput for a decode-sized linear in ``dtype``."""
    from transformers import AutoModelForCausalLM

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=kind)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    x, w = torch.randn(rows, 576, dtype=kind), torch.randn(1536, 576, dtype=kind)
    for _ in range(20):
        torch.nn.functional.linear(x, w)
    started, n = time.perf_counter(), 300
    for _ in range(n):
        torch.nn.functional.linear(x, w)
    flops = 2 * rows * 576 * 1536 * n / (time.perf_counter() - started)
    limit = flops / (2 * weights)  # tokens/s when every step's rows are busy and nothing but matmuls runs
    return (
        f"Machine limit ({dtype}): a {rows}x576 @ 576x1536 linear runs at {flops / 1e9:.0f} GFLOP/s; a decoding "
        f"step of {rows} rows is {2 * rows * weights / 1e9:.2f} GFLOP, so at most **{limit:.0f} tokens/s**; "
        f"the bare model served reaches {bare:.1f} ({bare / limit:.0%})."
    )


class Server:
    """``adapterkit serve`` in its own process on a free loopback port (as clients meet it: the clients'
    threads here do not share the server's interpreter lock)."""

    def __init__(
        self, model_dir: str, sources: dict[str, str], max_batch: int, dtype: str = "fp32", extra: list[str] = ()
    ) -> None:
        port = free_port()
        command = [sys.executable, "-m", "adapterkit", "serve", "--model", model_dir, "--port", str(port)]
        command += [f"--adapter={name}={path}" for name, path in sources.items()]
        command += ["--max-batch", str(max_batch), "--max-adapters", "128", "--max-queue", "1024", "--dtype", dtype]
        command += extra
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.process, self.url, command)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def request(
    url: str,
    model: str,
    tokens: int = TOKENS,
    prompt: str = PROMPT,
    times: list | None = None,
    extra: dict | None = None,
) -> tuple[float, float, int]:
    """One streamed completion: seconds to the first token, to the end, and completion tokens (``times``
    gets the arrival time of every text event; ``extra``: more body fields, llama-server's adapter choice)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, **(extra or {})}
    body["stream_options"] = {"include_usage": True}
    start, first, tokens = time.perf_counter(), None, 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"]:
                first = first or time.perf_counter()
                if times is not None:
                    times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def long_prompt_itl(url: str, models: list[str], streams: int, long_prompt: str) -> dict[str, float]:
    """``streams`` requests decoding 200 tokens; once they run, one request with ``long_prompt`` arrives.
    The streams' inter-token latency p99 before it arrived, and from its arrival to its first token."""
    times: list[list[float]] = [[] for _ in range(streams)]
    with ThreadPoolExecutor(streams + 1) as pool:
        runs = [pool.submit(request, url, models[k % len(models)], 200, PROMPT, times[k]) for k in range(streams)]
        while min(len(t) for t in times) < 20:
            time.sleep(0.05)
        arrived = time.perf_counter()
        ttft, _, _ = pool.submit(request, url, models[-1], 1, long_prompt).result()
        answered = arrived + ttft
        for run in runs:
            run.result()
    gaps = [(b, b - a) for t in times for a, b in itertools.pairwise(t)]
    before = [g for at, g in gaps if at < arrived]
    during = [g for at, g in gaps if arrived <= at <= answered] or [0.0]
    return {"before": pct(before, 0.99), "during": pct(during, 0.99), "ttft": ttft}


def bounds(model_dir: str, dtype: str, clients: int) -> dict[str, float]:
    """In this process: the 16 prompts prefilled in one batched forward, and transformers' ``generate`` of
    one prompt (TOKENS new tokens, greedy), best of 3 each, in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=kind).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids

    def best(fn) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    with torch.no_grad():
        prefill = best(lambda: model(ids.repeat(clients, 1), logits_to_keep=1))
        generate = best(
            lambda: model.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
        )
    return {"prefill": prefill, "generate": generate, "prompt_tokens": ids.shape[1]}


def load(
    url: str, models: list, clients: int, per_client: int, body=lambda m: {"model": m}
) -> tuple[float, list[tuple[float, float, int]]]:
    """``clients`` threads, each sending ``per_client`` requests, request k for ``models[k % len(models)]``
    (``body(model)``: the fields that name it: ``model`` for adapterkit, a LoRA id for llama-server)."""
    jobs = [models[k % len(models)] for k in range(clients * per_client)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: request(url, "m", extra=body(m)), jobs))
    return time.perf_counter() - start, results


def anchor(model_dir: str, clients: int, per_client: int, rounds: int) -> list[str]:
    """llama.cpp's own server against ``adapterkit serve`` on the same base (f32 GGUF / fp32), 1 and 8 distinct
    LoRAs, ``clients`` concurrent streams; the rounds alternate. The report's lines."""
    import tempfile

    from llama_server import LlamaServer, setup

    import adapterkit as ak
    from adapterkit.core.pretrained import causal_lm
    from adapterkit.export.gguf import export_gguf, write_lora

    setup()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {k: v for k, v in adapters(model_dir, Path(tmp)).items() if k in {f"lora{i}" for i in range(8)}}
        out = Path(tmp) / "gguf"
        export_gguf(model_dir, f"lora0={sources['lora0']}", out, "f32")
        model, _ = causal_lm(model_dir)
        for name in list(sources)[1:]:
            ak.load_adapter(model, sources[name], name)
            write_lora(model, name, out / f"{name}.lora.f32.gguf", "f32")
        del model  # the servers run in their own processes
        files = [out / f"{name}.lora.f32.gguf" for name in sources]
        names = list(sources)
        starts = {
            "adapterkit serve": (lambda: Server(model_dir, sources, clients), lambda n: {"model": n}),
            "llama-server": (
                lambda: LlamaServer(out / "model.f32.gguf", files, clients),
                lambda n: LlamaServer.body(names.index(n)),
            ),
        }
        totals: dict[tuple[str, int], list[float]] = {}
        quiet = []
        for r in range(rounds):
            # one server alive at a time: an idle llama-server's threads still poll for work
            for who in list(starts) if r % 2 == 0 else list(starts)[::-1]:
                start, body = starts[who]
                server = start()
                try:
                    for name in names:  # warm-up: every adapter used once
                        request(server.url, "m", tokens=1, extra=body(name))
                    quiet.append(f"round {r}, {who}: {quiet_line()}")
                    for n in (1, 8) if r % 2 == 0 else (8, 1):
                        seconds, results = load(server.url, names[:n], clients, per_client, body)
                        tokens = sum(x[2] for x in results)
                        total = totals.setdefault((who, n), [0.0, 0.0])
                        total[0], total[1] = total[0] + tokens, total[1] + seconds
                        print(f"anchor round {r}: {who}, {n} LoRAs: {tokens / seconds:.1f} tok/s", flush=True)
                finally:
                    server.stop()
    rate = {k: tokens / seconds for k, (tokens, seconds) in totals.items()}
    return [
        f"### CPU serving anchor: llama.cpp's llama-server vs adapterkit serve ({clients} streams x {per_client})",
        "",
        f"SmolLM2-135M-Instruct, the same base (llama-server: f32 GGUF from `adapterkit export`; adapterkit: fp32), "
        f"LoRA r=8 on q/v as GGUF adapter files loaded unapplied, each request naming its own; both on 2 threads, "
        f"{clients} sequences at once (`-np {clients}` / `--max-batch {clients}`), prompt caching off; {rounds} "
        "alternating rounds, one server running at a time, tokens over seconds summed across rounds.",
        "",
        *[f"- {line}" for line in quiet],
        "",
        "| server | 1 LoRA tok/s | 8 distinct LoRAs tok/s | 8 vs 1 |",
        "|---|---:|---:|---:|",
        *[
            f"| {who} | {rate[(who, 1)]:.1f} | {rate[(who, 8)]:.1f} | {rate[(who, 8)] / rate[(who, 1)]:.2f}x |"
            for who in starts
        ],
        "",
        f"adapterkit serve vs llama-server: **{rate[('adapterkit serve', 1)] / rate[('llama-server', 1)]:.2f}x** "
        f"with 1 LoRA, **{rate[('adapterkit serve', 8)] / rate[('llama-server', 8)]:.2f}x** with 8 distinct LoRAs.",
    ]


def steady(url: str, models: list[str], rate: float, count: int) -> list[tuple[float, float, int]]:
    """``count`` requests arriving as a Poisson process of ``rate`` per second, each for the next model."""
    rng, pending = random.Random(0), []
    with ThreadPoolExecutor(count) as pool:
        for k in range(count):
            pending.append(pool.submit(request, url, models[k % len(models)]))
            time.sleep(rng.expovariate(rate))
        return [f.result() for f in pending]


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="per client")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=2.0, help="steady load: requests per second")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the served base's weights")
    p.add_argument("--output")
    p.add_argument("--anchor", action="store_true", help="only llama.cpp's llama-server vs adapterkit serve")
    args = p.parse_args()
    import tempfile

    from adapterkit.apps.models import smollm2

    torch.set_num_threads(2)
    model_dir = str(smollm2())
    if args.anchor:
        text = "\n".join(anchor(model_dir, args.clients, args.requests, args.rounds))
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return
    base = Path(model_dir).name
    loras = [f"lora{i}" for i in range(64)]
    setups = {
        "bare model": [base],
        "1 LoRA": loras[:1],
        "8 distinct LoRAs": loras[:8],
        "64 distinct LoRAs": loras,
        "mix: LoRA, IA3, Pfeiffer, Houlsby": ["lora0", "ia3", "pfeiffer", "houlsby"],
    }
    serial = "64 distinct LoRAs, one request at a time (max_batch 1)"
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources = adapters(model_dir, Path(tmp))
        servers = {
            "batched": Server(model_dir, sources, args.clients, args.dtype),
            "serial": Server(model_dir, sources, 1, args.dtype),
        }
        quiet = []
        try:
            for server in servers.values():
                for name in [*sources, base]:  # warm-up: every adapter loaded once
                    request(server.url, name, tokens=1)
            url = servers["batched"].url
            latency = {"unloaded": [request(url, loras[k % 64]) for k in range(8)]}
            for r in range(args.rounds):
                quiet.append(quiet_line())
                runs = [(setup, url, models) for setup, models in setups.items()]
                runs.append((serial, servers["serial"].url, loras))
                for setup, where, models in runs if r % 2 == 0 else runs[::-1]:
                    seconds, results = load(where, models, args.clients, args.requests)
                    rows.setdefault(setup, []).append((seconds, results))
                    print(f"round {r}: {setup} {sum(x[2] for x in results) / seconds:.1f} tok/s", flush=True)
            latency["burst: all clients at once (64 LoRAs)"] = [x for _, res in rows["64 distinct LoRAs"] for x in res]
            count = args.clients * args.requests
            latency[f"steady: {args.rate:g} requests/s, Poisson (64 LoRAs)"] = steady(url, loras, args.rate, count)
            quiet.append(quiet_line())
            long_prompt = " ".join([PROMPT] * 95)  # ~1,500 tokens
            itl = long_prompt_itl(url, loras, args.clients - 1, long_prompt)
        finally:
            for server in servers.values():
                server.stop()
    throughput = {k: sum(x[2] for _, res in runs for x in res) / sum(t for t, _ in runs) for k, runs in rows.items()}
    bare = throughput["bare model"]
    bound = bounds(model_dir, args.dtype, args.clients)
    burst = pct([r[0] for r in latency["burst: all clients at once (64 LoRAs)"]], 0.99)
    unloaded = pct([r[0] for r in latency["unloaded"]], 0.99)
    alone = statistics.median(r[2] / r[1] for r in latency["unloaded"])  # tokens/s of one request alone
    hf = TOKENS / bound["generate"]
    lines = [
        f"SmolLM2-135M-Instruct, {args.dtype} base, 2 threads, loopback; {args.clients} concurrent clients x "
        f"{args.requests} "
        f"streamed completions each, {TOKENS} new tokens at most, greedy; `--max-batch {args.clients}`; "
        f"{args.rounds} alternating rounds.",
        "",
        limit_line(model_dir, args.dtype, args.clients, bare),
        "",
        *[f"- round {i}: {line}" for i, line in enumerate(quiet)],
        "",
        "| load | completion tokens/s | vs bare model |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {v / bare:.2f} |" for k, v in throughput.items()],
        "",
        f"64 distinct LoRAs batched vs one request at a time: "
        f"**{throughput['64 distinct LoRAs'] / throughput[serial]:.2f}x**.",
        "",
        "| latency | TTFT p50 | TTFT p99 | total p50 | total p99 |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {k} | {pct([r[0] for r in v], 0.5):.2f} s | {pct([r[0] for r in v], 0.99):.2f} s | "
            f"{pct([r[1] for r in v], 0.5):.2f} s | {pct([r[1] for r in v], 0.99):.2f} s |"
            for k, v in latency.items()
        ],
        "",
        f"Mean completion length: {statistics.mean(x[2] for _, r in rows['bare model'] for x in r):.1f} tokens (bare).",
        "",
        f"Bounds (this process, {bound['prompt_tokens']}-token prompt): {args.clients} prompts prefilled in one "
        f"batched forward {bound['prefill']:.2f} s; burst TTFT p99 is **{burst / bound['prefill']:.2f}x** that bound "
        f"and **{burst / unloaded:.2f}x** unloaded TTFT p99. One request alone streams {alone:.1f} tokens/s "
        f"(end to end, HTTP included) vs transformers' `generate` of one prompt {hf:.1f} tokens/s: "
        f"**{alone / hf:.2f}x**.",
        "",
        f"A ~1,500-token prompt arriving while {args.clients - 1} streams decode (LoRAs, `--prefill-chunk` default): "
        f"their inter-token latency p99 {itl['before']:.3f} s before, {itl['during']:.3f} s while it was prefilled "
        f"(**{itl['during'] / itl['before']:.2f}x**); its TTFT {itl['ttft']:.2f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
