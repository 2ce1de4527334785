"""Trainable tokens (peft's TRAINABLE_TOKENS): train the embeddings of a few tokens, e.g. a chat template's new
special tokens, and nothing else.

The embedding of token ``t`` in ``token_indices`` becomes a trained row ``D[t]`` (init: its pre-trained value,
so the model is unchanged); every other token keeps its own. Where the model ties its output embedding to the
input one (``tie_word_embeddings``), the output layer's logits of those tokens use ``D`` too, as peft ties
them. Models that scale their embeddings inside the module (``embed_scale``) scale ``D`` alike. Mergeable (the
rows are written into the weight, and back); per row.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.arch import ArchSpec
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, find_targets, param_dtype
from adapterkit.core.peft_spec import WRAPPER, PeftFormat, exact_targets, targets
from adapterkit.core.state import base_modules

KEY = "trainable_tokens_delta"


class TrainableTokens(AdapterModule):
    """On an ``nn.Embedding``: ``(..., ) ids -> (..., dim)`` with the trained rows in place of their tokens'."""

    def __init__(self, host: nn.Embedding, indices: tuple[int, ...]) -> None:
        super().__init__()
        check(max(indices) < host.num_embeddings, f"token_indices must be < the vocabulary ({host.num_embeddings})")
        index = torch.tensor(indices, device=host.weight.device)
        lookup = torch.full((host.num_embeddings,), -1, device=host.weight.device)
        lookup[index] = torch.arange(len(indices), device=host.weight.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)  # token id -> its row, or -1
        self.trainable_tokens_delta = nn.Parameter(host.weight.detach()[index].to(param_dtype(host)).clone())
        self.merged_rows: torch.Tensor | None = None

    def adapt(self, host, x, out):
        row = self.lookup[x]
        new = self.trainable_tokens_delta[row.clamp(min=0)]
        scale = getattr(host, "embed_scale", None)
        new = new * scale if scale is not None else new
        return torch.where((row >= 0)[..., None], new.to(out.dtype), out)

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        self.merged_rows = host.weight[self.index].clone()
        host.weight[self.index] = self.trainable_tokens_delta.to(host.weight.dtype)

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        host.weight[self.index] = self.merged_rows
        self.merged_rows = None


class TiedTokens(AdapterModule):
    """On an output layer tied to the embedding: those tokens' logits from the trained rows."""

    def __init__(self, source: TrainableTokens) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)  # a reference: the parameter is the embedding adapter's

    def adapt(self, host, x, out):
        rows = self.source.trainable_tokens_delta
        logits = F.linear(x.to(rows.dtype), rows)
        if host.bias is not None:
            logits = logits + host.bias[self.source.index]
        return out.index_copy(out.ndim - 1, self.source.index, logits.to(out.dtype))

    def merge(self, host: nn.Module) -> None:
        """Nothing: the tied weight took the rows when the embedding's adapter merged."""

    def unmerge(self, host: nn.Module) -> None:
        """Nothing, as :meth:`merge`."""


def tied_output(model: nn.Module, embedding: nn.Module) -> str | None:
    """The path of the output layer that shares ``embedding``'s weight, if the model ties them."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or getattr(out, "weight", None) is not embedding.weight:
        return None
    return next(path for path, module in base_modules(model) if module is out)


def _writing(model: nn.Module, found: list[Entry], tensors: dict) -> dict:
    """peft also stores the rows under a tied output layer (the same values)."""
    source = next(e for e in found if isinstance(e.module, TrainableTokens))
    tied = tied_output(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    rows = next(v for k, v in tensors.items() if k.endswith(f"{source.host}.{KEY}"))
    return {**tensors, f"{WRAPPER}{tied}.{KEY}": rows.clone()} if tied else tensors


def _reading(data: dict, raw: dict) -> dict:
    """Drop the copies peft stores under a tied output layer, once checked equal to the embedding's rows."""
    keys = [k for k in raw if k.endswith(f".{KEY}")]
    wanted = data["target_modules"]

    def targeted(path: str) -> bool:
        if isinstance(wanted, str):
            return re.fullmatch(wanted, path) is not None
        return any(path == t or path.endswith("." + t) for t in wanted)

    own = [k for k in keys if targeted(k.removesuffix(f".{KEY}"))] or keys[:1]
    for copy in set(keys) - set(own):
        if not torch.equal(raw[copy], raw[own[0]]):
            raise unsupported(CONFIG_FILE, "tied copy", copy, "its rows differ from the embedding's")
    return {k: v for k, v in raw.items() if k in own or k not in keys}


def _from_peft(data: dict, model: nn.Module) -> TrainableTokensConfig:
    return TrainableTokensConfig(token_indices=data["token_indices"], target_modules=targets(data["target_modules"]))


def _peft_fields(config: TrainableTokensConfig, model: nn.Module, found: list[Entry]) -> dict:
    own = [e for e in found if isinstance(e.module, TrainableTokens)]
    indices = [int(i) for i in own[0].module.index]
    return {"token_indices": indices, "target_modules": exact_targets(own), "init_weights": True}


@dataclasses.dataclass(frozen=True)
class TrainableTokensConfig(AdapterConfig):
    """Trainable tokens config, peft's field names. ``token_indices`` empty = the special tokens the model's config
    names; ``target_modules`` None = the model's input embedding."""

    method = "trainable_tokens"
    peft = PeftFormat("TRAINABLE_TOKENS", _from_peft, _peft_fields, writing=_writing, reading=_reading)
    token_indices: tuple[int, ...] = ()
    target_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        ids = self.token_indices
        check(all(isinstance(i, int) and i >= 0 for i in ids), f"token_indices must be token ids, got {ids!r}")
        check(len(set(ids)) == len(ids), f"token_indices lists a token twice: {ids!r}")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        indices = self.token_indices or special_tokens(model)
        is_embedding = (lambda m: isinstance(m, nn.Embedding),)
        if self.target_modules:
            names = find_targets(model, self.target_modules, is_embedding, "nn.Embedding")
        else:
            embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            check(isinstance(embedding, nn.Embedding), f"{type(model).__name__} has no token embedding to train")
            names = [next(path for path, m in base_modules(model) if m is embedding)]
        placements = [(n, TrainableTokens(model.get_submodule(n), indices)) for n in names]
        for name, module in list(placements):
            tied = tied_output(model, model.get_submodule(name))
            if tied:
                placements.append((tied, TiedTokens(module)))
        return placements


SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "unk_token_id")


def special_tokens(model: nn.Module) -> tuple[int, ...]:
    """The special tokens the model's config names (beginning, end, padding, ...): what ``token_indices`` empty
    trains, as a chat template's new tokens usually are."""
    ids = []
    for name in SPECIAL:
        value = getattr(model.config, name, None)
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    check(bool(ids), "token_indices is empty and the model's config names no special tokens: pass token_indices")
    return tuple(ids)
