"""E-adapter (Otake et al. ICASSP 2023; Inoue, Otake et al., "ELP-adapters", TASLP 2024).

In each chosen encoder layer, on the feed-forward sub-layer's output ``f``:
``f + LN(Up(ReLU(Down(f))))`` with ``Down: H -> 256`` (default) and ``Up: 256 -> H``; the residual
add and (post-LN models) the layer's LayerNorm follow as before. Weights start N(0, 1e-3), biases
zero (the papers' init); the adapter's LayerNorm weight starts at 1e-3 too (see :class:`Branch`).

``train_layer_norms``: the papers also tune the encoder's LayerNorms. The base model stays frozen:
the adapter holds its own copy of each LayerNorm of its layers (initialised from it) and computes
that LayerNorm with the copy, so the tuned norms live, train and are saved with the adapter.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.arch import ArchSpec, features, find_layers, spec_for
from adapterkit.core.hosts import map_hidden
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, param_dtype


class Branch(nn.Module):
    """``(..., H) -> (..., H)``: ``LN(Up(ReLU(Down(h))))``, the E- and L-adapters' branch."""

    def __init__(self, dim: int, size: int, std: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size, dtype=dtype)
        self.up = nn.Linear(size, dim, dtype=dtype)
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
        # LN's output has unit variance whatever its input: a weight of 1 would add unit noise to every
        # layer at init. Starting it at ``std`` keeps the branch near zero, as the small weights intend.
        nn.init.constant_(self.norm.weight, std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(F.relu(self.down(h.to(self.up.weight.dtype))))).to(h.dtype)


class EAdapter(AdapterModule):
    """On a feed-forward output projection: ``out + LN(Up(ReLU(Down(out))))``."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.branch = branch

    def adapt(self, host, x, out):
        return map_hidden(out, lambda h: h + self.branch(h))


class TunedNorm(AdapterModule):
    """On a frozen LayerNorm: the same normalisation with the adapter's own weight and bias."""

    def __init__(self, host: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = nn.Parameter(host.weight.detach().clone().to(param_dtype(host)))
        self.bias = nn.Parameter(host.bias.detach().clone().to(param_dtype(host)))

    def adapt(self, host, x, out):
        return F.layer_norm(x, host.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), host.eps)


def layer_range(layers: list[int] | None, count: int) -> list[int]:
    """The chosen layer indices (all when None); negative indices count from the end."""
    chosen = range(count) if layers is None else [i % count for i in layers]
    check(all(-count <= i < count for i in (layers or [])), f"layers {layers} outside the model's {count} layers")
    return sorted(set(chosen))


@dataclasses.dataclass(frozen=True)
class BranchConfig(AdapterConfig):
    """Fields shared by the E- and L-adapters: the branch width, the layers (indices; None = all), the init."""

    bottleneck_size: int = 256
    layers: tuple[int, ...] | None = None
    init_std: float = 1e-3

    def validate(self) -> None:
        check(self.bottleneck_size > 0, f"bottleneck_size must be > 0, got {self.bottleneck_size}")
        check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")


@dataclasses.dataclass(frozen=True)
class EAdapterConfig(BranchConfig):
    """E-adapter: ``bottleneck_size`` 256, in ``layers`` (indices; None = every encoder layer)."""

    method = "e_adapter"
    train_layer_norms: bool = False

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        found = list(find_layers(model, spec))
        placements = []
        for index in layer_range(self.layers, len(found)):
            path, layer = found[index]
            host = layer.get_submodule(spec.ffn_out)
            branch = Branch(features(host)[1], self.bottleneck_size, self.init_std, param_dtype(host))
            placements.append((f"{path}.{spec.ffn_out}", EAdapter(branch)))
            if self.train_layer_norms:
                placements += [
                    (f"{path}.{name}", TunedNorm(norm))
                    for name, norm in layer.named_modules()
                    if isinstance(norm, nn.LayerNorm) and ".adapterkit." not in f".{name}."
                ]
        return placements
