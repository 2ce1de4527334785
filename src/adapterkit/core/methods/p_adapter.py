"""P-adapter (Inoue, Otake et al., "ELP-adapters", TASLP 2024): a prefix in feature space.

``P`` learned pseudo-features (C, P), init N(0, 1e-3), are prepended to the convolutional feature
extractor's output ``(B, C, T) -> (B, C, P + T)``; they pass through the feature projection and the
whole encoder like real frames. The attention mask grows with them: the model's frame lengths
(``_get_feat_extract_output_lengths``, used for the encoder mask, a classifier's pooling mask and
CTC lengths alike) are ``P`` larger while a P-adapter is active, and as the pseudo-frames sit in
front, every row's valid span becomes ``[0, P + its length)``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.arch import ArchSpec, spec_for
from adapterkit.core.backbone import base_prefix
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, param_dtype
from adapterkit.core.state import SLOT

LENGTHS = "_get_feat_extract_output_lengths"


class PseudoFeatures(AdapterModule):
    """On the feature extractor: ``(B, C, T) -> (B, C, P + T)`` with ``pseudo_features`` (C, P)."""

    blocks = frozenset()
    why_not = "P-adapters lengthen every row's features; use them alone or in a Stack"

    def __init__(self, channels: int, length: int, std: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.pseudo_features = nn.Parameter(torch.randn(channels, length, dtype=dtype) * std)

    def adapt(self, host, x, out):
        front = self.pseudo_features.to(out.dtype).expand(out.shape[0], -1, -1)
        return torch.cat([front, out], dim=-1)


def _lengths(self: nn.Module, *args, **kwargs):
    """The model's frame lengths plus the active P-adapters' pseudo-frames."""
    lengths = type(self)._get_feat_extract_output_lengths(self, *args, **kwargs)
    slot = self.get_submodule(self._adapterkit_features)._modules.get(SLOT)
    if slot is None:
        return lengths
    modules = (slot.adapter(name) for name in slot.state.current().names())
    return lengths + sum(m.pseudo_features.shape[1] for m in modules if isinstance(m, PseudoFeatures))


def _count_frames(model: nn.Module, features: str) -> None:
    """Make ``model`` (and its backbone) count the pseudo-frames in its frame lengths, while a P-adapter
    needs it (:func:`adapterkit.core.state.change`)."""
    prefix = base_prefix(model)
    pairs = ((model, prefix + features), (model.get_submodule(prefix[:-1]) if prefix else None, features))
    owners = [(owner, path) for owner, path in pairs if owner is not None and hasattr(owner, LENGTHS)]

    def undo() -> None:
        for owner, _ in owners:
            del owner._adapterkit_features, owner._get_feat_extract_output_lengths

    def apply() -> Callable[[], None]:
        for owner, path in owners:
            owner._adapterkit_features = path
            setattr(owner, LENGTHS, types.MethodType(_lengths, owner))
        return undo

    st.change(model, "p-adapter-frames", apply)


@dataclasses.dataclass(frozen=True)
class PAdapterConfig(AdapterConfig):
    """P-adapter: ``prefix_length`` pseudo-frames prepended to the convolutional features."""

    method = "p_adapter"
    prefix_length: int = 20
    init_std: float = 1e-3

    def validate(self) -> None:
        check(self.prefix_length > 0, f"prefix_length must be > 0, got {self.prefix_length}")
        check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        check(
            spec.features is not None,
            f"{type(model).__name__} has no variable-length convolutional features to extend "
            "(Whisper's encoder takes exactly 3000 frames); use the E- and L-adapters there",
        )
        path = base_prefix(model) + spec.features
        conv = model.get_submodule(path)
        channels = model.config.conv_dim[-1]
        _count_frames(model, spec.features)
        return [(path, PseudoFeatures(channels, self.prefix_length, self.init_std, param_dtype(conv)))]
