"""Save and load one adapter alone: ``adapter_config.json`` + ``adapter.safetensors`` (+ head).

Tensor keys are module paths relative to the backbone (``encoder.layer.0.output.dense.lora_A``),
so an adapter saved from a model with a task head loads into a bare model and back. Files are written
with :func:`adapterkit.files.write_folder`: a crash never leaves half an adapter, and other files in
the folder are never touched.
peft and AdapterHub folders are read and written through :mod:`adapterkit.core.formats`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adapterkit.core import adapters
from adapterkit.core import state as st
from adapterkit.core.arch import model_type
from adapterkit.core.backbone import base_prefix, check_base, head_parameters
from adapterkit.core.entries import CONFIG_FILE
from adapterkit.core.formats import FORMAT, pick, read_tensors
from adapterkit.core.formats.detect import PEERS, locate
from adapterkit.core.methods import AdapterConfig, config_from_dict
from adapterkit.errors import AdapterError, AdapterFileError
from adapterkit.files import write_folder

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed relative to the backbone, without the slot segment."""
    prefix, marker = base_prefix(model), f".{st.SLOT}.{name}."
    out = {}
    for key, p in st.adapter_named_parameters(model, name):
        host, _, local = f".{key}".partition(marker)
        out[f"{host[1:]}.{local}".removeprefix(prefix)] = p.detach()
    return out


def save_adapter(
    model: nn.Module, name: str, path: str | os.PathLike, *, with_head: bool = True, format: str = FORMAT
) -> Path:
    """Write adapter ``name`` (and the task head, if the model has one) to folder ``path``.

    ``format``: ``"adapterkit"`` (default), ``"peft"`` (for ``PeftModel.from_pretrained``) or
    ``"adapterhub"`` (for ``adapters``' ``load_adapter``). A method or option the target format
    cannot express raises :class:`AdapterFileError` and writes nothing.
    """
    state = adapters.known(model, name)
    if format in PEERS:
        jsons, tensors = PEERS[format].export(model, name, state.configs[name], with_head)
        return write_adapter_folder(Path(path), jsons, tensors)
    if format != FORMAT:
        raise AdapterError(f"unknown format {format!r}; choose adapterkit, peft or adapterhub")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": state.configs[name].to_dict(),
        "base_model": {
            "model_type": model_type(model),
            "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
            "fingerprint": state.fingerprint,
        },
        "head": sorted(head_parameters(model)) if with_head else [],
    }
    files = {WEIGHTS_FILE: adapter_state_dict(model, name)}
    if config["head"]:
        files[HEAD_FILE] = {k: p.detach() for k, p in head_parameters(model).items()}
    return write_adapter_folder(Path(path), {CONFIG_FILE: config}, files)


