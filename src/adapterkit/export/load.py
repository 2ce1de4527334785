"""The model an export reads: the base in fp32 (a folder or Hub id) with one adapter loaded and active."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError


def adapter_source(value: str) -> tuple[str | None, Path]:
    """``[NAME=]PATH``: an adapter folder (adapterkit, peft, AdapterHub), an ``adapterkit train`` output or a
    ``hub:owner/name[@tag]`` reference (pulled into the cache): the name and the adapter's folder."""
    from adapterkit.hub.client import is_ref, resolve

    name, sep, path = value.partition("=")
    if not sep or "/" in name:
        name, path = None, value
    if not is_ref(path) and not Path(path).exists():
        raise AdapterError(f"--adapter {value!r}: no such folder")
    return name or None, resolve(path)


def num_labels(head: dict[str, list[int]]) -> int | None:
    """A classification head's outputs: the smallest first axis among its matrices (None: no head)."""
    shapes = [shape for key, shape in head.items() if key.endswith("weight") and len(shape) == 2]
    return min(shape[0] for shape in shapes) if shapes else None


def load(model_dir: str, adapter: str | None, causal: bool = True) -> tuple[Any, Any, str | None]:
    """``(model, tokenizer, adapter name)``: the base (fp32, eval mode) with ``adapter`` loaded and active.

    ``causal``: a causal LM; otherwise the class the adapter needs (a sequence classifier when it carries
    a head, else the config's own architecture)."""
    import torch
    import transformers

    from adapterkit.core.io import inspect_adapter, load_adapter
    from adapterkit.core.pretrained import from_pretrained

    name, folder = adapter_source(adapter) if adapter else (None, None)
    labels = num_labels(inspect_adapter(folder)["head"]) if folder and not causal else None
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if causal:
        auto = transformers.AutoModelForCausalLM
    elif labels:
        auto, kwargs["num_labels"] = transformers.AutoModelForSequenceClassification, labels
    else:
        auto = _own_class(from_pretrained(transformers.AutoConfig, model_dir))
    model = from_pretrained(auto, model_dir, **kwargs).eval()
    tokenizer = _tokenizer(model_dir)
    if folder is not None:
        name = load_adapter(model, folder, name, activate=True)
    return model, tokenizer, name


def _own_class(config: Any) -> Any:
    """The transformers class a config names (``architectures[0]``), else ``AutoModel``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0]) if names and hasattr(transformers, names[0]) else transformers.AutoModel


def _tokenizer(model_dir: str) -> Any:
    """The model's tokenizer, or None where it has none (a checkpoint of weights only)."""
    from transformers import AutoTokenizer

    from adapterkit.core.pretrained import from_pretrained

    try:
        return from_pretrained(AutoTokenizer, model_dir)
    except AdapterError:
        return None
