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
import functools
import math
import threading

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..arch import ArchSpec, features, find_layers, spec_for
from .base import AdapterConfig, AdapterModule, check, map_hidden, param_dtype

INITS = ("bert", "mam_adapter", "houlsby")


class Bottleneck(nn.Module):
    """``(..., H) -> (..., H)``: ``scaling * dropout(Up(act(Down(h))))``, without the skip."""

    def __init__(self, dim: int, size: int, config: BottleneckConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(dim, size, dtype=dtype)
        self.act = ACT2FN[config.non_linearity]
        self.adapter_up = nn.Linear(size, dim, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling
        self.reset_parameters(config.init_weights)

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
        down = self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype)))
        return (self.dropout(self.adapter_up(down)) * self.scaling).to(h.dtype)


class SequentialAdapter(AdapterModule):
    """On a projection or a pre-LN block: ``out + A(out)``."""

    def __init__(self, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.bottleneck = bottleneck

    def adapt(self, host, x, out):
        return map_hidden(out, lambda h: h + self.bottleneck(h))


class NormAdapter(AdapterModule):
    """On a post-LN LayerNorm with input ``z = s + x``: ``LN(A(LN(z)) + z)``."""

    def __init__(self, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.bottleneck = bottleneck

    def adapt(self, host, z, out):
        return host.forward(self.bottleneck(out) + z)  # .forward: no hooks, no recursion


class _Box:
    """Hands a tensor from one hook to a later one in the same forward, per thread."""

    def __init__(self) -> None:
        self.values: dict[int, torch.Tensor] = {}

    def put(self, x: torch.Tensor) -> None:
        self.values[threading.get_ident()] = x

    def take(self) -> torch.Tensor:
        return self.values.pop(threading.get_ident())


class Capture(AdapterModule):
    """Keeps its host's input for a :class:`ParallelAdapter` further down the sub-layer."""

    def __init__(self, box: _Box) -> None:
        super().__init__()
        self.box = box

    def adapt(self, host, x, out):
        self.box.put(x)
        return out


class ParallelAdapter(AdapterModule):
    """Beside a sub-layer: ``out + A(x)`` with ``x`` the sub-layer's input."""

    def __init__(self, bottleneck: Bottleneck, box: _Box | None = None) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.box = box

    def adapt(self, host, x, out):
        source = x if self.box is None else self.box.take()
        return map_hidden(out, lambda s: s + self.bottleneck(source))


@dataclasses.dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter config; field names and defaults follow AdapterHub's ``BnConfig``.

    The bottleneck is ``bottleneck_size`` if set, else ``hidden_size // reduction_factor``.
    ``leave_out`` lists layer indices that get no adapter.
    """

    method = "bottleneck"
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
    leave_out: list[int] = dataclasses.field(default_factory=list)

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

    def size(self, dim: int) -> int:
        return self.bottleneck_size or max(1, int(dim // self.reduction_factor))

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        placements = []
        for index, (path, layer) in enumerate(find_layers(model, spec)):
            if index in self.leave_out:
                continue
            attn_out = layer.get_submodule(spec.attn_out)
            dim = features(attn_out)[1]
            new = functools.partial(Bottleneck, dim, self.size(dim), self, param_dtype(attn_out))
            if self.mh_adapter:
                placements += self._place(path, spec.attn_in, spec.attn_out, spec.attn_norm, None, new)
            if self.output_adapter:
                placements += self._place(path, spec.ffn_in, spec.ffn_out, spec.ffn_norm, path, new)
        return placements

    def _place(self, layer, sub_in, sub_out, norm, block_out, new) -> list[tuple[str, AdapterModule]]:
        if self.is_parallel:
            if sub_out.startswith(sub_in + "."):  # the input module computes the whole sub-layer
                return [(f"{layer}.{sub_in}", ParallelAdapter(new()))]
            box = _Box()
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
