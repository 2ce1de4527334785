"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning"), as AdapterHub defines it: low-rank interventions on
the hidden states a layer outputs, at a few positions, the weights left alone.

At the first ``prefix_positions`` and the last ``suffix_positions`` real tokens of every chosen layer's output:
``h <- dropout(h + (phi(W h + b) - R h) R)`` with ``R`` (r, H) orthonormal rows (torch's ``orthogonal``
parametrisation, Householder reflectors times a fixed random ``base``, as AdapterHub registers it; the
reflectors' signs from the sign of the diagonal where torch truncates it, see :func:`orthogonal`) and ``W, b``
(r, H) learned; ``subtract_projection=False`` drops ``R h`` (DiReFT), ``orthogonality=False`` leaves ``R`` free
(NoReFT). One unit for the prefix and one for the suffix, or one for both (``tied_weights``). Positions come
from the attention mask, as AdapterHub's: a left-padded row's first real token is its position 0; a cached
decoding step (its input shorter than the mask) is left alone, its prompt having been. Not mergeable; per row
(each row's positions from its own mask).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.activations import ACT2FN

from adapterkit.core.adapterhub_spec import HubFormat
from adapterkit.core.arch import ArchSpec, find_layers, spec_for
from adapterkit.core.backbone import base_prefix
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.hosts import hidden, with_hidden
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, call_arguments, check, param_dtype
from adapterkit.core.state import FIXED, Relay


def householder(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.householder_product`` of one tall ``(n, k)`` matrix, as products an ONNX export can emit."""
    n, k = a.shape
    q = torch.eye(n, k, dtype=a.dtype, device=a.device)
    for i in reversed(range(k)):  # H_0 ... H_(k-1) applied to the first k columns of I, the last first
        v = torch.cat([a.new_zeros(i), a.new_ones(1), a[i + 1 :, i]])
        q = q - tau[i] * v[:, None] * (v[None, :] @ q)
    return q


def orthogonal(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """torch's Householder ``orthogonal`` map of a wide ``(r, H)`` weight, with its trivialisation ``base``."""
    x = original.transpose(0, 1)  # (H, r): tall (transpose, not .mT: ONNX exports it)
    a = x.tril(diagonal=-1)
    tau = 2.0 / (1.0 + (a * a).sum(dim=-2))
    q = householder(a, tau) if torch.onnx.is_in_onnx_export() else torch.linalg.householder_product(a, tau)
    # torch takes the diagonal's .int(): AdamW's weight decay moves it off ±1 in one step (it gets no gradient) and
    # the projection collapses to zero; its sign is what the reflectors' orientation needs
    q = q * x.diagonal().sign().unsqueeze(-2)
    return (base @ q).transpose(0, 1)


class ReftUnit(nn.Module):
    """One intervention ``(n, H) -> (n, H)``; parameters named as AdapterHub's ``ReftUnit`` holds them."""

    def __init__(self, dim: int, config: LoReftConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.learned_source = nn.Linear(dim, config.r, dtype=dtype)
        start = nn.Linear(dim, config.r, bias=False, dtype=dtype)
        if config.orthogonality:  # torch's own registration gives the start: original and base
            start = nn.utils.parametrizations.orthogonal(start)
            weights = start.parametrizations.weight
            self.original = nn.Parameter(weights.original.detach().clone())
            setattr(self, FIXED, nn.ParameterDict({"base": weights[0].base.detach().clone()}).requires_grad_(False))
        else:
            self.original = nn.Parameter(start.weight.detach().clone())
        self.act = ACT2FN[config.non_linearity] if config.non_linearity else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.subtract = config.subtract_projection

    def projection(self) -> torch.Tensor:
        """``R`` (r, H)."""
        fixed = self._modules.get(FIXED)
        return orthogonal(self.original, fixed["base"]) if fixed is not None else self.original

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.projection()
        source = self.act(self.learned_source(h))
        if self.subtract:
            source = source - h @ r.T
        return self.dropout(h + source @ r)


def positions(mask: torch.Tensor | None, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """``(B, first + last)`` the positions each row of ``h`` (B, T, H) intervenes on: its first and last real
    tokens (by the mask, where it covers the T positions)."""
    batch, length, device = h.shape[0], h.shape[1], h.device
    if mask is not None and mask.ndim == 2 and mask.shape[1] == length:
        start, count = mask.argmax(1).to(device), (mask == 1).sum(-1).to(device)
    else:
        start = torch.zeros(batch, dtype=torch.long, device=device)
        count = torch.full((batch,), length, device=device)
    front = start[:, None] + torch.arange(min(first, length), device=device)
    back = (start + count)[:, None] + torch.arange(-min(last, length), 0, device=device)
    return torch.cat([front, back], dim=1)


class ReftCall(AdapterModule):
    """On the backbone: hands the call's attention mask to the layers' interventions."""

    edits_inputs = True
    blocks = frozenset({"rows"})
    why_not = "LoReFT edits a few positions' hidden states; it runs alone, in a Stack or per row"

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    @staticmethod
    def seen(host: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, bool]:
        """The call's attention mask, and whether it continues a KV cache (a decoding step)."""
        bound = call_arguments(host, args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        return bound.get("attention_mask"), cache is not None and cache.get_seq_length() > 0

    def adapt_inputs(self, host, args, kwargs):
        self.relay.put(self.seen(host, args, kwargs))
        return args, kwargs

    @staticmethod
    def adapt_inputs_rows(host, args, kwargs, modules: list[ReftCall], index: torch.Tensor):
        seen = ReftCall.seen(host, args, kwargs)
        for m in modules:
            m.relay.put(seen)
        return args, kwargs


class Reft(AdapterModule):
    """On a layer: its output's hidden states ``(B, T, H)`` intervened on at the chosen positions."""

    blocks = ReftCall.blocks
    why_not = ReftCall.why_not

    def __init__(self, dim: int, config: LoReftConfig, relay: Relay, dtype: torch.dtype) -> None:
        super().__init__()
        used = config.prefix_positions > 0, config.suffix_positions > 0
        count = 1 if config.tied_weights else 1 + int(used[1] and used[0])
        self.units = nn.ModuleList(ReftUnit(dim, config, dtype) for _ in range(count))
        self.config, self.relay = config, relay

    def intervene(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``h`` (B, T, H) with its rows' chosen positions intervened on."""
        c = self.config
        index = positions(mask, h, c.prefix_positions, c.suffix_positions)[..., None].expand(-1, -1, h.shape[-1])
        picked = h.gather(1, index).to(self.units[0].original.dtype)  # (B, P + S, H)
        first = min(c.prefix_positions, h.shape[1])
        if len(self.units) == 1:
            new = self.units[0](picked)
        else:
            new = torch.cat([self.units[0](picked[:, :first]), self.units[1](picked[:, first:])], dim=1)
        return h.scatter(1, index, new.to(h.dtype))

    def adapt(self, host, x, out):
        mask, cached = self.relay.get((None, False))
        if cached:  # a decoding step: the prompt's positions were intervened on already
            return out
        return with_hidden(out, self.intervene(hidden(out), mask))

    @staticmethod
    def adapt_rows(host, x, out, modules: list[Reft], index: torch.Tensor):
        h, (mask, cached) = hidden(out), modules[0].relay.get((None, False))
        if cached:
            return out
        for k, m in enumerate(modules):
            rows = (index == k).nonzero().squeeze(1)
            if rows.numel():
                h = h.index_copy(0, rows, m.intervene(h[rows], None if mask is None else mask[rows]))
        return with_hidden(out, h)


def _hub_tensor(entry: Entry) -> torch.Tensor:
    """``original`` with its diagonal set to its sign, so that AdapterHub's ``.int()`` of it sees the same ±1."""
    if not entry.local.endswith(".original") or FIXED not in entry.module.units[0]._modules:
        return entry.param
    tall = entry.param.mT.clone()
    tall.diagonal().copy_(tall.diagonal().sign())
    return tall.mT


def hub_units(config: LoReftConfig) -> dict[int, int]:
    """adapterkit's unit -> AdapterHub's: it keeps units 0 (prefix) and 1 (suffix) even where one is unused."""
    if config.tied_weights:
        return {0: 0}
    if config.prefix_positions and config.suffix_positions:
        return {0: 0, 1: 1}
    return {0: 0} if config.prefix_positions else {0: 1}


def _hub_key(model: nn.Module, entry: Entry, peer: str) -> str:
    if not isinstance(entry.module, Reft):
        raise unsupported("adapterhub", "parameter", entry.key, "AdapterHub has no equivalent")
    _, i, rest = entry.local.split(".", 2)  # units.<i>.<parameter>
    orthogonal = entry.module.config.orthogonality  # else AdapterHub's projection is a plain Linear
    rest = {"original": "projection.parametrizations.weight.original" if orthogonal else "projection.weight"}.get(
        rest, rest
    )
    rest = rest.replace(f"{FIXED}.base", "projection.parametrizations.weight.0.base")
    return f"{entry.host}.reft_layer.refts.{peer}.units.{hub_units(entry.module.config)[int(i)]}.{rest}"


_FIELDS = ("prefix_positions", "suffix_positions", "r", "orthogonality", "tied_weights", "dropout", "non_linearity")
_FIELDS += ("layers",)


def _from_hub(config: dict, model: nn.Module) -> LoReftConfig:
    if config.get("dtype") or not config.get("output_reft", True):
        raise unsupported(CONFIG_FILE, "dtype/output_reft", (config.get("dtype"), config.get("output_reft")))
    fields = {k: config[k] for k in _FIELDS if k in config}
    # a class attribute in AdapterHub, never saved: its loader subtracts (only its "direft" preset name does not)
    return LoReftConfig(**fields, subtract_projection=config.get("subtract_projection", True))


def _hub_fields(config: LoReftConfig, model: nn.Module, found: list[Entry]) -> dict:
    if not config.subtract_projection:
        why = "AdapterHub saves no subtract_projection (a class attribute): its loader subtracts; save as adapterkit"
        raise unsupported("adapterhub", "subtract_projection", False, why)
    fields = {k: getattr(config, k) for k in _FIELDS}
    layers = fields["layers"]
    fields["layers"] = layers if layers == "all" else list(layers)
    return {**_HUB_DEFAULTS, **fields}


def _hub_writing(model: nn.Module, found: list[Entry], tensors: dict) -> dict:
    """AdapterHub's unused unit, where only prefix or only suffix positions are set: written as a copy of the used
    one with a zero source (no position reaches it), dropped again on reading."""
    units = hub_units(found[-1].module.config)
    if len(units) != 1 or found[-1].module.config.tied_weights:
        return tensors
    used = units[0]
    out = dict(tensors)
    for key, value in tensors.items():
        if f".units.{used}." in key:
            twin = key.replace(f".units.{used}.", f".units.{1 - used}.")
            out[twin] = torch.zeros_like(value) if "learned_source" in key else value.clone()
    return out


def _hub_reading(data: dict, raw: dict) -> dict:
    config = _legacy_reft(data["config"])
    if config.get("tied_weights") or (config["prefix_positions"] and config["suffix_positions"]):
        return raw
    unused = 1 if config["prefix_positions"] else 0
    return {k: v for k, v in raw.items() if f".units.{unused}." not in k}


_HUB_DEFAULTS = {"architecture": "reft", "layers": "all", "prefix_positions": 3, "suffix_positions": 0, "r": 1}
_HUB_DEFAULTS |= {"orthogonality": True, "tied_weights": False, "dropout": 0.05}
_HUB_DEFAULTS |= {"non_linearity": None, "dtype": None, "output_reft": True, "init_weights_seed": None}
_HUB_PRESETS = {
    "loreft": _HUB_DEFAULTS,
    "noreft": {**_HUB_DEFAULTS, "orthogonality": False},
    "direft": {**_HUB_DEFAULTS, "orthogonality": False, "subtract_projection": False},
}


def _legacy_reft(config: dict | str) -> dict:
    return {**_HUB_DEFAULTS, **(_HUB_PRESETS[config] if isinstance(config, str) else config)}


@dataclasses.dataclass(frozen=True)
class LoReftConfig(AdapterConfig):
    """LoReFT config, AdapterHub's ``LoReftConfig`` names and defaults (``layers``: "all" or layer indices)."""

    method = "loreft"
    adapterhub = HubFormat(
        "reft",
        _from_hub,
        _hub_fields,
        _hub_key,
        presets=_HUB_PRESETS,
        tensor=_hub_tensor,
        writing=_hub_writing,
        reading=_hub_reading,
    )
    layers: str | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None

    def validate(self) -> None:
        check(self.prefix_positions >= 0 and self.suffix_positions >= 0, "positions must be >= 0")
        check(self.prefix_positions + self.suffix_positions > 0, "set prefix_positions or suffix_positions")
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        check(self.layers == "all" or all(isinstance(i, int) for i in self.layers), "layers: 'all' or indices")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        relay = Relay()
        found = find_layers(model, spec_for(model, arch))
        chosen = [p for i, (p, _) in enumerate(found) if self.layers == "all" or i in self.layers]
        check(bool(chosen), f"layers={self.layers!r} names no layer of this model")
        dtype, dim = param_dtype(model.get_submodule(chosen[0])), model.config.hidden_size
        return [(base_prefix(model)[:-1], ReftCall(relay))] + [(p, Reft(dim, self, relay, dtype)) for p in chosen]
