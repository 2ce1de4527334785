"""Save and load one adapter alone: ``adapter_config.json`` + ``adapter.safetensors`` (+ head).

Tensor keys are module paths relative to the backbone (``encoder.layer.0.output.dense.lora_A``),
so an adapter saved from a model with a task head loads into a bare model and back. Every write
goes to a temporary folder that is renamed into place: a crash never leaves half an adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import core
from . import state as st
from .arch import model_type
from .backbone import base_prefix, fingerprint, head_parameters, same_base
from .errors import AdapterError, AdapterFileError
from .methods import config_from_dict

FORMAT = "adapterkit"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed relative to the backbone, without the slot segment."""
    prefix, marker = base_prefix(model), f".{st.SLOT}.{name}."
    out = {}
    for key, p in model.named_parameters():
        if st.is_adapter_param(key, name):
            host, _, local = f".{key}".partition(marker)
            out[f"{host[1:]}.{local}".removeprefix(prefix)] = p.detach()
    return out


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike, *, with_head: bool = True) -> Path:
    """Write adapter ``name`` (and the task head, if the model has one) to folder ``path``."""
    state = core._known(model, name)
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
    return _write_atomically(Path(path), config, files)


def _write_atomically(path: Path, config: dict[str, Any], files: dict[str, dict[str, torch.Tensor]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for filename, tensors in files.items():
            tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
            save_file(tensors, tmp / filename, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        old = path.with_name(f".{path.name}.old") if path.exists() else None
        if old:
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"{file} not found: {path} is not a saved adapter folder")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is corrupt ({e}); save the adapter again") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} is not a JSON object; save the adapter again")
    if "peft_type" in data or "model_class" in data:
        raise AdapterFileError(
            f"{path} holds a peft or AdapterHub adapter; this version reads adapterkit's own format only"
        )
    if data.get("format") != FORMAT:
        raise AdapterFileError(f"{file} is not an adapterkit adapter config (no 'format': 'adapterkit')")
    return data


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterFileError(f"{file} is missing; the adapter folder is incomplete, save it again")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file} is corrupt or truncated ({e}); save the adapter again") from e


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    load_head: bool = True,
    activate: bool = False,
) -> str:
    """Load a saved adapter into ``model`` and return its name.

    The base model's type and fingerprint are checked, and every tensor's name and shape, before
    anything in ``model`` changes; a mismatch raises :class:`AdapterFileError`.
    """
    path = Path(path)
    data = read_config(path)
    name = name or data["name"]
    tensors = read_tensors(path / WEIGHTS_FILE)
    wants_head = load_head and data.get("head") and head_parameters(model)  # a bare model takes none
    head = read_tensors(path / HEAD_FILE) if wants_head else {}
    _check_base(model, data["base_model"], path)
    _check_head(model, head, path)
    config = config_from_dict(data["config"])
    core.add_adapter(model, name, config)
    try:
        _copy_into(adapter_state_dict(model, name), tensors, path / WEIGHTS_FILE)
    except AdapterFileError:
        core.delete_adapter(model, name)
        raise
    params = head_parameters(model)
    _copy_into({k: params[k] for k in head}, head, path / HEAD_FILE)
    if activate:
        core.set_active(model, name)
    return name


def _check_base(model: nn.Module, saved: dict[str, Any], path: Path) -> None:
    kind = model_type(model)
    if saved.get("model_type") != kind:
        raise AdapterFileError(
            f"{path} was saved for a {saved.get('model_type')!r} model, this one is {kind!r}; "
            "load it into the base model it was trained on"
        )
    state = st.get_state(model, create=True)
    if state.fingerprint is None:
        state.fingerprint = fingerprint(model)
    if not same_base(saved.get("fingerprint"), state.fingerprint):
        raise AdapterFileError(
            f"{path} was trained on another base model ({saved.get('name_or_path') or 'unnamed'}) than "
            f"this one ({getattr(getattr(model, 'config', None), 'name_or_path', '') or 'unnamed'}): "
            "their weights differ; load it into the base model it was trained on"
        )


def _check_head(model: nn.Module, head: dict[str, torch.Tensor], path: Path) -> None:
    params = head_parameters(model)
    for key, tensor in head.items():
        if key not in params or params[key].shape != tensor.shape:
            have = tuple(params[key].shape) if key in params else "absent"
            raise AdapterFileError(
                f"{path / HEAD_FILE}: head tensor {key} {tuple(tensor.shape)} does not fit this model "
                f"({have}); build the model with the same head (e.g. num_labels) or pass load_head=False"
            )


@torch.no_grad()
def _copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], file: Path) -> None:
    for key in sorted(set(params) | set(tensors)):
        if key not in tensors or key not in params or params[key].shape != tensors[key].shape:
            want = tuple(params[key].shape) if key in params else "absent in this model"
            got = tuple(tensors[key].shape) if key in tensors else "absent in the file"
            raise AdapterFileError(f"{file}: tensor {key} does not fit: model {want}, file {got}")
    for key, tensor in tensors.items():
        params[key].copy_(tensor)


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """The saved config plus ``{tensor name: shape}`` of a saved adapter folder."""
    path = Path(path)
    data = read_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{path / WEIGHTS_FILE} is missing")
    data["tensors"] = {k: list(v.shape) for k, v in read_tensors(path / WEIGHTS_FILE).items()}
    return data
