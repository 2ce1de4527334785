"""Where a command computes: ``--device`` (default: CUDA when torch sees a GPU, else the CPU), and what
a CUDA device gets with it: the model's weights there, bf16 autocast, sdpa attention, and batches copied
from pinned (page-locked) memory, asynchronously.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from adapterkit.errors import AdapterError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``), or None / ``auto``: CUDA when present, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise AdapterError(f"--device {name!r}: give cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise AdapterError(f"--device {name!r}: give cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        raise AdapterError(f"--device {name}: torch ({built}) sees no CUDA GPU here; pass --device cpu or leave it out")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise AdapterError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def default_autocast(autocast: str | None, device: torch.device) -> str | None:
    """The autocast dtype a command computes in: ``autocast`` as given (``none``: none), else bf16 on a
    CUDA GPU that has it (half the memory traffic, tensor cores; reductions stay fp32), else none."""
    if autocast == "none":
        return None
    if autocast is not None:
        if autocast not in AUTOCAST:
            raise AdapterError(f"--autocast {autocast!r}: choose bf16 or fp16, or none for no autocast")
        return autocast
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast_context(device: torch.device, autocast: str | None) -> contextlib.AbstractContextManager:
    """:func:`torch.autocast` in ``autocast``'s dtype on ``device``, or nothing for None or ``none`` (the
    name is taken as it is: resolve a default with :func:`default_autocast` first)."""
    if autocast in (None, "none"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[default_autocast(autocast, device)])  # validated


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (with its adapters: load them first) on ``device``; on CUDA with sdpa attention."""
    model = model.to(device)
    if device.type == "cuda":
        prefer_sdpa(model)
    return model


def prefer_sdpa(model: nn.Module) -> None:
    """torch's fused ``scaled_dot_product_attention`` (flash and memory-efficient kernels on CUDA) for a
    model that runs eager attention but supports sdpa; other choices (a flash kernel) are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "eager" and getattr(model, "_supports_sdpa", False):
        model.set_attn_implementation("sdpa")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device``. To CUDA from pinned memory, copied without blocking: the copy
    overlaps the work already queued on the GPU (torch's host allocator keeps the pinned buffer alive)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
