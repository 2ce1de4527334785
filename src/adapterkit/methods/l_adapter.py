"""L-adapter (Otake et al. ICASSP 2023; Inoue, Otake et al., "ELP-adapters", TASLP 2024).

A path from every chosen encoder layer to the task head: layer ``i``'s output ``h_i`` gives
``l_i = h_i + LN(Up(ReLU(Down(h_i))))`` (bottleneck 512 by default), a side branch that leaves the
encoder itself unchanged. The encoder's last hidden state is replaced by ``sum_i softmax(w)_i l_i``
with learned ``w`` (init 0: a uniform average), so the head (or a bare encoder's caller) sees the
combination. Init as the E-adapter: N(0, 1e-3) weights, zero biases.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from torch import nn

from ..arch import ArchSpec, features, find_layers, spec_for
from ..backbone import base_prefix
from .base import AdapterModule, check, param_dtype
from .e_adapter import Branch, BranchConfig, layer_range

WHY = "the L-adapter replaces the encoder's output by a weighted sum over its layers; use it alone or in a Stack"


class _Taps:
    """The L-branch outputs of the current forward, per thread, in layer order."""

    def __init__(self) -> None:
        self.values: dict[int, list[torch.Tensor]] = {}

    def add(self, value: torch.Tensor) -> None:
        self.values.setdefault(threading.get_ident(), []).append(value)

    def take(self) -> list[torch.Tensor]:
        return self.values.pop(threading.get_ident(), [])


class LTap(AdapterModule):
    """On an encoder layer: records ``h + LN(Up(ReLU(Down(h))))``; the layer's output is unchanged."""

    blocks = frozenset()
    why_not = WHY

    def __init__(self, branch: Branch, taps: _Taps) -> None:
        super().__init__()
        self.branch = branch
        self.taps = taps

    def adapt(self, host, x, out):
        h = out if isinstance(out, torch.Tensor) else out[0]
        self.taps.add(h + self.branch(h))
        return out


class LCombine(AdapterModule):
    """On the encoder: its last hidden state becomes ``sum_i softmax(layer_weights)_i l_i``."""

    blocks = frozenset()
    why_not = WHY

    def __init__(self, count: int, taps: _Taps, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(count, dtype=dtype))
        self.taps = taps

    def adapt(self, host, x, out):
        taps = self.taps.take()
        check(
            len(taps) == len(self.layer_weights), f"the L-adapter saw {len(taps)} of {len(self.layer_weights)} layers"
        )
        weights = torch.softmax(self.layer_weights, dim=0)
        combined = sum(w * t for w, t in zip(weights, taps, strict=True))
        if isinstance(out, torch.Tensor):
            return combined.to(out.dtype)
        if isinstance(out, tuple):
            return (combined.to(out[0].dtype), *out[1:])
        out["last_hidden_state"] = combined.to(out["last_hidden_state"].dtype)
        return out


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
        taps = _Taps()
        placements = [
            (found[i][0], LTap(Branch(dim, self.bottleneck_size, self.init_std, dtype), taps)) for i in chosen
        ]
        encoder = (base_prefix(model) + spec.prompt_strip).rstrip(".")
        return placements + [(encoder, LCombine(len(chosen), taps, dtype))]
