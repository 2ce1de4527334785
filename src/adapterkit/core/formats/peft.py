"""Hugging Face peft's adapter folders (peft 0.21): LORA (DoRA, rsLoRA, Embedding, Conv, GPT-2's
``fan_in_fan_out``), IA3, PREFIX_TUNING and PROMPT_TUNING, heads in ``modules_to_save``.

``adapter_config.json`` is peft's config dataclass; ``adapter_model.safetensors`` (or ``.bin``)
keys are ``base_model.model.<module path>.<parameter>`` with the adapter name stripped. Prefix
tuning stores the prefix MLP's *output* ``prompt_embeddings`` (P, L * 2 * H), and passes it as
past keys and values, so real tokens sit at positions P..P+T-1: adapterkit loads it with
``shift_positions=True``. Prompt tuning goes before position embeddings: decoders only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core.arch import is_conv1d, model_type, spec_for
from adapterkit.core.backbone import base_prefix, head_parameters
from adapterkit.core.formats import CONFIG_FILE, entries, exact_regex, first_file, read_tensors, unsupported
from adapterkit.core.methods import AdapterConfig, IA3Config, LoRAConfig, PrefixConfig, PromptConfig
from adapterkit.core.methods.ia3 import IA3Input
from adapterkit.core.methods.prefix import Prefix, attention_shape

NAME = "peft"
WRAPPER = "base_model.model."
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LOCAL = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_GLOBAL = {"prompt_embedding": "prompt_embeddings", "generator.prefix": "prompt_embeddings"}
# options that change what an adapter computes and that adapterkit does not reproduce
_REFUSED = (
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "megatron_config",
)


def matches(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def to_config(data: dict[str, Any], model: nn.Module) -> AdapterConfig:
    kind = data["peft_type"]
    for option in _REFUSED:
        if data.get(option):
            raise unsupported(CONFIG_FILE, option, data[option])
    if data.get("bias", "none") != "none":
        raise unsupported(CONFIG_FILE, "bias", data["bias"], "train the biases in your own head instead")
    if data.get("num_transformer_submodules", 1) != 1:
        raise unsupported(CONFIG_FILE, "num_transformer_submodules", data["num_transformer_submodules"])
    if kind == "LORA":
        return LoRAConfig(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0),
            target_modules=_targets(data["target_modules"]),
            use_rslora=data.get("use_rslora", False),
            use_dora=data.get("use_dora", False),
        )
    if kind == "IA3":
        ff = data.get("feedforward_modules")
        return IA3Config(
            target_modules=_targets(data["target_modules"]), feedforward_modules=_targets(ff) if ff else None
        )
    if kind == "PREFIX_TUNING":
        return PrefixConfig(prefix_length=data["num_virtual_tokens"], flat=True, shift_positions=True)
    if kind == "PROMPT_TUNING":
        if not spec_for(model).prompt_before_positions:
            raise _encoder_prompt_error(model)
        return PromptConfig(prompt_length=data["num_virtual_tokens"])
    raise unsupported(CONFIG_FILE, "peft_type", kind, "adapterkit reads LORA, IA3, PREFIX_TUNING and PROMPT_TUNING")


def _encoder_prompt_error(model: nn.Module) -> Exception:
    return unsupported(
        CONFIG_FILE,
        "peft_type",
        "PROMPT_TUNING",
        f"on an encoder ({model_type(model)}) peft puts prompts before the position embeddings, adapterkit "
        "after them (AdapterHub's placement); peft prompt files load into decoders (GPT-2, Llama)",
    )


def _targets(targets: list[str] | str) -> list[str] | str:
    if targets in ("all-linear", ["all-linear"]):
        raise unsupported(CONFIG_FILE, "target_modules", targets, "list the module names instead")
    return targets if isinstance(targets, str) else sorted(targets)


def key_map(model: nn.Module, name: str, peer_name: str) -> dict[str, str]:
    return {e.key: _GLOBAL.get(e.local) or f"{e.host}.{_LOCAL.get(e.local, e.local)}" for e in entries(model, name)}


def read(folder: Path, data: dict[str, Any], with_head: bool) -> tuple[dict, dict, Path]:
    """``(adapter tensors, head tensors, weights file)``, keys without peft's wrapper prefix."""
    file = first_file(folder, WEIGHTS)
    raw = {k.removeprefix(WRAPPER): v for k, v in read_tensors(file).items()}
    heads = tuple(f"{m}." for m in data.get("modules_to_save") or ())
    head = {k: v for k, v in raw.items() if k.startswith(heads)}
    return {k: v for k, v in raw.items() if k not in head}, head if with_head else {}, file


