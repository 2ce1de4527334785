"""The adapter folders of Hugging Face ``peft`` and AdapterHub ``adapters``, read and written.

A peer format is a module with:

* ``matches(data)``: whether an ``adapter_config.json`` is this format's;
* ``to_config(data, model)``: the equivalent adapterkit config, or :class:`AdapterFileError` naming
  the option adapterkit cannot reproduce;
* ``key_map(model, name, peer_name)``: adapterkit tensor key -> the peer's key (both relative to
  the backbone, so ``bert.``-prefixed files from task models map either way);
* ``read(folder)``: ``(adapter tensors, head tensors)`` with the peer's wrapper prefixes removed;
* ``export(model, name, with_head)``: ``(json files, tensor files)`` for the folder.

What each method is in peft's terms is registered in the method's own file
(:mod:`adapterkit.core.peft_spec`); the parameters are :func:`adapterkit.core.entries.entries`.
Both peers key tensors by module path; adapterkit keys by host module and parameter name. The key
maps are built from the adapter as attached to the model, so every name and shape is checked
against the model before anything is copied.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapterkit.errors import AdapterFileError

FORMAT = "adapterkit"  # the "format" field of adapterkit's own adapter_config.json


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is corrupt ({e}); save the adapter again") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} is not a JSON object; save the adapter again")
    return data


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a ``.bin`` pickle read with ``weights_only=True`` (never unpickled fully)."""
    if not file.is_file():
        raise AdapterFileError(f"{file} is missing; the adapter folder is incomplete, save it again")
    if file.suffix != ".bin":
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{file} is corrupt or truncated ({e}); save the adapter again") from e
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise AdapterFileError(
            f"{file} holds more than tensors and would need full unpickling, which can run arbitrary code; "
            "adapterkit refuses it. Re-save it as safetensors with the library that wrote it"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise AdapterFileError(f"{file} is corrupt or truncated ({e}); save the adapter again") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdapterFileError(f"{file} is not a dict of tensors; it is not an adapter weights file")
    return data


def first_file(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` present in ``folder`` (the last one, for the error, if none is)."""
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[-1])


def pick(raw: dict[str, torch.Tensor], key_map: dict[str, str], file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under adapterkit's keys; a file key may carry one extra leading module
    (``bert.``) that the model lacks. Missing or unexpected tensors raise, naming the first."""
    found = {}
    for key in raw:
        found.setdefault(key, key)
        rest = key.partition(".")[2]
        if rest:
            found.setdefault(rest, key)
    out, used = {}, set()
    for ours, theirs in key_map.items():
        if theirs not in found:
            raise AdapterFileError(
                f"{file}: tensor {theirs} is missing; the file was saved for another model or with another config"
            )
        out[ours] = raw[found[theirs]]
        used.add(found[theirs])
    extra = sorted(set(raw) - used)
    if extra:
        raise AdapterFileError(f"{file}: tensor {extra[0]} does not belong to this adapter on this model")
    return out
