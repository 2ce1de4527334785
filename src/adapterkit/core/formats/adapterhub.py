"""AdapterHub ``adapters``' folders (1.3.0 and older): seq_bn, double_seq_bn, par_bn, lora, ia3,
prefix_tuning, prompt_tuning; static heads (``head_config.json`` with ``"config": null``).

``adapter_config.json`` is ``{"config": {...}, "model_class", "model_type", "name", "version", ...}``;
weights ``adapter.safetensors`` or ``pytorch_adapter.bin`` hold raw ``state_dict`` keys:
``<layer>.output.adapters.<name>.adapter_down.0.weight``, ``<module>.loras.<name>.lora_A``,
``prefix_tuning.prefix_tunings.<name>.self_prefix.*`` (and a copy under every layer).
Legacy files: no ``version`` means old activation names; LoRA before 1.1.0 ran with alpha = r.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from adapterkit.core.arch import find_layers, model_type, spec_for
from adapterkit.core.backbone import base_prefix, head_parameters
from adapterkit.core.entries import CONFIG_FILE, entries, exact_regex, unsupported
from adapterkit.core.formats import first_file, read_json, read_tensors
from adapterkit.core.methods import AdapterConfig, BottleneckConfig, IA3Config, LoRAConfig, PrefixConfig, PromptConfig
from adapterkit.core.methods.bottleneck import INITS
from adapterkit.core.methods.ia3 import IA3Input
from adapterkit.errors import AdapterFileError

NAME = "adapterhub"
VERSION = "adapters.1.3.0"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")

_BERT_SITES = ("attention.output", "output")  # where a layer's (attention, output) adapters live
_BERT_MATRICES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
SITES = {"bert": _BERT_SITES, "roberta": _BERT_SITES, "xlm-roberta": _BERT_SITES, "electra": _BERT_SITES}
SITES["gpt2"] = ("attention_adapters", "output_adapters")
# LoRA/IA3 targets; GPT-2's fused c_attn takes AdapterHub's grouped q/k/v LoRA, not covered here
MATRICES = {kind: _BERT_MATRICES for kind in ("bert", "roberta", "xlm-roberta", "electra")}

_BN = {
    "mh_adapter": False,
    "output_adapter": True,
    "reduction_factor": 16,
    "non_linearity": "relu",
    "original_ln_before": True,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "init_weights": "bert",
    "init_weights_seed": None,
    "is_parallel": False,
    "scaling": 1.0,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "cross_adapter": False,
    "leave_out": [],
    "dropout": 0.0,
    "phm_layer": False,
    "stochastic_depth": 0.0,
}
_BN_FIXED = ("original_ln_after", "ln_before", "ln_after", "residual_before_ln", "adapter_residual_before_ln")
_BN_FIXED += ("inv_adapter", "cross_adapter", "phm_layer", "use_gating", "stochastic_depth")
_BN_SHARED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before")
_BN_SHARED += ("is_parallel", "scaling", "init_weights", "dropout", "leave_out")
_LORA = {
    "architecture": "lora",
    "selfattn_lora": True,
    "intermediate_lora": False,
    "output_lora": False,
    "leave_out": [],
    "r": 8,
    "alpha": 8,
    "dropout": 0.0,
    "attn_matrices": ["q", "v"],
    "composition_mode": "add",
    "init_weights": "lora",
    "init_weights_seed": None,
    "use_gating": False,
    "use_dora": False,
    "vera_d": None,
    "vera_b": None,
    "dtype": None,
}
_IA3 = {**_LORA, "intermediate_lora": True, "r": 1, "alpha": 1, "attn_matrices": ["k", "v"]}
_IA3.update(composition_mode="scale", init_weights="ia3")
_PREFIX = {
    "architecture": "prefix_tuning",
    "encoder_prefix": True,
    "cross_prefix": True,
    "leave_out": [],
    "flat": False,
    "prefix_length": 30,
    "bottleneck_size": 512,
    "non_linearity": "tanh",
    "dropout": 0.0,
    "use_gating": False,
    "shared_gating": True,
    "init_weights_seed": None,
}
_PROMPT = {"architecture": "prompt_tuning", "prompt_length": 10, "prompt_init": "random_uniform"}
_PROMPT.update(prompt_init_text=None, combine="prefix", init_weights_seed=None)
PRESETS = {"pfeiffer": _BN, "seq_bn": _BN, "lora": _LORA, "ia3": _IA3, "prefix_tuning": _PREFIX}
PRESETS |= {"houlsby": {**_BN, "mh_adapter": True, "non_linearity": "swish", "original_ln_before": False}}
PRESETS["double_seq_bn"] = PRESETS["houlsby"]
PRESETS["par_bn"] = PRESETS["parallel"] = {**_BN, "reduction_factor": 2, "original_ln_before": False} | {
    "is_parallel": True,
    "scaling": 4.0,
    "init_weights": "mam_adapter",
}
PRESETS["prompt_tuning"] = _PROMPT
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_LEGACY_KEYS = ("attention_text_task_adapters", "attention_text_lang_adapters")
_LEGACY_KEYS += ("layer_text_task_adapters", "layer_text_lang_adapters")
_POOL = ".prefix_tuning.pool.prefix_tunings."  # the per-layer copies of the prefix


def matches(data: dict[str, Any]) -> bool:
    return "config" in data and "format" not in data


def to_config(data: dict[str, Any], model: nn.Module) -> AdapterConfig:
    saved = data.get("model_type")
    if saved and saved != model_type(model):
        raise AdapterFileError(
            f"{CONFIG_FILE}: saved for a {saved!r} model, this one is {model_type(model)!r}; "
            "load it into the base model it was trained on"
        )
    config = _legacy(data)
    arch = config.get("architecture")
    if arch is None:
        return _parallel_fits(_bottleneck(config), model)
    if arch == "lora":
        return _lora(config, model)
    if arch == "prefix_tuning":
        return _prefix(config)
    if arch == "prompt_tuning":
        return _prompt(config, model)
    raise unsupported(CONFIG_FILE, "architecture", arch, "adapterkit reads bottleneck, lora, ia3, prefix and prompt")


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


def _bottleneck(config: dict[str, Any]) -> BottleneckConfig:
    for option in _BN_FIXED:
        if option in config and config[option] != _BN[option]:
            raise unsupported(CONFIG_FILE, option, config[option])
    for option in ("reduction_factor", "scaling"):
        if not isinstance(config.get(option, 1), (int, float)):
            raise unsupported(CONFIG_FILE, option, config[option])
    fields = {k: config[k] for k in _BN_SHARED if k in config}
    if fields.get("init_weights") not in INITS:
        fields["init_weights"] = "bert"  # an init scheme only; the loaded weights replace it
    return BottleneckConfig(**fields)


def _parallel_fits(config: BottleneckConfig, model: nn.Module) -> BottleneckConfig:
    if config.is_parallel and not spec_for(model).post_ln:
        raise unsupported(
            NAME,
            "is_parallel",
            True,
            f"on a pre-LN model ({model_type(model)}) AdapterHub feeds a parallel adapter the residual stream "
            "before the LayerNorm, adapterkit the sub-layer's input: their outputs differ",
        )
    return config


def _lora(config: dict[str, Any], model: nn.Module) -> AdapterConfig:
    for option in ("use_dora", "use_gating", "vera_d", "vera_b"):
        if config.get(option):
            raise unsupported(CONFIG_FILE, option, config[option])
    targets = exact_regex(_lora_hosts(config, model))
    if config.get("composition_mode", "add") == "scale":
        return IA3Config(convention="adapterhub", target_modules=targets)
    return LoRAConfig(r=config["r"], alpha=config["alpha"], dropout=config.get("dropout", 0.0), target_modules=targets)


def _lora_hosts(config: dict[str, Any], model: nn.Module) -> list[str]:
    kind = model_type(model)
    if kind not in MATRICES:
        raise unsupported(CONFIG_FILE, "architecture", "lora", f"AdapterHub LoRA/IA3 on {kind!r} is not mapped")
    names = MATRICES[kind]
    wanted = [names[m] for m in config.get("attn_matrices", [])] if config.get("selfattn_lora", True) else []
    wanted += [names[m] for m in ("intermediate", "output") if config.get(f"{m}_lora")]
    skip = set(config.get("leave_out") or ())
    return [f"{layer}.{m}" for i, layer in enumerate(_layers(model)) if i not in skip for m in wanted]


def _prefix(config: dict[str, Any]) -> PrefixConfig:
    for option, allowed in (("use_gating", False), ("non_linearity", "tanh"), ("encoder_prefix", True)):
        if config.get(option, allowed) != allowed:
            raise unsupported(CONFIG_FILE, option, config[option])
    if config.get("leave_out"):
        raise unsupported(CONFIG_FILE, "leave_out", config["leave_out"])
    fields = ("prefix_length", "bottleneck_size", "flat", "dropout")
    return PrefixConfig(**{k: config[k] for k in fields if k in config})


def _prompt(config: dict[str, Any], model: nn.Module) -> PromptConfig:
    if config.get("combine", "prefix") != "prefix":
        raise unsupported(CONFIG_FILE, "combine", config["combine"])
    if spec_for(model).prompt_before_positions:
        raise unsupported(
            CONFIG_FILE, "architecture", "prompt_tuning", f"AdapterHub has no prompts on {model_type(model)}"
        )
    return PromptConfig(prompt_length=config["prompt_length"])


def _layers(model: nn.Module) -> list[str]:
    prefix = base_prefix(model)
    return [path.removeprefix(prefix) for path, _ in find_layers(model, spec_for(model))]


def key_map(model: nn.Module, name: str, peer_name: str) -> dict[str, str]:
    layers, spec = _layers(model), spec_for(model)
    out = {}
    for e in entries(model, name):
        if e.local.startswith("bottleneck."):
            out[e.key] = _bottleneck_key(model, layers, spec.attn_in, e.host, e.local, peer_name)
        elif e.local in ("lora_A", "lora_B", "ia3_l"):
            out[e.key] = f"{e.host}.loras.{peer_name}.{'lora_B' if e.local == 'ia3_l' else e.local}"
        elif e.local.startswith("generator."):
            leaf = e.local.removeprefix("generator.").replace("prefix", "control_trans")
            out[e.key] = f"prefix_tuning.prefix_tunings.{peer_name}.self_prefix.{leaf}"
        elif e.local == "prompt_embedding":
            out[e.key] = f"prompt_tuning.prompt_tunings.{peer_name}.prompt_embedding.weight"
        else:
            raise unsupported(NAME, "parameter", e.key, "AdapterHub has no equivalent")
    return out


def _bottleneck_key(model: nn.Module, layers: list[str], attn: str, host: str, local: str, peer: str) -> str:
    kind = model_type(model)
    if kind not in SITES:
        raise unsupported(
            NAME, "model_type", kind, "AdapterHub's bottleneck key layout is mapped for bert-like and gpt2"
        )
    layer = max((lay for lay in layers if host == lay or host.startswith(lay + ".")), key=len)
    rest = host.removeprefix(layer).lstrip(".")
    site = SITES[kind][0 if rest.split(".")[0] == attn.split(".")[0] else 1]
    leaf = re.sub(r"^bottleneck\.adapter_down\.", "adapter_down.0.", local).removeprefix("bottleneck.")
    return f"{layer}.{site}.adapters.{peer}.{leaf}"


def read(folder: Path, data: dict[str, Any], with_head: bool) -> tuple[dict, dict, Path]:
    """``(adapter tensors, head tensors, weights file)``; the per-layer prefix copies are dropped."""
    file = first_file(folder, WEIGHTS)
    raw = {}
    for key, value in read_tensors(file).items():
        for old in _LEGACY_KEYS:
            key = key.replace(old, "adapters")
        if _POOL not in key:  # the per-layer copies of the prefix duplicate the top-level tensors
            raw[key] = value
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
    meta = {
        "hidden_size": model.config.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model.config, "name_or_path", "") or "",
        "model_type": model_type(model),
        "version": VERSION,
    }
    jsons = {CONFIG_FILE: {"config": _config_dict(model, name, config), **meta, "name": name}}
    tensors = {WEIGHTS[0]: _tensors(model, name, config)}
    head = head_parameters(model) if with_head else {}
    if head:
        labels = {"label2id": model.config.label2id, "num_labels": model.config.num_labels}
        jsons[HEAD_CONFIG] = {"config": None, **meta, **labels, "name": None}
        tensors[HEAD_WEIGHTS[0]] = {k: p.detach() for k, p in head.items()}
    return jsons, tensors


def _config_dict(model: nn.Module, name: str, config: AdapterConfig) -> dict[str, Any]:
    if getattr(config, "use_gating", False):
        raise unsupported(NAME, "use_gating", True, "save as 'adapterkit'")
    if isinstance(config, BottleneckConfig):
        return _bottleneck_dict(model, _parallel_fits(config, model))
    if isinstance(config, (LoRAConfig, IA3Config)):
        return _lora_dict(model, name, config)
    if isinstance(config, PrefixConfig):
        if config.shift_positions:
            raise unsupported(NAME, "shift_positions", True, "AdapterHub keeps positions; save as 'peft'")
        return {**_PREFIX, **{k: getattr(config, k) for k in ("prefix_length", "bottleneck_size", "flat", "dropout")}}
    if isinstance(config, PromptConfig):
        _prompt({"prompt_length": config.prompt_length}, model)  # raises on decoders
        return {**_PROMPT, "prompt_length": config.prompt_length}
    raise unsupported(NAME, "method", config.method, "save as 'adapterkit'")


def _bottleneck_dict(model: nn.Module, config: BottleneckConfig) -> dict[str, Any]:
    if config.phm_layer:
        raise unsupported(NAME, "phm_layer", True, "Compacter's PHM layout differs; save as 'adapterkit'")
    out = {**_BN, **{k: getattr(config, k) for k in _BN_SHARED}}
    hidden = model.config.hidden_size
    if config.bottleneck_size:
        factor = hidden / config.bottleneck_size
        if int(hidden // factor) != config.bottleneck_size:
            raise unsupported(
                NAME, "bottleneck_size", config.bottleneck_size, f"no reduction_factor gives it at {hidden}"
            )
        out["reduction_factor"] = factor
    return out


def _lora_dict(model: nn.Module, name: str, config: LoRAConfig | IA3Config) -> dict[str, Any]:
    found = list(entries(model, name))
    if any(isinstance(e.module, IA3Input) for e in found):
        raise unsupported(NAME, "feedforward_modules", config.feedforward_modules, "AdapterHub's IA3 scales outputs")
    layout = _lora_layout(model, sorted({e.host for e in found}), config)
    if isinstance(config, IA3Config):
        return {**_IA3, **layout}
    if config.use_dora:
        raise unsupported(NAME, "use_dora", True, "AdapterHub's DoRA computes differently; save as 'peft'")
    alpha = config.scaling * config.r if config.use_rslora else config.alpha  # AdapterHub scales by alpha / r
    return {**_LORA, **layout, "r": config.r, "alpha": alpha, "dropout": config.dropout}


def _lora_layout(model: nn.Module, hosts: list[str], config: AdapterConfig) -> dict[str, Any]:
    """AdapterHub's (attn_matrices, intermediate_lora, output_lora, leave_out) for these hosts."""
    kind, layers = model_type(model), _layers(model)
    inverse = {v: k for k, v in MATRICES.get(kind, {}).items()}
    per_layer: list[set[str]] = [set() for _ in layers]
    for host in hosts:
        i = next((i for i, lay in enumerate(layers) if host.startswith(lay + ".")), None)
        rest = host.removeprefix(f"{layers[i]}.") if i is not None else host
        if rest not in inverse:
            raise unsupported(
                NAME, "target_modules", getattr(config, "target_modules", None), f"{host} has no AdapterHub name"
            )
        per_layer[i].add(inverse[rest])
    kinds = {frozenset(s) for s in per_layer if s}
    if len(kinds) != 1:
        raise unsupported(
            NAME,
            "target_modules",
            getattr(config, "target_modules", None),
            "AdapterHub adapts the same matrices in every layer",
        )
    (chosen,) = kinds
    return {
        "selfattn_lora": bool(chosen & {"q", "k", "v"}),
        "attn_matrices": [m for m in "qkv" if m in chosen],
        "intermediate_lora": "intermediate" in chosen,
        "output_lora": "output" in chosen,
        "leave_out": [i for i, s in enumerate(per_layer) if not s],
    }


