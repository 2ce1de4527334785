"""llama.cpp's own server (``llama-server``) as the CPU serving anchor of ``serve_load.py --anchor``.

``python3 benchmarks/llama_server.py --setup`` builds it once into ``benchmarks/.venvs/llama.cpp/bin/``: the
source distribution of the llama-cpp-python that ``scripts/setup.sh`` builds for the tests (from PyPI),
its vendored llama.cpp configured by CMake for this CPU, the ``llama-server`` target alone (about 10 minutes on
2 cores). The server then runs one GGUF base with every task's GGUF LoRA loaded and unapplied
(``--lora-init-without-apply``); a request names its adapter by ``"lora": [{"id": k, "scale": 1}]``. llama.cpp
batches only the slots whose LoRA sets are equal (``server_slot::can_batch_with``): requests for different
adapters take turns, one adapter set per forward.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from processes import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"  # the llama.cpp of the tests' llama-cpp-python (scripts/setup.sh)
HOME = ROOT / "benchmarks" / ".venvs" / "llama.cpp"
BINARY = HOME / "bin" / "llama-server"


def setup() -> Path:
    """Build ``llama-server`` from llama-cpp-python's source distribution (once; a rerun finds it)."""
    if BINARY.exists():
        return BINARY
    work = HOME / "src"
    work.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work)]
    subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    with tarfile.open(work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(work, filter="data")
    source = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    build = work / "build"
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF"]
    options += ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *options], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"], check=True)
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", BINARY)
    return BINARY


class LlamaServer:
    """``llama-server`` on a free loopback port: ``base`` with ``loras`` (GGUF files) loaded, ``slots``
    sequences decoded together, ``threads`` CPU threads."""

    def __init__(self, base: Path, loras: list[Path], slots: int, threads: int = 2, context: int = 256) -> None:
        port = free_port()
        command = [str(BINARY), "-m", str(base), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        command += ["-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * context)]
        command += ["--lora-init-without-apply", *(arg for path in loras for arg in ("--lora", str(path)))]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.process, self.url, command)

    @staticmethod
    def body(adapter: int | None) -> dict:
        """The request fields that pick adapter ``adapter`` (None: the base), with its prompt cache off: each
        request is prefilled, as ``adapterkit serve`` prefills it."""
        lora = [] if adapter is None else [{"id": adapter, "scale": 1.0}]
        return {"lora": lora, "cache_prompt": False}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="build llama-server into benchmarks/.venvs/llama.cpp")
    if parser.parse_args().setup:
        print(setup())
