"""AdapterHub ``adapters``' folders (1.3.0 and older); static heads (``head_config.json`` with ``"config": null``).

``adapter_config.json`` is ``{"config": {...}, "model_class", "model_type", "name", "version", ...}``;
weights ``adapter.safetensors`` or ``pytorch_adapter.bin`` hold raw ``state_dict`` keys
(``<layer>.output.adapters.<name>.adapter_down.0.weight``, ``<module>.loras.<name>.lora_A``, ...). What each
method is in AdapterHub's terms is registered in the method's own file (``AdapterConfig.adapterhub``,
:class:`~adapterkit.core.adapterhub_spec.HubFormat`); this module dispatches on ``architecture`` and handles
what all share: the model check, legacy files (no ``version``: old activation names; LoRA before 1.1.0 ran
with alpha = r), heads and names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from adapterkit.core import adapters
from adapterkit.core.adapterhub_spec import HUB, HubFormat
from adapterkit.core.arch import model_type
from adapterkit.core.backbone import base_prefix, head_parameters
from adapterkit.core.entries import CONFIG_FILE, Entry, entries, unsupported
from adapterkit.core.formats import first_file, read_json, read_tensors
from adapterkit.core.methods import METHODS, AdapterConfig
from adapterkit.errors import AdapterFileError

NAME = HUB
VERSION = "adapters.1.3.0"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
FORMATS: list[HubFormat] = [cls.adapterhub for cls in METHODS.values() if cls.adapterhub]
PRESETS = {name: dict(preset) for spec in FORMATS for name, preset in spec.presets.items()}
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_LEGACY_KEYS = ("attention_text_task_adapters", "attention_text_lang_adapters")
_LEGACY_KEYS += ("layer_text_task_adapters", "layer_text_lang_adapters")


def matches(data: dict[str, Any]) -> bool:
    return "config" in data and "format" not in data


def _spec(config: dict[str, Any]) -> HubFormat:
    arch = config.get("architecture")
    for spec in FORMATS:
        if spec.architecture == arch and spec.claims(config):
            return spec
    known = sorted({str(s.architecture or "bottleneck") for s in FORMATS})
    raise unsupported(CONFIG_FILE, "architecture", arch, f"adapterkit reads {', '.join(known)}")


def to_config(data: dict[str, Any], model: nn.Module) -> AdapterConfig:
    saved = data.get("model_type")
    if saved and saved != model_type(model):
        raise AdapterFileError(
            f"{CONFIG_FILE}: saved for a {saved!r} model, this one is {model_type(model)!r}; "
            "load it into the base model it was trained on"
        )
    config = _legacy(data)
    return _spec(config).to_config(config, model)


def _legacy(data: dict[str, Any]) -> dict[str, Any]:
    """The config dict with old versions' quirks applied as AdapterHub's own loader does."""
    config = data["config"]
    if isinstance(config, str):
        if config not in PRESETS:
            raise unsupported(CONFIG_FILE, "config", config, f"known presets: {', '.join(PRESETS)}")
        config = PRESETS[config]
    config = dict(config)
    version = str(data.get("version", ""))
    if "version" not in data and config.get("non_linearity") in _LEGACY_ACTIVATIONS:
        config["non_linearity"] = _LEGACY_ACTIVATIONS[config["non_linearity"]]
    if version.startswith("adapters.") and config.get("architecture") == "lora":
        try:
            old = Version(version.removeprefix("adapters.")) < Version("1.1.0")
        except InvalidVersion:
            old = False
        if old:
            config["alpha"] = config["r"]  # AdapterHub's fix for its pre-1.1.0 LoRA scaling
    return config


def _format(config: AdapterConfig) -> HubFormat:
    if getattr(config, "use_gating", False):
        raise unsupported(NAME, "use_gating", True, "save as 'adapterkit'")
    if type(config).adapterhub is None:
        raise unsupported(NAME, "method", config.method, "save as 'adapterkit'")
    return type(config).adapterhub


def key_map(model: nn.Module, name: str, peer_name: str) -> dict[str, str]:
    spec = _format(adapters.known(model, name).configs[name])
    return {e.key: spec.key(model, e, peer_name) for e in entries(model, name)}


def read(folder: Path, data: dict[str, Any], with_head: bool) -> tuple[dict, dict, Path]:
    """``(adapter tensors, head tensors, weights file)``, legacy key names renamed."""
    file = first_file(folder, WEIGHTS)
    raw = {}
    for key, value in read_tensors(file).items():
        for old in _LEGACY_KEYS:
            key = key.replace(old, "adapters")
        raw[key] = value
    spec = _spec(_legacy(data))
    raw = spec.reading(data, raw) if spec.reading else raw
    return raw, _read_head(folder) if with_head else {}, file


def _read_head(folder: Path) -> dict[str, torch.Tensor]:
    if not (folder / HEAD_CONFIG).is_file():
        return {}
    head_config = read_json(folder / HEAD_CONFIG)
    if head_config.get("config") is not None:
        raise AdapterFileError(
            f"{folder / HEAD_CONFIG}: a flexible AdapterHub head ({head_config['config'].get('head_type')}) has no "
            "transformers equivalent; pass load_head=False and train a head, or save it from a static head model"
        )
    return read_tensors(first_file(folder, HEAD_WEIGHTS))


def export(model: nn.Module, name: str, config: AdapterConfig, with_head: bool) -> tuple[dict, dict]:
    spec, found = _format(config), list(entries(model, name))
    meta = {
        "hidden_size": model.config.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model.config, "name_or_path", "") or "",
        "model_type": model_type(model),
        "version": VERSION,
    }
    jsons = {CONFIG_FILE: {"config": spec.fields(config, model, found), **meta, "name": name}}
    tensors = {WEIGHTS[0]: _tensors(model, name, spec, found)}
    head = head_parameters(model) if with_head else {}
    if head:
        labels = {"label2id": model.config.label2id, "num_labels": model.config.num_labels}
        jsons[HEAD_CONFIG] = {"config": None, **meta, **labels, "name": None}
        tensors[HEAD_WEIGHTS[0]] = {k: p.detach() for k, p in head.items()}
    return jsons, tensors


@torch.no_grad()
def _tensors(model: nn.Module, name: str, spec: HubFormat, found: list[Entry]) -> dict[str, torch.Tensor]:
    out = {spec.key(model, e, name): spec.tensor(e) for e in found}
    out = spec.writing(model, found, out) if spec.writing else out
    return {base_prefix(model) + k: v for k, v in out.items()}


def describe(data: dict[str, Any]) -> dict[str, Any]:
    """Name, method, config and base model of an AdapterHub config, for ``inspect``."""
    config = data["config"]
    method = config if isinstance(config, str) else config.get("architecture") or "bottleneck"
    if method == "lora" and not isinstance(config, str) and config.get("composition_mode") == "scale":
        method = "ia3"
    base = {"name_or_path": data.get("model_name") or None, "model_type": data.get("model_type"), "fingerprint": None}
    return {"name": data.get("name"), "method": method, "config": config, "base_model": base}
