"""Resumable training state on disk, written so that a kill at any moment leaves a good checkpoint.

A checkpoint is a folder ``step-00000123`` (trainable tensors, optimizer tensors, RNG states as
safetensors; counters, scheduler and history as JSON), written with :func:`adapterkit.files.write_folder`
(whole or not at all); only then does ``latest.json`` (replaced atomically) point at it, and older folders go.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from adapterkit.errors import AdapterError
from adapterkit.files import atomic_file, write_folder

POINTER = "latest.json"


class CheckpointError(AdapterError):
    """A checkpoint could not be written (disk full, unwritable) or read."""


def write_bytes(path: Path, data: bytes) -> None:
    """Write one file whole or not at all (the one place checkpoint bytes reach the disk)."""
    with atomic_file(path) as f:
        f.write(data)


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write ``tensors`` (file name -> tensors) and ``state`` as checkpoint ``step`` under ``root``."""
    final = root / f"step-{step:08d}"

    def fill(tmp: Path) -> None:
        for filename, group in tensors.items():
            write_bytes(tmp / filename, _safetensors_bytes(group))
        write_bytes(tmp / "state.json", json.dumps(state).encode())

    try:
        root.mkdir(parents=True, exist_ok=True)
        write_folder(final, fill)  # a complete copy of the same step, from before a resume, is replaced whole
        write_bytes(root / POINTER, json.dumps({"checkpoint": final.name, "step": step}).encode())
    except OSError as e:
        last = latest(root)
        if final != last:
            shutil.rmtree(final, ignore_errors=True)
        kept = f"the last good checkpoint ({last.name}) is intact" if last else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint step {step} in {root}: {e.strerror or e}; {kept}; "
            "free space or fix permissions, then rerun with --resume"
        ) from e
    for old in root.iterdir():  # older checkpoints and what a killed run left half-written (all ours)
        if old.is_dir() and old != final and old.name.startswith(("step-", ".step-", ".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def latest(root: Path) -> Path | None:
    """The folder ``latest.json`` points at, or None when there is no checkpoint."""
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    try:
        folder = root / json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{pointer} is damaged ({e!r}); delete {root} to start over") from e
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing; delete {root} to start over")
    return folder


def load_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    tensors = {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}
    return tensors, json.loads((folder / "state.json").read_text())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's per-parameter tensors (``"3.exp_avg"``) and its JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, per in sd["state"].items() for k, v in per.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for group in groups:  # JSON made the tuple a list
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], python: list) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((python[0], tuple(python[1]), python[2]))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    params = trainable_state(model)
    if set(params) != set(tensors):
        raise CheckpointError(f"{folder} holds other trainable parameters than this run; it is from another run")
    for name, p in params.items():
        p.copy_(tensors[name])
