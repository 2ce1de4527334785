"""Prefix tuning (Li & Liang 2021): trainable key/value vectors prepended in every attention layer.

The prefix enters where attention is computed: adapterkit registers an attention function with
``transformers``' ``AttentionInterface`` (``adapterkit_sdpa`` / ``adapterkit_eager``, wrapping the
model's own) that prepends the active prefixes to the keys and values after positional encoding
and after the KV cache, and extends the attention mask with P always-visible columns. So:

* position ids of the real tokens are unchanged (AdapterHub's semantics); ``shift_positions=True``
  gives peft's, which passes the prefix as ``past_key_values`` and so moves the real tokens to
  positions P..P+T-1 (absolute embeddings and RoPE alike; set when a peft prefix is loaded);
* the prefix never enters the KV cache, so ``generate()`` works unchanged;
* padding works: the model's own mask is kept for the real tokens.

Parametrisation (AdapterHub's): ``Embedding(P, H) -> Linear(H, bottleneck) -> tanh ->
Linear(bottleneck, L * 2 * kv)`` (``flat=False``, default) or one parameter ``(P, L * 2 * kv)``
(``flat=True``). The output row of layer ``l`` is ``[key_l | value_l]``, peft's and AdapterHub's
layout. :func:`adapterkit.bake_adapter` replaces the MLP by its output for inference.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.adapterhub_spec import HUB, HubFormat, layers
from adapterkit.core.arch import ArchSpec, find_layers, spec_for
from adapterkit.core.backbone import base_prefix
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.hosts import first_input, gather_rows
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, call_arguments, check, param_dtype, share
from adapterkit.core.peft_spec import PEFT, PeftFormat, prompt_fields, refuse_gating
from adapterkit.core.state import SLOT, Relay
from adapterkit.errors import ConfigError


class PrefixGenerator(nn.Module):
    """All layers' prefixes of one adapter: ``layer(l) -> (P, 2 * kv)``."""

    def __init__(self, config: PrefixConfig, layers: int, hidden: int, kv: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers, self.kv, self.length, self.dtype = layers, kv, config.prefix_length, dtype
        out = layers * 2 * kv
        if config.flat:
            self.prefix = nn.Parameter(torch.randn(config.prefix_length, out, dtype=dtype))
        else:
            self.wte = nn.Embedding(config.prefix_length, hidden, dtype=dtype)
            self.control_trans = nn.Sequential(
                nn.Linear(hidden, config.bottleneck_size, dtype=dtype),
                nn.Tanh(),
                nn.Linear(config.bottleneck_size, out, dtype=dtype),
            )
        self.dropout = nn.Dropout(config.dropout)

    def layer(self, index: int) -> torch.Tensor:
        rows = slice(2 * index * self.kv, 2 * (index + 1) * self.kv)
        if hasattr(self, "prefix"):
            return self.dropout(self.prefix[:, rows])
        hidden = self.control_trans[1](self.control_trans[0](self.wte.weight))
        last = self.control_trans[2]
        return self.dropout(F.linear(hidden, last.weight[rows], last.bias[rows]))  # only this layer's rows

    def full(self) -> torch.Tensor:
        """All layers' prefixes ``(P, L * 2 * kv)``, without dropout (what peft saves)."""
        return self.prefix if hasattr(self, "prefix") else self.control_trans(self.wte.weight)

    @torch.no_grad()
    def bake(self) -> None:
        """Replace the MLP by its output: same prefixes, no MLP at inference."""
        if hasattr(self, "prefix"):
            return
        full = self.full()
        del self.wte, self.control_trans
        self.prefix = nn.Parameter(full.clone())


class Prefix(AdapterModule):
    """The prefix of one attention module: ``kv_prefix(key)`` -> [(key (B, kv_heads, P, hd), value)].

    With ``gate`` (UniPELT) the attention input sets per-example key and value gates
    ``mean_t sigmoid(Linear(h_t))`` (B, 2) that scale the prefix, as AdapterHub.
    """

    blocks = frozenset({"rows"})
    why_not = (
        "a prefix adds attention keys, not an output that can be averaged, split along the sequence "
        "or sliced by a nested block; use Stack, or PerRow/BatchSplit/Parallel of adapter names"
    )

    def __init__(self, generator: PrefixGenerator, index: int, kv_heads: int, hidden: int, gating: bool) -> None:
        super().__init__()
        share(self, "generator", generator, owner=index == 0)
        self.index, self.kv_heads = index, kv_heads
        self.gate = nn.Linear(hidden, 2, dtype=generator.dtype) if gating else None
        self.edits_inputs = gating
        self.gates = Relay()  # set before each attention call
        if gating:
            self.blocks = frozenset()
            self.why_not = "a gated prefix (UniPELT) sets its gates from the whole batch; use it alone or in a Stack"

    def row_key(self):
        return (Prefix, self.kv_heads)

    @staticmethod
    def kv_rows(modules: list[Prefix], index: torch.Tensor, key: torch.Tensor) -> list:
        """All adapters' prefixes at once: row ``i`` gets adapter ``index[i]``'s, padded to the
        longest and masked beyond its own length (the last index: no prefix)."""
        layers = [m.generator.layer(m.index).to(key.dtype) for m in modules]  # (P_k, 2 * kv) each
        length = max(t.shape[0] for t in layers)
        rows = gather_rows([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in layers], index)  # (B, P, 2 * kv)
        sizes = gather_rows([t.shape[0] for t in layers], index)  # (B,)
        visible = torch.arange(length, device=key.device)[None] < sizes[:, None]  # (B, P)
        heads = modules[0].kv_heads
        keys, values = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in rows.chunk(2, dim=-1))
        return [(keys, values, visible)]

    def adapt_inputs(self, host, args, kwargs):
        x = first_input(args, kwargs)
        self.gates.put(torch.sigmoid(self.gate(x.to(self.gate.weight.dtype))).mean(dim=1))
        return args, kwargs

    def kv_prefix(self, key: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = key.shape[0]
        keys, values = self.generator.layer(self.index).to(key.dtype).chunk(2, dim=-1)  # (P, kv) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], self.kv_heads, -1).transpose(0, 1).expand(batch, -1, -1, -1)

        keys, values = heads(keys), heads(values)
        if self.gate is not None:
            gates = self.gates.take().to(key.dtype)  # (B, 2)
            keys, values = keys * gates[:, 0, None, None, None], values * gates[:, 1, None, None, None]
        return [(keys, values)]

    def bake(self) -> None:
        self.generator.bake()


class PositionShift(AdapterModule):
    """On the backbone: real tokens at positions ``P + past + i``, as if the prefix sat in the cache."""

    edits_inputs = True
    blocks = Prefix.blocks
    why_not = Prefix.why_not

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def adapt_inputs(self, host, args, kwargs):
        return self.shift(host, args, kwargs, self.length)

    @staticmethod
    def shift(host, args, kwargs, length: int | torch.Tensor):
        bound = call_arguments(host, args, kwargs)
        positions = bound.get("position_ids")
        if positions is None:
            tokens = bound.get("input_ids")
            tokens = tokens if tokens is not None else bound["inputs_embeds"]
            cache = bound.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
        bound["position_ids"] = positions + length
        return (), bound

    def row_key(self):
        return PositionShift

    @staticmethod
    def adapt_inputs_rows(host, args, kwargs, modules: list[PositionShift], index: torch.Tensor):
        lengths = gather_rows([m.length for m in modules], index)
        return PositionShift.shift(host, args, kwargs, lengths[:, None])


def _prefixes(module: nn.Module, key: torch.Tensor) -> list:
    slot = module._modules.get(SLOT)
    return [] if slot is None else slot.prefixes(key)


def _extend_mask(module: nn.Module, mask, query: torch.Tensor, key: torch.Tensor, prefixes: list, causal=None):
    """The mask with the prefix columns in front: visible to all rows, or per row (``PerRow``).

    None stays None when every column is visible and the model is not causal. ``causal``: the call's own
    ``is_causal`` where the model passes one (CLIP's text tower: its attention modules say False); else the
    module's."""
    visible = [
        v if v is not None else torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device) for k, _, v in prefixes
    ]
    rows = max(v.shape[0] for v in visible)
    visible = torch.cat([v.expand(rows, -1) for v in visible], dim=1)  # (B or 1, P)
    if mask is None:
        causal = getattr(module, "is_causal", False) if causal is None else causal
        if not causal and rows == 1:
            return None
        q, k = query.shape[2], key.shape[2]
        mask = torch.ones(q, k, dtype=torch.bool, device=key.device)
        mask = (mask.tril(k - q) if causal else mask)[None, None]
    front = visible[:, None, None, :]
    if mask.dtype != torch.bool:
        front = torch.zeros(front.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~front, torch.finfo(mask.dtype).min
        )
    batch = max(mask.shape[0], front.shape[0])
    front = front.expand(batch, mask.shape[1], mask.shape[2], -1)
    return torch.cat([front.to(mask.device), mask.expand(batch, -1, -1, -1)], dim=-1)


