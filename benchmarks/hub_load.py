"""A bounded load test of ``adapterkit hub serve`` on loopback.

    .venv/bin/python benchmarks/hub_load.py [--clients 16] [--seconds 30] [--output benchmarks/results_hub_load.md]

Starts a hub on a fresh root, then ``--clients`` threads run for ``--seconds``: each round is a
push (20%: a new revision of one of 4 shared names, ~70 kB of safetensors + JSON) or a pull (80%:
card, file list, every file, sha256-checked). Reports requests/s, p50/p99 latency per kind and
errors (goal: zero), then downloads every stored revision and checks every file against its sha256.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save

from adapterkit.hub import client
from adapterkit.hub.store import Store

NAMES = [f"load/adapter-{i}" for i in range(4)]


def start(root: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adapterkit", "hub", "serve", "--root", str(root), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/adapters", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the hub did not start")


def payload(rng: random.Random) -> dict:
    tensors = {"lora_A": torch.randn(8, 768, generator=torch.Generator().manual_seed(rng.randrange(2**31)))}
    files = {"adapter.safetensors": save(tensors), "adapter_config.json": json.dumps({"n": rng.random()}).encode()}
    return {"files": {p: base64.b64encode(d).decode() for p, d in files.items()}, "card": {"method": "lora"}}


class Load:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.latency: dict[str, list[float]] = {"push": [], "card": [], "tree": [], "file": []}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def timed(self, kind: str, method: str, url: str, body=None) -> bytes:
        start = time.perf_counter()
        out = client.request(method, url, body, self.token if method == "POST" else None)
        with self.lock:
            self.latency[kind].append(time.perf_counter() - start)
        return out

    def pull(self, name: str) -> None:
        card = json.loads(self.timed("card", "GET", f"{self.url}/api/adapters/{name}"))
        tree = json.loads(self.timed("tree", "GET", f"{self.url}/api/models/{name}/tree/{card['revision']}"))
        for entry in tree:
            data = self.timed("file", "GET", f"{self.url}/{name}/resolve/{card['revision']}/{entry['path']}")
            if hashlib.sha256(data).hexdigest() != entry["lfs"]["oid"]:
                raise RuntimeError(f"{name}/{entry['path']}: sha256 mismatch")

    def worker(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        self.push(rng.choice(NAMES), rng)  # every name exists before anyone pulls it
        while time.perf_counter() < until:
            name = rng.choice(NAMES)
            try:
                self.push(name, rng) if rng.random() < 0.2 else self.pull(name)
            except Exception as e:  # noqa: BLE001 (every failure is counted and reported)
                with self.lock:
                    self.errors.append(repr(e)[:200])

    def push(self, name: str, rng: random.Random) -> None:
        self.timed("push", "POST", f"{self.url}/api/adapters/{name}", payload(rng))


def verify(url: str) -> tuple[int, int]:
    revisions = files = 0
    for name in NAMES:
        for revision in client.card(name, url)["history"]:
            revisions += 1
            for entry in json.loads(client.request("GET", f"{url}/api/models/{name}/tree/{revision}")):
                data = client.request("GET", f"{url}/{name}/resolve/{revision}/{entry['path']}")
                assert hashlib.sha256(data).hexdigest() == entry["lfs"]["oid"], (name, revision, entry["path"])
                files += 1
    return revisions, files


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--port", type=int, default=8799)
    p.add_argument("--output")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        token = Store(root).create_token("load")
        proc = start(Path(root), args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            load = Load(url, token)
            until = time.perf_counter() + args.seconds
            threads = [threading.Thread(target=load.worker, args=(i, until)) for i in range(args.clients)]
            start_time = time.perf_counter()
            [t.start() for t in threads]
            [t.join() for t in threads]
            elapsed = time.perf_counter() - start_time
            revisions, files = verify(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    total = sum(len(v) for v in load.latency.values())
    out = io.StringIO()
    print(f"{args.clients} clients, {elapsed:.1f} s on loopback, 2 CPU cores shared by server and clients.\n", file=out)
    print("| request | count | p50 ms | p99 ms |", file=out)
    print("|---|---:|---:|---:|", file=out)
    for kind, values in load.latency.items():
        print(
            f"| {kind} | {len(values)} | {1e3 * percentile(values, 50):.1f} | {1e3 * percentile(values, 99):.1f} |",
            file=out,
        )
    print(f"\n{total} requests, **{total / elapsed:.0f} requests/s**, errors: **{len(load.errors)}**", file=out)
    print(f"Verified after the run: {revisions} revisions, {files} files, every sha256 matches.", file=out)
    for error in load.errors[:5]:
        print(f"- {error}", file=out)
    text = out.getvalue()
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
