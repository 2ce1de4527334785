"""The frozen base model seen through adapters: its prefix, its task head, its fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from adapterkit.core import state as st
from adapterkit.core.arch import model_type
from adapterkit.core.state import base_named_parameters
from adapterkit.errors import AdapterFileError

BASE_FINGERPRINT = "_adapterkit_base_fingerprint"  # a quantized model's fingerprint, taken before quantizing


def base_prefix(model: nn.Module) -> str:
    """``"bert."`` for a model with a task head around its backbone, ``""`` for a bare model.

    Saved adapter keys are relative to the backbone, so an adapter trained with a head loads into
    a bare model and back.
    """
    base = getattr(model, "base_model", model)
    for name, child in model.named_children():
        if child is base:
            return name + "."
    # A head model whose backbone attribute is not base_model_prefix (WhisperForAudioClassification.encoder);
    # not a bare model's own sub-model that its inputs bypass (transformers 5's Dinov2Model.encoder).
    backbones = [name for name, child in model.named_children() if isinstance(child, PreTrainedModel)]
    if base is model and len(backbones) == 1 and _takes_inputs(model, model.get_submodule(backbones[0])):
        return backbones[0] + "."
    return ""


def _takes_inputs(model: nn.Module, child: nn.Module) -> bool:
    """Whether ``model``'s input embeddings lie inside ``child`` (True where the model does not say)."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # vision and speech models have no input embeddings to find
        return True
    return embeddings is None or any(m is embeddings for m in child.modules())


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Backbone parameters by name relative to the backbone, adapters excluded."""
    prefix = base_prefix(model)
    return {name[len(prefix) :]: p for name, p in base_named_parameters(model) if name.startswith(prefix)}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Task-head parameters (outside the backbone) by their full name; empty for a bare model."""
    prefix = base_prefix(model)
    if not prefix:
        return {}
    return {n: p for n, p in base_named_parameters(model) if not n.startswith(prefix)}


@torch.no_grad()
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identify the backbone: each parameter's shape and 4 of its values, evenly spaced.

    The values are compared with a tolerance (:func:`same_base`), so the same checkpoint loaded in
    bf16 or fp32 matches while another checkpoint of the same architecture does not. The head is
    left out, so ``num_labels`` does not matter. A model quantized by
    :func:`adapterkit.core.quantize.quantize_base` gives its full-precision fingerprint.
    """
    if BASE_FINGERPRINT in model.__dict__:
        return model.__dict__[BASE_FINGERPRINT]
    out = {}
    for name, p in base_parameters(model).items():
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4)][:4].float().cpu().tolist()
        out[name] = {"shape": list(p.shape), "sample": sample}
    return out


def same_base(saved: Any, current: dict[str, Any]) -> bool:
    """True when two fingerprints describe the same checkpoint (up to a dtype cast).

    Optional parts such as BERT's pooler may be absent on one side: the shared parameters must
    cover 90% of each side and agree in shape and values.
    """
    if not isinstance(saved, dict) or not current:
        return False
    common = saved.keys() & current.keys()
    if len(common) < 0.9 * max(len(saved), len(current)):
        return False
    for name in common:
        a, b = saved[name], current[name]
        if list(a.get("shape", [])) != b["shape"] or len(a.get("sample", [])) != len(b["sample"]):
            return False
        if not torch.allclose(torch.tensor(a["sample"]), torch.tensor(b["sample"]), rtol=1e-2, atol=1e-3):
            return False
    return True


def check_base(model: nn.Module, saved: dict[str, Any], path: Path | str) -> None:
    """Refuse an adapter ``saved`` for another base model: its type, then its fingerprint (:func:`same_base`)."""
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