def write_adapter_folder(path: Path, jsons: dict[str, dict], files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write safetensors ``files`` and JSON ``jsons`` into folder ``path`` (see :func:`files.write_folder`):
    the user's other files there stay, an earlier adapter's files are replaced (its head file goes when
    this one has none), the config goes last."""

    def fill(tmp: Path) -> None:
        for filename, tensors in files.items():
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / filename, metadata={"format": "pt"})
        for filename, data in jsons.items():
            (tmp / filename).write_text(json.dumps(data, indent=2) + "\n")

    return write_folder(Path(path), fill, last=CONFIG_FILE, stale=_own_files(Path(path)))


def _own_files(folder: Path) -> list[str]:
    """The files an adapterkit adapter saved in ``folder`` says are its own (its config names its head)."""
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [HEAD_FILE] if isinstance(data, dict) and data.get("format") == FORMAT and data.get("head") else []


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    load_head: bool = True,
    activate: bool = False,
) -> str:
    """Load a saved adapter into ``model`` and return its name.

    Reads adapterkit's folders and peft's and AdapterHub's (detected from the files). Every
    tensor's name and shape is checked (and for adapterkit's own format the base model's type and
    fingerprint) before anything in ``model`` changes; a mismatch raises :class:`AdapterFileError`.
    ``ak.load_adapter`` (:func:`adapterkit.hub.client.load_adapter`) also takes ``hub:`` references.
    """
    folder, data, peer = locate(Path(path), name)
    head_wanted = bool(load_head and head_parameters(model))  # a bare model takes no head
    if peer is not None:
        return _load_peer(model, folder, data, peer, name, head_wanted, activate)
    name = name or data["name"]
    tensors = read_tensors(folder / WEIGHTS_FILE)
    head = read_tensors(folder / HEAD_FILE) if head_wanted and data.get("head") else {}
    check_base(model, data["base_model"], folder)
    return _install(
        model, name, config_from_dict(data["config"]), folder / WEIGHTS_FILE, head, activate, lambda: tensors
    )


def _load_peer(model, folder: Path, data: dict, peer: ModuleType, name: str | None, head: bool, activate: bool):
    """Load a peft or AdapterHub folder (``head``: whether to load its head too)."""
    try:
        config = peer.to_config(data, model)
    except AdapterFileError:  # already names the option
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(
            f"{folder / CONFIG_FILE}: a {peer.NAME} config with a missing or malformed field ({e!r}); save it again"
        ) from e
    tensors, head_tensors, file = peer.read(folder, data, head)
    peer_name = data.get("name") or "default"  # AdapterHub keys carry the name it was saved under
    name = name or peer_name

    def fill() -> dict[str, torch.Tensor]:  # the key map needs the adapter attached
        picked = pick(tensors, peer.key_map(model, name, peer_name), file)
        # fixed tensors the peer derives rather than stores (PiSSA's start) keep the values the build gave them
        own = adapter_state_dict(model, name)
        return {**{k: v for k, v in own.items() if k not in picked and f".{st.FIXED}." in f".{k}"}, **picked}

    return _install(model, name, config, file, head_tensors, activate, fill)


def _install(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    file: Path,
    head: dict[str, torch.Tensor],
    activate: bool,
    tensors: Callable[[], dict[str, torch.Tensor]],
) -> str:
    """Add the adapter, fill it from ``tensors()`` (keyed as ``adapter_state_dict``) and the head."""
    check_head(model, head, file)
    adapters.add_adapter(model, name, config)
    try:
        copy_into(adapter_state_dict(model, name), tensors(), file)
    except AdapterFileError:
        adapters.delete_adapter(model, name)
        raise
    params = head_parameters(model)
    copy_into({k: params[k] for k in head}, head, file)
    if activate:
        adapters.set_active(model, name)
    return name


def check_head(model: nn.Module, head: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse head tensors that do not fit ``model``'s task head (names and shapes), naming the fix."""
    params = head_parameters(model)
    for key, tensor in head.items():
        if key not in params or params[key].shape != tensor.shape:
            have = tuple(params[key].shape) if key in params else "absent"
            raise AdapterFileError(
                f"{file}: head tensor {key} {tuple(tensor.shape)} does not fit this model "
                f"({have}); build the model with the same head (e.g. num_labels) or pass load_head=False"
            )


def _fits(shape: torch.Size, tensor: torch.Tensor) -> bool:
    """Equal shapes up to size-1 axes ((out, 1) vs (out,)), or a flat 1-D copy (AdapterHub's flat prefix)."""
    squeeze = [d for d in shape if d != 1]
    return squeeze == [d for d in tensor.shape if d != 1] or (tensor.ndim == 1 and tensor.numel() == shape.numel())


@torch.no_grad()
def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Copy saved ``tensors`` into ``params`` (same keys; shapes equal up to size-1 axes), all checked first."""
    for key in sorted(set(params) | set(tensors)):
        if key not in tensors or key not in params or not _fits(params[key].shape, tensors[key]):
            want = tuple(params[key].shape) if key in params else "absent in this model"
            got = tuple(tensors[key].shape) if key in tensors else "absent in the file"
            raise AdapterFileError(f"{file}: tensor {key} does not fit: model {want}, file {got}")
    for key, tensor in tensors.items():
        params[key].copy_(tensor.reshape(params[key].shape))


def inspect_adapter(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """What a saved adapter folder holds, in any of the three formats.

    Returns ``{"format", "name", "method", "config", "base_model", "tensors": {key: shape},
    "head": {key: shape}, "params"}``; ``base_model["fingerprint"]`` is only recorded by adapterkit.
    """
    folder, data, peer = locate(Path(path), name)
    if peer is None:
        tensors, head = read_tensors(folder / WEIGHTS_FILE), {}
        if data.get("head"):
            head = read_tensors(folder / HEAD_FILE)
        info = {
            "format": FORMAT,
            "name": data["name"],
            "method": data["config"].get("method"),
            "config": data["config"],
        }
        info["base_model"] = data["base_model"]
    else:
        tensors, head, _ = peer.read(folder, data, True)
        info = {"format": peer.NAME, **peer.describe(data)}
    info["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    info["head"] = {k: list(v.shape) for k, v in head.items()}
    info["params"] = sum(v.numel() for v in tensors.values())
    return info