@torch.no_grad()
def _tensors(model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    keys, out = key_map(model, name, name), {}
    spec, prefix = spec_for(model), base_prefix(model)
    for e in entries(model, name):
        value = e.param[:, None] if e.local == "ia3_l" else e.param
        value = value.reshape(-1) if e.local == "generator.prefix" else value  # AdapterHub's flat prefix is 1-D
        out[keys[e.key]] = value
    if isinstance(config, PrefixConfig):  # AdapterHub also stores a copy under every layer
        top = {k: v for k, v in out.items() if k.startswith("prefix_tuning.")}
        for layer in _layers(model):
            for key, value in top.items():
                copy = f"{layer}.{spec.attn_in}{_POOL}{key.removeprefix('prefix_tuning.prefix_tunings.')}"
                out[copy] = value.clone()  # safetensors refuses tensors that share memory
    return {prefix + k: v for k, v in out.items()}


def describe(data: dict[str, Any]) -> dict[str, Any]:
    """Name, method, config and base model of an AdapterHub config, for ``inspect``."""
    config = data["config"]
    method = config if isinstance(config, str) else config.get("architecture") or "bottleneck"
    if method == "lora" and not isinstance(config, str) and config.get("composition_mode") == "scale":
        method = "ia3"
    base = {"name_or_path": data.get("model_name") or None, "model_type": data.get("model_type"), "fingerprint": None}
    return {"name": data.get("name"), "method": method, "config": config, "base_model": base}
