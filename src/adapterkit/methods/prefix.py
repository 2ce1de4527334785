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
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, find_layers, spec_for
from ..backbone import base_prefix
from ..errors import ConfigError
from ..state import SLOT
from .base import AdapterConfig, AdapterModule, call_arguments, check, param_dtype, share


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

    def __init__(self, generator: PrefixGenerator, index: int, kv_heads: int, hidden: int, gating: bool) -> None:
        super().__init__()
        share(self, "generator", generator, owner=index == 0)
        self.index, self.kv_heads = index, kv_heads
        self.gate = nn.Linear(hidden, 2, dtype=generator.dtype) if gating else None
        self.edits_inputs = gating
        self.gates: dict[int, torch.Tensor] = {}  # per thread, set before each attention call

    def adapt_inputs(self, host, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.gates[threading.get_ident()] = torch.sigmoid(self.gate(x.to(self.gate.weight.dtype))).mean(dim=1)
        return args, kwargs

    def kv_prefix(self, key: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = key.shape[0]
        keys, values = self.generator.layer(self.index).to(key.dtype).chunk(2, dim=-1)  # (P, kv) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], self.kv_heads, -1).transpose(0, 1).expand(batch, -1, -1, -1)

        keys, values = heads(keys), heads(values)
        if self.gate is not None:
            gates = self.gates.pop(threading.get_ident()).to(key.dtype)  # (B, 2)
            keys, values = keys * gates[:, 0, None, None, None], values * gates[:, 1, None, None, None]
        return [(keys, values)]

    def bake(self) -> None:
        self.generator.bake()


class PositionShift(AdapterModule):
    """On the backbone: real tokens at positions ``P + past + i``, as if the prefix sat in the cache."""

    edits_inputs = True

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def adapt_inputs(self, host, args, kwargs):
        bound = call_arguments(host, args, kwargs)
        positions = bound.get("position_ids")
        if positions is None:
            tokens = bound.get("input_ids")
            tokens = tokens if tokens is not None else bound["inputs_embeds"]
            cache = bound.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
        bound["position_ids"] = positions + self.length
        return (), bound


def _prefixes(module: nn.Module, key: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    slot = module._modules.get(SLOT)
    if slot is None:
        return []
    return [kv for adapter in slot._active() for kv in getattr(adapter, "kv_prefix", lambda k: [])(key)]


def _extend_mask(module: nn.Module, mask, query: torch.Tensor, key: torch.Tensor, length: int):
    """The mask with ``length`` visible columns in front; an explicit causal mask if it was None."""
    if mask is None:
        if not getattr(module, "is_causal", False):
            return None
        q, k = query.shape[2], key.shape[2]
        mask = torch.ones(q, k, dtype=torch.bool, device=key.device).tril(k - q)[None, None]
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    front = visible(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


def prefix_attention(module, query, key, value, attention_mask, *args, base: str, **kwargs):
    """The model's own attention with the active prefixes of ``module`` prepended."""
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as attend
    else:
        attend = sys.modules[type(module).__module__].eager_attention_forward
    prefixes = _prefixes(module, key)
    if prefixes:
        length = sum(k.shape[2] for k, _ in prefixes)
        attention_mask = _extend_mask(module, attention_mask, query, key, length)
        key = torch.cat([*(k for k, _ in prefixes), key], dim=2)
        value = torch.cat([*(v for _, v in prefixes), value], dim=2)
    return attend(module, query, key, value, attention_mask, *args, **kwargs)


def use_prefix_attention(model: nn.Module) -> None:
    """Switch ``model`` to adapterkit's attention functions (a pass-through without prefixes)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask

    current = model.config._attn_implementation
    if current.startswith("adapterkit_"):
        return
    if current not in ("sdpa", "eager") or not model._can_set_attn_implementation():
        raise ConfigError(
            f"prefix tuning needs sdpa or eager attention through transformers' AttentionInterface; "
            f"{type(model).__name__} uses {current!r}: load it with attn_implementation='sdpa'"
        )
    for name, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(f"adapterkit_{name}", functools.partial(prefix_attention, base=name))
        AttentionMaskInterface.register(f"adapterkit_{name}", mask)
    model.set_attn_implementation(f"adapterkit_{current}")


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(hidden, kv_heads, head_dim)`` from the model's config."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, kv_heads, head_dim


@dataclasses.dataclass
class PrefixConfig(AdapterConfig):
    """Prefix tuning config; AdapterHub's ``PrefixTuningConfig`` names and defaults."""

    method = "prefix"
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
