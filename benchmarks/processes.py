"""A server under test in its own process, as the serving benchmarks start it: a free loopback port, and the
wait until its ``/health`` answers (or it exits, or 5 minutes pass)."""

from __future__ import annotations

import socket
import subprocess
import time

import requests


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, command: list[str], timeout: float = 300) -> None:
    """Return once ``url/health`` answers 2xx; raise if ``process`` exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {command}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).ok
    except requests.ConnectionError:
        return False
