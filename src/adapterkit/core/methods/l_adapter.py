"""L-adapter (Otake et al. ICASSP 2023; Inoue, Otake et al., "ELP-adapters", TASLP 2024).

A path from every chosen encoder layer to the task head: layer ``i``'s output ``h_i`` gives
``l_i = h_i + LN(Up(ReLU(Down(h_i))))`` (bottleneck 512 by default), a side branch that leaves the
encoder itself unchanged. The encoder's last hidden state is replaced by ``sum_i softmax(w)_i l_i``
with learned ``w`` (init 0: a uniform average), so the head (or a bare encoder's caller) sees the
combination. Init as the E-adapter: N(0, 1e-3) weights, zero biases.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, features, find_layers, spec_for
from adapterkit.core.backbone import base_prefix
from adapterkit.core.hosts import hidden, with_hidden
from adapterkit.core.methods.base import AdapterModule, check, param_dtype
from adapterkit.core.methods.e_adapter import Branch, BranchConfig, layer_range
from adapterkit.core.state import Relay

WHY = "the L-adapter replaces the encoder's output by a weighted sum over its layers; use it alone or in a Stack"


class LTap(AdapterModule):
    """On the ``index``-th chosen encoder layer: records ``h + LN(Up(ReLU(Down(h))))`` in ``taps`` (a
    ``{index: tensor}`` for this forward); the layer's output is unchanged."""

    blocks = frozenset()
    why_not = WHY

    def __init__(self, branch: Branch, taps: Relay, index: int) -> None:
        super().__init__()
        self.branch = branch
        self.taps, self.index = taps, index

    def adapt(self, host, x, out):
        h = hidden(out)
        self.taps.put({**self.taps.get({}), self.index: h + self.branch(h)})  # by index: a rerun layer overwrites
        return out


class LCombine(AdapterModule):
    """On the encoder: its last hidden state becomes ``sum_i softmax(layer_weights)_i l_i``."""

    blocks = frozenset()
    why_not = WHY

    def __init__(self, count: int, taps: Relay, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(count, dtype=dtype))
        self.taps = taps

    def adapt(self, host, x, out):
        found = self.taps.take({})
        taps = [found[i] for i in range(len(self.layer_weights)) if i in found]
        check(
            len(taps) == len(self.layer_weights), f"the L-adapter saw {len(taps)} of {len(self.layer_weights)} layers"
        )
        weights = torch.softmax(self.layer_weights, dim=0)
        combined = sum(w * t for w, t in zip(weights, taps, strict=True))
        return with_hidden(out, combined.to(hidden(out).dtype))


@dataclasses.dataclass(frozen=True)
class LAdapterConfig(BranchConfig):
    """L-adapter: ``bottleneck_size`` 512, from ``layers`` (indices; None = every encoder layer)."""

    method = "l_adapter"
    bottleneck_size: int = 512

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        found = list(find_layers(model, spec))
        chosen = layer_range(self.layers, len(found))
        host = found[0][1].get_submodule(spec.ffn_out)
        dim, dtype = features(host)[1], param_dtype(host)
        taps = Relay()
        placements = [
            (found[i][0], LTap(Branch(dim, self.bottleneck_size, self.init_std, dtype), taps, k))
            for k, i in enumerate(chosen)
        ]
        encoder = (base_prefix(model) + spec.prompt_strip).rstrip(".")
        return placements + [(encoder, LCombine(len(chosen), taps, dtype))]