def prefix_attention(module, query, key, value, attention_mask, *args, base: str, **kwargs):
    """The model's own attention with the active prefixes of ``module`` prepended."""
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as attend
    else:
        attend = sys.modules[type(module).__module__].eager_attention_forward
    prefixes = _prefixes(module, key)
    if prefixes:
        attention_mask = _extend_mask(module, attention_mask, query, key, prefixes, kwargs.get("is_causal"))
        key = torch.cat([*(k for k, _, _ in prefixes), key], dim=2)
        value = torch.cat([*(v for _, v, _ in prefixes), value], dim=2)
    return attend(module, query, key, value, attention_mask, *args, **kwargs)


def use_prefix_attention(model: nn.Module) -> None:
    """Switch ``model`` to adapterkit's attention functions (a pass-through without prefixes), for as
    long as a prefix adapter needs them (:func:`adapterkit.core.state.change`)."""
    st.change(model, "prefix-attention", lambda: _switch_attention(model))


def _switch_attention(model: nn.Module) -> Callable[[], None]:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask

    current = model.config._attn_implementation
    if current not in ("sdpa", "eager") or not model._can_set_attn_implementation():
        raise ConfigError(
            f"prefix tuning needs sdpa or eager attention through transformers' AttentionInterface; "
            f"{type(model).__name__} uses {current!r}: load it with attn_implementation='sdpa'"
        )
    for name, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(f"adapterkit_{name}", functools.partial(prefix_attention, base=name))
        AttentionMaskInterface.register(f"adapterkit_{name}", mask)
    model.set_attn_implementation(f"adapterkit_{current}")
    return lambda: model.set_attn_implementation(current)


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(hidden, kv_heads, head_dim)`` from the model's config."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, kv_heads, head_dim