def export(model: nn.Module, name: str, config: AdapterConfig, with_head: bool) -> tuple[dict, dict]:
    """``({adapter_config.json: peft config}, {adapter_model.safetensors: tensors})``."""
    head = head_parameters(model) if with_head else {}
    data = {
        "peft_type": None,
        "task_type": _task_type(model, config),
        "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": sorted({k.split(".")[0] for k in head}) or None,
        **_method_fields(model, name, config),
    }
    prefix = WRAPPER + base_prefix(model)
    tensors = {(prefix if "." in k else WRAPPER) + k: v for k, v in _tensors(model, name, config).items()}
    tensors.update({WRAPPER + k: p.detach() for k, p in head.items()})
    return {CONFIG_FILE: data}, {WEIGHTS[0]: tensors}


def _task_type(model: nn.Module, config: AdapterConfig) -> str | None:
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
    return "FEATURE_EXTRACTION" if isinstance(config, (PrefixConfig, PromptConfig)) else None


def _method_fields(model: nn.Module, name: str, config: AdapterConfig) -> dict[str, Any]:
    found = list(entries(model, name))
    hosts = sorted({e.host for e in found})
    conv1d = {is_conv1d(model.get_submodule(_full(model, h))) for h in hosts}
    if isinstance(config, LoRAConfig):
        _refuse_gating(config)
        if len(conv1d) > 1:
            raise unsupported(
                NAME, "target_modules", config.target_modules, "peft cannot mix Conv1D and Linear targets"
            )
        return {
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": config.target_modules or list(spec_for(model).lora_targets),
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "fan_in_fan_out": True in conv1d,
            "bias": "none",
            "init_lora_weights": True,
        }
    if isinstance(config, IA3Config):
        ff = sorted({e.host for e in found if isinstance(e.module, IA3Input)})
        return {
            "peft_type": "IA3",
            "target_modules": exact_regex(hosts),
            "feedforward_modules": exact_regex(ff) if ff else [],
            "fan_in_fan_out": True in conv1d,
            "init_ia3_weights": True,
        }
    return _prompt_fields(model, config)


def _prompt_fields(model: nn.Module, config: AdapterConfig) -> dict[str, Any]:
    hidden, _, _ = attention_shape(model)
    common = {
        "num_transformer_submodules": 1,
        "num_attention_heads": model.config.num_attention_heads,
        "num_layers": model.config.num_hidden_layers,
        "token_dim": hidden,
    }
    if isinstance(config, PrefixConfig):
        _refuse_gating(config)
        if not config.shift_positions:
            raise unsupported(
                NAME,
                "PrefixConfig.shift_positions",
                False,
                "peft moves real tokens to positions P..P+T-1; train with shift_positions=True to export to peft",
            )
        n = config.prefix_length
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": n, "encoder_hidden_size": hidden, **common}
    if isinstance(config, PromptConfig):
        if not spec_for(model).prompt_before_positions:
            raise _encoder_prompt_error(model)
        n = config.prompt_length
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n, "prompt_tuning_init": "RANDOM", **common}
    raise unsupported(NAME, "method", config.method, "peft has no such adapters; save as 'adapterhub' or 'adapterkit'")


def _refuse_gating(config: AdapterConfig) -> None:
    if getattr(config, "use_gating", False):
        raise unsupported(NAME, "use_gating", True, "peft has no gated adapters (UniPELT)")


def _full(model: nn.Module, host: str) -> str:
    return base_prefix(model) + host if host else base_prefix(model)[:-1]


@torch.no_grad()
def _tensors(model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    keys = key_map(model, name, name)
    out = {}
    for e in entries(model, name):
        if isinstance(e.module, Prefix):
            out["prompt_embeddings"] = e.module.generator.full().detach()  # peft saves the MLP's output
        elif e.local == "ia3_l":
            out[keys[e.key]] = e.param[None] if isinstance(e.module, IA3Input) else e.param[:, None]
        else:
            out[keys[e.key]] = e.param
    return out


def describe(data: dict[str, Any]) -> dict[str, Any]:
    """Name, method, config and base model of a peft config, for ``inspect``."""
    base = {"name_or_path": data.get("base_model_name_or_path"), "model_type": None, "fingerprint": None}
    return {"name": "default", "method": data["peft_type"], "config": data, "base_model": base}
