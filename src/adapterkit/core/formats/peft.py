"""Hugging Face peft's adapter folders (peft 0.21), heads in ``modules_to_save``.

``adapter_config.json`` is peft's config dataclass; ``adapter_model.safetensors`` (or ``.bin``)
keys are ``base_model.model.<module path>.<parameter>`` with the adapter name stripped. What each
method's fields and tensors are in peft's terms is registered in the method's own file
(``AdapterConfig.peft``, :class:`~adapterkit.core.peft_spec.PeftFormat`); this module only
dispatches on ``peft_type`` and handles what all methods share (wrapper keys, heads, task types).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from adapterkit.core import adapters
from adapterkit.core.backbone import base_prefix, head_parameters
from adapterkit.core.entries import CONFIG_FILE, Entry, entries, unsupported
from adapterkit.core.formats import first_file, read_tensors
from adapterkit.core.methods import METHODS, AdapterConfig
from adapterkit.core.peft_spec import WRAPPER, PeftFormat
from adapterkit.core.state import FIXED

NAME = "peft"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FORMATS: dict[str, PeftFormat] = {cls.peft.peft_type: cls.peft for cls in METHODS.values() if cls.peft}
# options that change what an adapter computes and that adapterkit does not reproduce
_REFUSED = (
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "layer_replication",
    "trainable_token_indices",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "megatron_config",
)


def matches(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def to_config(data: dict[str, Any], model: nn.Module) -> AdapterConfig:
    kind = data["peft_type"]
    accepted = FORMATS[kind].accepts if kind in FORMATS else frozenset()
    for option in _REFUSED:
        if data.get(option) and option not in accepted:
            raise unsupported(CONFIG_FILE, option, data[option])
    if data.get("bias", "none") != "none":
        raise unsupported(CONFIG_FILE, "bias", data["bias"], "train the biases in your own head instead")
    if data.get("num_transformer_submodules", 1) != 1:
        raise unsupported(CONFIG_FILE, "num_transformer_submodules", data["num_transformer_submodules"])
    if kind not in FORMATS:
        raise unsupported(CONFIG_FILE, "peft_type", kind, f"adapterkit reads {', '.join(sorted(FORMATS))}")
    return FORMATS[kind].to_config(data, model)


def _format(config: AdapterConfig) -> PeftFormat:
    if type(config).peft is None:
        raise unsupported(
            NAME, "method", config.method, "peft has no such adapters; save as 'adapterhub' or 'adapterkit'"
        )
    return type(config).peft


def _saved(spec: PeftFormat, found: list[Entry]) -> list[Entry]:
    """The entries peft's file holds: all but the fixed ones peft derives from the base (PiSSA's start)."""
    return [e for e in found if not e.local.startswith(f"{FIXED}.") or e.local in spec.outside]


def key_map(model: nn.Module, name: str, peer_name: str) -> dict[str, str]:
    spec = _format(adapters.known(model, name).configs[name])
    return {e.key: spec.key(e) for e in _saved(spec, list(entries(model, name)))}


def read(folder: Path, data: dict[str, Any], with_head: bool) -> tuple[dict, dict, Path]:
    """``(adapter tensors, head tensors, weights file)``, keys without peft's wrapper prefix."""
    file = first_file(folder, WEIGHTS)
    raw = {k.removeprefix(WRAPPER): v for k, v in read_tensors(file).items()}
    spec = FORMATS.get(data.get("peft_type"))
    raw = spec.reading(data, raw) if spec and spec.reading else raw
    heads = tuple(f"{m}." for m in data.get("modules_to_save") or ())
    head = {k: v for k, v in raw.items() if k.startswith(heads)}
    return {k: v for k, v in raw.items() if k not in head}, head if with_head else {}, file


def export(model: nn.Module, name: str, config: AdapterConfig, with_head: bool) -> tuple[dict, dict]:
    """``({adapter_config.json: peft config}, {adapter_model.safetensors: tensors})``."""
    spec, found = _format(config), list(entries(model, name))
    head = head_parameters(model) if with_head else {}
    data = {
        "peft_type": spec.peft_type,
        "task_type": _task_type(model) or spec.task_type,
        "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": sorted({k.split(".")[0] for k in head}) or None,
        **spec.fields(config, model, found),
    }
    tensors = {spec.file_key(e, base_prefix(model)): spec.tensor(e).detach() for e in _saved(spec, found)}
    tensors = spec.writing(model, found, tensors) if spec.writing else tensors
    tensors.update({WRAPPER + k: p.detach() for k, p in head.items()})
    return {CONFIG_FILE: data}, {WEIGHTS[0]: tensors}


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def describe(data: dict[str, Any]) -> dict[str, Any]:
    """Name, method, config and base model of a peft config, for ``inspect``."""
    base = {"name_or_path": data.get("base_model_name_or_path"), "model_type": None, "fingerprint": None}
    return {"name": "default", "method": data["peft_type"], "config": data, "base_model": base}