def _from_peft(data: dict, model: nn.Module) -> PrefixConfig:
    return PrefixConfig(prefix_length=data["num_virtual_tokens"], flat=True, shift_positions=True)


def _peft_fields(config: PrefixConfig, model: nn.Module, found: list[Entry]) -> dict:
    refuse_gating(config)
    if not config.shift_positions:
        raise unsupported(
            PEFT,
            "PrefixConfig.shift_positions",
            False,
            "peft moves real tokens to positions P..P+T-1; train with shift_positions=True to export to peft",
        )
    return {"encoder_hidden_size": model.config.hidden_size, **prompt_fields(model, config.prefix_length)}


def _peft_tensor(entry: Entry) -> torch.Tensor:
    """peft stores the prefix MLP's output, ``(P, L * 2 * kv)``, and passes it as past keys and values."""
    return entry.module.generator.full()


_HUB_PREFIX = {
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
_HUB_FIELDS = ("prefix_length", "bottleneck_size", "flat", "dropout")
POOL = ".prefix_tuning.pool.prefix_tunings."  # AdapterHub's copies of the prefix under every layer


def _from_hub(config: dict, model: nn.Module) -> PrefixConfig:
    for option, allowed in (("use_gating", False), ("non_linearity", "tanh"), ("encoder_prefix", True)):
        if config.get(option, allowed) != allowed:
            raise unsupported(CONFIG_FILE, option, config[option])
    if config.get("leave_out"):
        raise unsupported(CONFIG_FILE, "leave_out", config["leave_out"])
    return PrefixConfig(**{k: config[k] for k in _HUB_FIELDS if k in config})


def _hub_fields(config: PrefixConfig, model: nn.Module, found: list[Entry]) -> dict:
    if config.shift_positions:
        raise unsupported(HUB, "shift_positions", True, "AdapterHub keeps positions; save as 'peft'")
    return {**_HUB_PREFIX, **{k: getattr(config, k) for k in _HUB_FIELDS}}


def _hub_key(model: nn.Module, entry: Entry, peer: str) -> str:
    leaf = entry.local.removeprefix("generator.").replace("prefix", "control_trans")
    return f"prefix_tuning.prefix_tunings.{peer}.self_prefix.{leaf}"


def _hub_tensor(entry: Entry) -> torch.Tensor:
    return entry.param.reshape(-1) if entry.local == "generator.prefix" else entry.param  # its flat prefix: 1-D


def _hub_writing(model: nn.Module, found: list[Entry], tensors: dict) -> dict:
    """AdapterHub also stores a copy of the prefix under every layer."""
    attn = spec_for(model).attn_in
    copies = {
        f"{layer}.{attn}{POOL}{key.removeprefix('prefix_tuning.prefix_tunings.')}": value.clone()
        for layer in layers(model)
        for key, value in tensors.items()
    }  # clones: safetensors refuses tensors that share memory
    return {**tensors, **copies}


def _hub_reading(data: dict, raw: dict) -> dict:
    return {k: v for k, v in raw.items() if POOL not in k}  # the copies duplicate the top-level tensors


@dataclasses.dataclass(frozen=True)
class PrefixConfig(AdapterConfig):
    """Prefix tuning config; AdapterHub's ``PrefixTuningConfig`` names and defaults."""

    method = "prefix"
    peft = PeftFormat(
        "PREFIX_TUNING",
        _from_peft,
        _peft_fields,
        shared={"generator": "prompt_embeddings"},
        tensor=_peft_tensor,
        task_type="FEATURE_EXTRACTION",
    )
    adapterhub = HubFormat(
        "prefix_tuning",
        _from_hub,
        _hub_fields,
        _hub_key,
        presets={"prefix_tuning": _HUB_PREFIX},
        tensor=_hub_tensor,
        writing=_hub_writing,
        reading=_hub_reading,
    )
    prefix_length: int = 30
    bottleneck_size: int = 512
    flat: bool = False
    dropout: float = 0.0
    use_gating: bool = False
    shift_positions: bool = False

    def validate(self) -> None:
        check(self.prefix_length > 0, f"prefix_length must be > 0, got {self.prefix_length}")
        check(self.bottleneck_size > 0, f"bottleneck_size must be > 0, got {self.bottleneck_size}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")

    def baked(self) -> PrefixConfig:
        return dataclasses.replace(self, flat=True)

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        if not spec.functional_attention:  # there adapterkit.core.mha prepends the prefixes
            use_prefix_attention(model)
        layers = [path for path, _ in find_layers(model, spec)]
        hidden, kv_heads, head_dim = attention_shape(model)
        dtype = param_dtype(model.get_submodule(f"{layers[0]}.{spec.attn_out}"))
        generator = PrefixGenerator(self, len(layers), hidden, kv_heads * head_dim, dtype)
        placements = [
            (f"{path}.{spec.attn_in}", Prefix(generator, i, kv_heads, hidden, self.use_gating))
            for i, path in enumerate(layers)
        ]
        if self.shift_positions:
            placements.append((base_prefix(model)[:-1], PositionShift(self.prefix_length)))
        return placements
