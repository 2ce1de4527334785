"""Bottleneck adapters: Houlsby, Pfeiffer and parallel (AdapterHub's double_seq_bn, seq_bn, par_bn).

``A(h) = scaling * Up(act(Down(h)))`` with ``Down: H -> d`` and ``Up: d -> H``. With ``s`` the
sub-layer's projection output (after dropout), ``x`` its residual input and ``LN`` the pre-trained
LayerNorm of a post-LN model (BERT), the three placements compute:

* Houlsby (``original_ln_before=False``): ``LN(x + s + A(s))``, after attention and after the FFN.
* Pfeiffer (``original_ln_before=True``): ``LN(A(LN(s + x)) + s + x)``, after the FFN only. On a
  pre-LN model (GPT-2, Llama) there is no such LN: ``h + A(h)`` with ``h = x + s``.
* Parallel (``is_parallel=True``): ``LN(x + s + scaling * Up(act(Down(x))))`` with ``x`` the
  sub-layer's input, scaling 4.

These equal AdapterHub's outputs on equal weights; the one difference is that adapterkit's
Houlsby and parallel adapters act before the host's dropout, which matters only in training.
The modules are :mod:`.bottleneck_layers`; this file holds the config, where it places them, and the
AdapterHub format.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from adapterkit.core.adapterhub_spec import HUB, HubFormat, layers, refuse
from adapterkit.core.arch import ArchSpec, features, find_layers, model_type, spec_for
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, param_dtype
from adapterkit.core.methods.bottleneck_layers import (
    Bottleneck,
    Capture,
    NormAdapter,
    ParallelAdapter,
    SequentialAdapter,
    phm_rule,
)
from adapterkit.core.state import Relay

INITS = ("bert", "mam_adapter", "houlsby")

# -- AdapterHub's format ------------------------------------------------------------------------------------------

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
_FIXED = ("original_ln_after", "ln_before", "ln_after", "residual_before_ln", "adapter_residual_before_ln")
_FIXED += ("inv_adapter", "cross_adapter", "phm_layer", "use_gating", "stochastic_depth")
_SHARED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before")
_SHARED += ("is_parallel", "scaling", "init_weights", "dropout", "leave_out")
_HOULSBY = {**_BN, "mh_adapter": True, "non_linearity": "swish", "original_ln_before": False}
_PARALLEL = {**_BN, "reduction_factor": 2, "original_ln_before": False, "is_parallel": True, "scaling": 4.0}
_PARALLEL["init_weights"] = "mam_adapter"
_HUB_PRESETS = {"pfeiffer": _BN, "seq_bn": _BN, "houlsby": _HOULSBY, "double_seq_bn": _HOULSBY}
_HUB_PRESETS |= {"par_bn": _PARALLEL, "parallel": _PARALLEL}
_BERT_SITES = ("attention.output", "output")  # where a layer's (attention, output) adapters live
SITES = {"bert": _BERT_SITES, "roberta": _BERT_SITES, "xlm-roberta": _BERT_SITES, "electra": _BERT_SITES}
SITES["gpt2"] = ("attention_adapters", "output_adapters")


def _parallel_fits(config: BottleneckConfig, model: nn.Module) -> BottleneckConfig:
    if config.is_parallel and not spec_for(model).post_ln:
        raise unsupported(
            HUB,
            "is_parallel",
            True,
            f"on a pre-LN model ({model_type(model)}) AdapterHub feeds a parallel adapter the residual stream "
            "before the LayerNorm, adapterkit the sub-layer's input: their outputs differ",
        )
    return config


def _from_hub(config: dict[str, Any], model: nn.Module) -> BottleneckConfig:
    refuse(config, _BN, _FIXED)
    for option in ("reduction_factor", "scaling"):
        if not isinstance(config.get(option, 1), (int, float)):
            raise unsupported(CONFIG_FILE, option, config[option])
    fields = {k: config[k] for k in _SHARED if k in config}
    if fields.get("init_weights") not in INITS:
        fields["init_weights"] = "bert"  # an init scheme only; the loaded weights replace it
    return _parallel_fits(BottleneckConfig(**fields), model)


def _hub_fields(config: BottleneckConfig, model: nn.Module, found: list[Entry]) -> dict[str, Any]:
    _parallel_fits(config, model)
    if config.phm_layer:
        raise unsupported(HUB, "phm_layer", True, "Compacter's PHM layout differs; save as 'adapterkit'")
    out = {**_BN, **{k: getattr(config, k) for k in _SHARED}}
    hidden = model.config.hidden_size
    if config.bottleneck_size:
        factor = hidden / config.bottleneck_size
        if int(hidden // factor) != config.bottleneck_size:
            raise unsupported(
                HUB, "bottleneck_size", config.bottleneck_size, f"no reduction_factor gives it at {hidden}"
            )
        out["reduction_factor"] = factor
    return out


def _hub_key(model: nn.Module, entry: Entry, peer: str) -> str:
    """``<layer>.<site>.adapters.<name>.adapter_down.0.weight``: the site after attention or after the FFN."""
    kind = model_type(model)
    if kind not in SITES:
        raise unsupported(
            HUB, "model_type", kind, "AdapterHub's bottleneck key layout is mapped for bert-like and gpt2"
        )
    layer = max((lay for lay in layers(model) if entry.host == lay or entry.host.startswith(lay + ".")), key=len)
    rest, attn = entry.host.removeprefix(layer).lstrip("."), spec_for(model).attn_in
    site = SITES[kind][0 if rest.split(".")[0] == attn.split(".")[0] else 1]
    leaf = re.sub(r"^bottleneck\.adapter_down\.", "adapter_down.0.", entry.local).removeprefix("bottleneck.")
    return f"{layer}.{site}.adapters.{peer}.{leaf}"


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter config; field names and defaults follow AdapterHub's ``BnConfig``.

    The bottleneck is ``bottleneck_size`` if set, else ``hidden_size // reduction_factor``.
    ``leave_out`` lists layer indices that get no adapter. ``phm_layer`` makes it a Compacter:
    both projections become :class:`PHMLinear` sharing one rule across layers (the bottleneck is
    rounded up to a multiple of ``phm_dim``). ``use_gating`` scales the adapter's output by a
    learned per-example gate ``mean_t sigmoid(Linear(h_t))`` (UniPELT, as AdapterHub).
    """

    method = "bottleneck"
    adapterhub = HubFormat(None, _from_hub, _hub_fields, _hub_key, presets=_HUB_PRESETS)
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    original_ln_before: bool = True
    is_parallel: bool = False
    scaling: float = 1.0
    init_weights: str = "bert"
    dropout: float = 0.0
    leave_out: tuple[int, ...] = ()
    phm_layer: bool = False
    phm_dim: int = 4
    phm_rank: int = 1
    phm_init_range: float = 1e-4
    use_gating: bool = False

    def validate(self) -> None:
        check(self.mh_adapter or self.output_adapter, "set mh_adapter or output_adapter (or both)")
        check(self.reduction_factor > 0, f"reduction_factor must be > 0, got {self.reduction_factor}")
        size = self.bottleneck_size
        check(size is None or size > 0, f"bottleneck_size must be > 0, got {size}")
        check(
            self.non_linearity in ACT2FN, f"unknown non_linearity {self.non_linearity!r}; try relu, swish, gelu, tanh"
        )
        check(self.init_weights in INITS, f"unknown init_weights {self.init_weights!r}; choose from {INITS}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.phm_dim > 0 and self.phm_rank > 0, "phm_dim and phm_rank must be > 0")

    def size(self, dim: int) -> int:
        size = self.bottleneck_size or max(1, int(dim // self.reduction_factor))
        return -(-size // self.phm_dim) * self.phm_dim if self.phm_layer else size

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        placements, rule, made = [], None, []
        for index, (path, layer) in enumerate(find_layers(model, spec)):
            if index in self.leave_out:
                continue
            attn_out = layer.get_submodule(spec.attn_out)
            dim, dtype = features(attn_out)[1], param_dtype(attn_out)
            if self.phm_layer and rule is None:
                check(dim % self.phm_dim == 0, f"hidden size {dim} is not a multiple of phm_dim={self.phm_dim}")
                rule = phm_rule(self, dtype)
            new = self._factory(dim, dtype, rule, made)
            if self.mh_adapter:
                placements += self._place(path, spec.attn_in, spec.attn_out, spec.attn_norm, None, new)
            if self.output_adapter:
                placements += self._place(path, spec.ffn_in, spec.ffn_out, spec.ffn_norm, path, new)
        return placements

    def _factory(self, dim: int, dtype: torch.dtype, rule, made: list):
        """Makes bottlenecks; the first one made owns the shared Compacter rule."""

        def new() -> Bottleneck:
            made.append(Bottleneck(dim, self.size(dim), self, dtype, rule, owner=not made))
            return made[-1]

        return new

    def _place(self, layer, sub_in, sub_out, norm, block_out, new) -> list[tuple[str, AdapterModule]]:
        if self.is_parallel:
            if sub_out.startswith(sub_in + "."):  # the input module computes the whole sub-layer
                return [(f"{layer}.{sub_in}", ParallelAdapter(new()))]
            box = Relay()
            return [(f"{layer}.{sub_in}", Capture(box)), (f"{layer}.{sub_out}", ParallelAdapter(new(), box))]
        if not self.original_ln_before:
            return [(f"{layer}.{sub_out}", SequentialAdapter(new()))]
        if norm is not None:
            return [(f"{layer}.{norm}", NormAdapter(new()))]
        check(
            block_out is not None,
            "original_ln_before with mh_adapter needs a post-LN model; on pre-LN models use "
            "original_ln_before=False for the attention adapter",
        )
        return [(block_out, SequentialAdapter(new()))]
