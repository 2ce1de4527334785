"""What several command groups share: model options, adapters by name or hub reference, placement."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapterkit.errors import AdapterError

MODEL_HELP = "a local model folder or a Hugging Face Hub id (org/name: downloaded once into the HF cache)"


def device_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")


def run_options(command: argparse.ArgumentParser, quick: str) -> None:
    """The demos' options: --quick, --output, --threads."""
    command.add_argument("--quick", action="store_true", help=quick)
    command.add_argument("--output", help="also write the result (Markdown) to this file")
    command.add_argument("--threads", type=int, help="torch threads (default: 2)")


def place(model, device: str | None):
    """``model`` (its adapters loaded) on ``--device`` (default: CUDA when present), with sdpa there."""
    from adapterkit.core.device import place, resolve_device

    return place(model, resolve_device(device))


def computing(model, autocast: str | None = None):
    """The forward's autocast on the model's device: ``--autocast`` (``none``: off), else bf16 on CUDA."""
    from adapterkit.core.device import autocast_context, default_autocast

    device = next(model.parameters()).device
    return autocast_context(device, default_autocast(autocast, device))


def resolved(path: str) -> str:
    """A ``hub:owner/name[@rev]`` reference becomes its folder in the local cache; a path stays itself
    (an ``adapterkit train`` output keeps its run files in view)."""
    from adapterkit.hub.client import is_ref, resolve

    return str(resolve(path)) if is_ref(path) else path


def named(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH``."""
    name, sep, path = value.partition("=")
    return (name, path) if sep and "/" not in name else (None, value)


def read_texts(path: str) -> list[str]:
    return [row["text"] for row in read_rows(path)]


def read_rows(path: str) -> list[dict]:
    """One ``{"text": ...}`` per line; a ``.jsonl`` file's lines are objects with a string ``text`` field."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        return [{"text": line} for line in lines]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError("no string 'text'")
        except ValueError as e:
            raise AdapterError(f"{path}, line {number}: expected a JSON object with a 'text' field ({e})") from e
        rows.append(row)
    return rows


def num_labels(head: dict[str, list[int]]) -> int:
    """The classifier's output size: the smallest first axis among the head's matrices."""
    shapes = [shape for key, shape in head.items() if key.endswith("weight") and len(shape) == 2]
    if not shapes:
        raise AdapterError("the adapter has no classification head; pass --task bare or --task causal-lm")
    return min(shape[0] for shape in shapes)
