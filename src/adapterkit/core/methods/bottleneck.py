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
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from adapterkit.core.adapterhub_spec import HUB, HubFormat, layers, refuse
from adapterkit.core.arch import ArchSpec, features, find_layers, model_type, spec_for
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.hosts import map_hidden, put, stack_rows, take
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, param_dtype, share
from adapterkit.core.state import Relay

INITS = ("bert", "mam_adapter", "houlsby")


class PHMLinear(nn.Module):
    """Parameterised hypercomplex multiplication (Compacter): ``y = x H + b`` with
    ``H = sum_i kron(rule_i, W_i)``, ``rule`` (n, n, n) and ``W_i = left_i @ right_i`` (rank-r
    factors (n, in/n, r) and (n, r, out/n)). One ``rule`` serves every PHM layer of an adapter
    (AdapterHub's ``shared_phm_rule``). The factors start Xavier-normal, which is what AdapterHub's
    ``init_W`` does with its default ``hypercomplex_nonlinearity``.
    """

    def __init__(self, fan_in: int, fan_out: int, n: int, rank: int, rule: nn.Parameter, dtype, owner: bool) -> None:
        super().__init__()
        share(self, "rule", rule, owner)
        self.left = nn.Parameter(torch.empty(n, fan_in // n, rank, dtype=dtype))
        self.right = nn.Parameter(torch.empty(n, rank, fan_out // n, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(fan_out, dtype=dtype))
        for factor in (self.left, self.right):
            for i in range(n):
                nn.init.xavier_normal_(factor[i])

    def weight(self) -> torch.Tensor:
        """``H`` (in, out)."""
        w = self.left @ self.right  # (n, in/n, out/n)
        n, a, b = w.shape
        # kron(rule_i, W_i)[p*a + q, s*b + t] = rule_i[p, s] * W_i[q, t], summed over i
        return torch.einsum("ips,iqt->pqst", self.rule, w).reshape(n * a, n * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


def phm_rule(config: BottleneckConfig, dtype) -> nn.Parameter:
    """The rule tensor (n, n, n) shared by all PHM layers of one adapter, init N(0, phm_init_range)."""
    n = config.phm_dim
    return nn.Parameter(torch.randn(n, n, n, dtype=dtype) * config.phm_init_range)


class Bottleneck(nn.Module):
    """``(..., H) -> (..., H)``: ``scaling * dropout(Up(act(Down(h))))``, without the skip."""

    def __init__(
        self, dim: int, size: int, config: BottleneckConfig, dtype: torch.dtype, rule=None, owner: bool = True
    ) -> None:
        super().__init__()
        if rule is None:
            self.adapter_down = nn.Linear(dim, size, dtype=dtype)
            self.adapter_up = nn.Linear(size, dim, dtype=dtype)
            self.reset_parameters(config.init_weights)
        else:  # Compacter
            n, rank = config.phm_dim, config.phm_rank
            self.adapter_down = PHMLinear(dim, size, n, rank, rule, dtype, owner)
            self.adapter_up = PHMLinear(size, dim, n, rank, rule, dtype, owner=False)
        self.act = ACT2FN[config.non_linearity]
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling
        self.gate = nn.Linear(dim, 1, dtype=dtype) if config.use_gating else None  # UniPELT

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)
        if init == "bert":  # AdapterHub's default
            nn.init.normal_(self.adapter_down.weight, std=0.02)
            nn.init.normal_(self.adapter_up.weight, std=0.02)
        elif init == "mam_adapter":  # exact identity at init
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_up.weight)
        else:  # Houlsby et al.: N(0, 1e-2) truncated at two standard deviations
            for linear in (self.adapter_down, self.adapter_up):
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h32 = h.to(self.adapter_up.bias.dtype)
        out = self.dropout(self.adapter_up(self.act(self.adapter_down(h32)))) * self.scaling
        if self.gate is not None:  # one gate per example: sigmoid, averaged over the sequence
            out = out * torch.sigmoid(self.gate(h32)).mean(dim=1, keepdim=True)
        return out.to(h.dtype)


def _plain(bottleneck: Bottleneck) -> bool:
    return isinstance(bottleneck.adapter_down, nn.Linear) and bottleneck.gate is None


def tables(bottlenecks: list[Bottleneck]) -> list[torch.Tensor] | None:
    """Down and s*Up weights and biases per bottleneck (zeros for "none"); None unless all are plain and of
    one activation (and one width: ``row_key``), the ones that run as one batched computation."""
    if not all(map(_plain, bottlenecks)) or len({type(b.act) for b in bottlenecks}) > 1:
        return None
    weights = [
        (b.adapter_down.weight, b.adapter_down.bias, b.adapter_up.weight, b.adapter_up.bias) for b in bottlenecks
    ]
    down_w, down_b, up_w, up_b = (stack_rows(list(column)) for column in zip(*weights, strict=True))
    scale = stack_rows([b.scaling for b in bottlenecks], device=up_w.device).to(up_w.dtype)  # s W: the bits of W * s
    return [down_w, down_b, up_w * scale[:, None, None], up_b * scale[:, None]]


def through(first: Bottleneck, h: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """``(B, T, H) -> (B, T, H)``: row ``i`` through the bottleneck whose :func:`tables` entries are
    ``rows[..][i]`` (all zeros: a zero update), as two batched matmuls."""
    down_w, down_b, up_w, up_b = rows
    flat = h.to(up_b.dtype).reshape(h.shape[0], -1, h.shape[-1])  # (B, T, H)
    mid = first.act(torch.baddbmm(down_b[:, None], flat, down_w.transpose(1, 2)))  # (B, T, size)
    out = first.dropout(torch.baddbmm(up_b[:, None], mid, up_w.transpose(1, 2)))
    return out.reshape(h.shape).to(h.dtype)


def _tables(modules: list[_Site]) -> list[torch.Tensor] | None:
    return tables([m.bottleneck for m in modules])


class _Site(AdapterModule):
    """A bottleneck adapter at one host; runs in every block, AdapterFusion included."""

    blocks = AdapterModule.blocks | {"fuse"}

    def row_key(self):
        b = self.bottleneck
        # the width too: zero-padding to a wider adapter would change a row's result with the batch's mix
        return (
            (type(self), type(b.act), b.dropout.p, b.adapter_up.bias.dtype, b.adapter_down.out_features)
            if _plain(b)
            else id(self)
        )


class SequentialAdapter(_Site):
    """On a projection or a pre-LN block: ``out + A(out)``."""

    def __init__(self, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.bottleneck = bottleneck

    def adapt(self, host, x, out):
        return map_hidden(out, lambda h: h + self.bottleneck(h))

    row_tables = staticmethod(_tables)

    @staticmethod
    def adapt_tables(host, x, out, rows, modules: list[SequentialAdapter]):
        return map_hidden(out, lambda h: h + through(modules[0].bottleneck, h, rows))

    @staticmethod
    def fuse(host, x, out, modules: list[SequentialAdapter], fusion):
        """AdapterFusion with the adapters' input as the query and residual (AdapterHub's)."""
        return map_hidden(out, lambda h: h + fusion(h, [m.bottleneck(h) for m in modules]))


class NormAdapter(_Site):
    """On a post-LN LayerNorm with input ``z = s + x``: ``LN(A(LN(z)) + z)``."""

    def __init__(self, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.bottleneck = bottleneck

    def adapt(self, host, z, out):
        return host.forward(self.bottleneck(out) + z)  # .forward: no hooks, no recursion

    @staticmethod
    def row_tables(modules: list[NormAdapter]) -> list[torch.Tensor] | None:
        weights = _tables(modules)  # and whether a row has an adapter of the group: others keep their output
        return None if weights is None else [*weights, stack_rows([True] * len(modules), False, weights[0].device)]

    @staticmethod
    def adapt_tables(host, z, out, rows, modules: list[NormAdapter]):
        new = host.forward(through(modules[0].bottleneck, out, rows[:4]) + z)
        mine = rows[4].view(-1, *[1] * (out.ndim - 1))
        return torch.where(mine, new, out)  # other rows keep what other groups made of them

    @staticmethod
    def fuse(host, z, out, modules: list[NormAdapter], fusion):
        """``LN(Fusion(LN(z), [A_i(LN(z))]) + z)``: the query is the adapters' input (AdapterHub's)."""
        return host.forward(fusion(out, [m.bottleneck(out) for m in modules]) + z)


class Capture(_Site):
    """Keeps its host's input for a :class:`ParallelAdapter` further down the sub-layer."""

    def __init__(self, box: Relay) -> None:
        super().__init__()
        self.box = box

    def adapt(self, host, x, out):
        self.box.put(x)
        return out

    def row_key(self):
        return Capture

    @staticmethod
    def adapt_rows(host, x, out, modules: list[Capture], index):
        return Capture.fuse(host, x, out, modules, None)

    @staticmethod
    def fuse(host, x, out, modules: list[Capture], fusion):
        for m in modules:  # the whole batch: the parallel adapters take their own rows
            m.box.put(x)
        return out


class ParallelAdapter(_Site):
    """Beside a sub-layer: ``out + A(x)`` with ``x`` the sub-layer's input."""

    def __init__(self, bottleneck: Bottleneck, box: Relay | None = None) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.box = box

    def adapt(self, host, x, out):
        source = x if self.box is None else self.box.take()
        return map_hidden(out, lambda s: s + self.bottleneck(source))

    def row_key(self):
        return (ParallelAdapter, self.box is None, *super().row_key()[1:]) if _plain(self.bottleneck) else id(self)

    @staticmethod
    def _source(x, modules: list[ParallelAdapter]):
        sources = [x if m.box is None else m.box.take() for m in modules]
        return sources[0]

    row_tables = staticmethod(_tables)

    @classmethod
    def adapt_rows(cls, host, x, out, modules: list[ParallelAdapter], index):
        if cls.row_tables(modules) is not None:
            return super().adapt_rows(host, x, out, modules, index)
        source = ParallelAdapter._source(x, modules)  # each on its own rows, from the batch's one source
        for k, module in enumerate(modules):
            mine = (index == k).nonzero().squeeze(1)
            update = module.bottleneck(take(source, mine))
            out = put(out, mine, map_hidden(take(out, mine), lambda s, u=update: s + u.to(s.dtype)))
        return out

    @staticmethod
    def adapt_tables(host, x, out, rows, modules: list[ParallelAdapter]):
        source = ParallelAdapter._source(x, modules)
        return map_hidden(out, lambda s: s + through(modules[0].bottleneck, source, rows))

    @staticmethod
    def fuse(host, x, out, modules: list[ParallelAdapter], fusion):
        """The sub-layer's input is the fusion query (AdapterHub's)."""
        source = ParallelAdapter._source(x, modules)
        return map_hidden(out, lambda s: s + fusion(source, [m.bottleneck(source) for m in modules]))


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
