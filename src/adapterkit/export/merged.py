"""A plain transformers checkpoint with an adapter merged into its weights: ``from_pretrained`` loads it
without adapterkit (no adapter keys, the model's own config and tokenizer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core import adapters
from adapterkit.core import state as st
from adapterkit.errors import AdapterError


@contextlib.contextmanager
def merged(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """``model`` with adapter ``name`` merged into its weights inside the block, unmerged after it."""
    check_untied(model, name)
    adapters.merge_adapter(model, name)
    try:
        yield model
    finally:
        adapters.unmerge_adapter(model, name)


def check_untied(model: nn.Module, name: str) -> None:
    """Refuse an adapter on a weight shared by two modules (tied embeddings): merged, it would change both,
    while unmerged it changes one."""
    counts: dict[int, int] = {}
    for _, module in st.base_modules(model):
        weight = module._parameters.get("weight")
        if weight is not None:
            counts[id(weight)] = counts.get(id(weight), 0) + 1
    hosts = {id(module): path for path, module in st.base_modules(model)}
    for host, _ in st.adapter_modules(model, name):
        if counts.get(id(getattr(host, "weight", None)), 0) > 1:
            raise AdapterError(
                f"adapter {name!r} adapts {hosts[id(host)]}, whose weight is tied to another module's "
                "(the embeddings): merged, it would change both; it cannot be exported merged"
            )


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own state dict: every entry but adapterkit's."""
    return {k: v for k, v in model.state_dict().items() if not st.is_adapter_param(k)}


def write_checkpoint(model: nn.Module, tokenizer: Any, name: str, folder: Path) -> None:
    """Save ``model`` with adapter ``name`` merged (safetensors, config, generation config) and ``tokenizer``
    into ``folder``; ``model`` is left as it was."""
    with merged(model, name):
        model.save_pretrained(folder, state_dict=base_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_merged(model_dir: str, adapter: str, out: str | Path) -> Path:
    """``adapterkit export --to merged``: ``model_dir`` with ``adapter`` merged, as a plain transformers
    checkpoint in folder ``out`` (safetensors, config, tokenizer). A method that cannot be merged, or a
    folder holding the user's files, raises :class:`AdapterError` before anything is written."""
    from adapterkit.export import load, output

    if not adapter:
        raise AdapterError("--to merged merges an adapter into the model: pass --adapter")
    output.earlier_files(Path(out))
    model, tokenizer, name = load.load(model_dir, adapter, causal=False)

    def fill(tmp: Path) -> dict[str, Any]:
        write_checkpoint(model, tokenizer, name, tmp)
        return {"target": "merged", "base_model": model_dir, "adapter": name}

    return output.write_export(out, fill)
