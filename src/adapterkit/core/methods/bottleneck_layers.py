"""The bottleneck adapter's modules: the bottleneck ``scaling * Up(act(Down(h)))`` (plain, or Compacter's PHM
layers), and the sites that place it at a host (after a projection, on a post-LN LayerNorm, beside a
sub-layer), each with its per-row and AdapterFusion forms. :mod:`.bottleneck` holds the config, the
formats and the placement rules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from adapterkit.core.hosts import map_hidden, put, stack_rows, take
from adapterkit.core.methods.base import AdapterModule, share
from adapterkit.core.state import Relay

BottleneckConfig = Any  # a methods.bottleneck.BottleneckConfig (imported there, not here: it imports this module)


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
