"""AdapterFusion (Pfeiffer et al. 2021): a trained attention over frozen bottleneck adapters.

At each site where the fused adapters sit, with ``q`` the adapters' input and ``u_i`` adapter
``i``'s output (before its residual), per position:

    p = softmax_i( dropout( Q(q) . K(u_i) ) ),    fused = sum_i p_i V(u_i)

and ``fused`` replaces the single adapter's output (its residual and LayerNorm follow as usual).
``"dynamic"`` (AdapterHub's default): Q, K, V learned, V starts at the identity (+1e-6) and a
regulariser ``0.01 * ||I - V||^2`` (:func:`fusion_regularization`) keeps it near it;
``"static"``: no V. Q and K start N(0, 0.02), biases zero; dropout defaults to the model's
``attention_probs_dropout_prob``. Files: ``adapter_fusion_config.json`` +
``model_adapter_fusion.safetensors`` (AdapterHub's names).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from adapterkit.core import adapters, io
from adapterkit.core import state as st
from adapterkit.core.backbone import head_parameters
from adapterkit.core.composition import Block, Fuse, parse, walk
from adapterkit.core.formats import read_json, read_tensors
from adapterkit.errors import AdapterError, AdapterFileError, ConfigError

CONFIG_FILE = "adapter_fusion_config.json"
WEIGHTS_FILE = "model_adapter_fusion.safetensors"


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """Which projections the fusion attention learns (AdapterHub's ``AdapterFusionConfig`` names)."""

    key: bool = True
    query: bool = True
    value: bool = True
    value_initialized: bool = True
    regularization: bool = True
    dropout: float | None = None

    def __post_init__(self) -> None:
        flags = (self.key, self.query, self.value, self.value_initialized, self.regularization)
        if not all(isinstance(flag, bool) for flag in flags):
            raise ConfigError(f"key, query, value, value_initialized and regularization are booleans: {self}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"fusion dropout must be in [0, 1) or None, got {self.dropout}")

    @classmethod
    def resolve(cls, config: str | FusionConfig | dict) -> FusionConfig:
        if isinstance(config, FusionConfig):
            return config
        if isinstance(config, dict):
            return cls(**config)
        if config not in FUSION_PRESETS:
            raise ConfigError(f"unknown fusion preset {config!r}; choose {', '.join(FUSION_PRESETS)}")
        return FUSION_PRESETS[config]


FUSION_PRESETS = {
    "dynamic": FusionConfig(),
    "static": FusionConfig(value=False, value_initialized=False, regularization=False),
}


def _linear(dim: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(dim, dim, bias=bias, dtype=dtype)
    nn.init.normal_(layer.weight, std=0.02)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class FusionLayer(nn.Module):
    """``query (B, T, H)``, ``outputs`` N x ``(B, T, H)`` -> ``(B, T, H)``: attention over the N outputs."""

    edits_inputs = False

    def __init__(self, dim: int, config: FusionConfig, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.query = _linear(dim, dtype) if config.query else nn.Identity()
        self.key = _linear(dim, dtype) if config.key else nn.Identity()
        self.value = _linear(dim, dtype, bias=False) if config.value else nn.Identity()
        if config.value and config.value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout = nn.Dropout(dropout)
        self.regularize = config.value and config.regularization

    def forward(self, query: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        dtype = query.dtype
        values = torch.stack(outputs, dim=2).to(self.dtype)  # (B, T, N, H)
        q = self.query(query.to(self.dtype))
        scores = self.dropout((self.key(values) @ q.unsqueeze(-1)).squeeze(-1))  # (B, T, N)
        probs = torch.softmax(scores, dim=-1)
        return (probs.unsqueeze(-2) @ self.value(values)).squeeze(-2).to(dtype)  # (B, T, H)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), torch.empty(0)).dtype


def _fuse_block(fuse: Fuse | Sequence[str]) -> Fuse:
    return fuse if isinstance(fuse, Fuse) else Fuse(*fuse)


def add_fusion(model: nn.Module, fuse: Fuse | Sequence[str], config: str | FusionConfig = "dynamic") -> str:
    """Add an AdapterFusion layer over bottleneck adapters ``fuse`` at every site they share.

    Returns the fusion's name (``Fuse.name``: the adapters joined by commas by default).
    """
    fuse, config = _fuse_block(fuse), FusionConfig.resolve(config)
    state = st.get_state(model, create=True)
    if fuse.name in state.fusions or fuse.name in state.configs:
        raise ConfigError(f"a fusion or adapter named {fuse.name!r} exists; delete_fusion it first or name this one")
    for name in fuse.children:
        method = adapters.known(model, name).configs[name].method
        if method != "bottleneck":
            raise ConfigError(f"adapter {name!r} is {method}; AdapterFusion fuses bottleneck adapters only")
    dropout = config.dropout
    if dropout is None:
        dropout = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0)
    for host in list(model.modules()):
        slot = host._modules.get(st.SLOT)
        sites = [slot[n] for n in fuse.children if slot is not None and n in slot]
        bottleneck = next((getattr(m, "bottleneck", None) for m in sites if hasattr(m, "bottleneck")), None)
        if bottleneck is not None:  # Capture sites only hand on their input
            bias = bottleneck.adapter_up.bias
            layer = FusionLayer(bias.shape[0], config, dropout, bias.dtype).to(bias.device)
            st.attach(host, fuse.name, layer, state)
    state.fusions[fuse.name] = (fuse, config)
    state.checked.clear()
    return fuse.name


def delete_fusion(model: nn.Module, name: str) -> None:
    """Remove fusion ``name``'s layers."""
    state = st.get_state(model, create=True)
    if name not in state.fusions:
        raise AdapterError(f"no fusion named {name!r} (fusions: {', '.join(state.fusions) or 'none'})")
    for host, _ in list(st.adapter_modules(model, name)):
        st.detach(host, name)
    del state.fusions[name]
    state.checked.clear()
    if any(isinstance(b, Fuse) and b.name == name for b in walk(state.active)):
        state.active = parse(None)


def train_fusion(model: nn.Module, setup: Fuse | Block | Sequence[str], train_head: bool = True) -> None:
    """Freeze everything but the fusion layers in ``setup`` (and the head) and activate ``setup``.

    The fused adapters stay frozen, as in AdapterFusion's second stage.
    """
    setup = _fuse_block(setup) if not isinstance(setup, Block) else setup
    names = {b.name for b in walk(setup) if isinstance(b, Fuse)}
    if not names:
        raise ConfigError(f"{setup!r} holds no Fuse block; train adapters with ak.train_adapter")
    head = set(head_parameters(model)) if train_head else set()
    for param_name, p in model.named_parameters():
        p.requires_grad_(any(st.is_trainable_param(param_name, n) for n in names) or param_name in head)
    adapters.set_active(model, setup)


def fusion_regularization(model: nn.Module) -> torch.Tensor:
    """``0.01 * sum ||I - V||^2`` over dynamic fusion layers (add it to the loss when training)."""
    loss = torch.zeros(())
    for layer in model.modules():
        if isinstance(layer, FusionLayer) and layer.regularize:
            weight = layer.value.weight
            eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
            loss = loss.to(weight.device) + 0.01 * (eye - weight).pow(2).sum()
    return loss


def save_fusion(model: nn.Module, name: str, path: str | os.PathLike, *, with_head: bool = True) -> Path:
    """Write fusion ``name``'s layers and config (and the task head, trained with it) to folder
    ``path``; the fused adapters are saved apart (:func:`adapterkit.save_adapter`)."""
    state = st.get_state(model, create=True)
    if name not in state.fusions:
        raise AdapterError(f"no fusion named {name!r} (fusions: {', '.join(state.fusions) or 'none'})")
    fuse, config = state.fusions[name]
    data = {
        "format": io.FORMAT,
        "name": name,
        "adapter_names": list(fuse.children),
        "config": dataclasses.asdict(config),
        "fingerprint": state.fingerprint,
        "head": sorted(head_parameters(model)) if with_head else [],
    }
    files = {WEIGHTS_FILE: io.adapter_state_dict(model, name)}
    if data["head"]:
        files[io.HEAD_FILE] = {k: p.detach() for k, p in head_parameters(model).items()}
    return io.write_adapter_folder(Path(path), {CONFIG_FILE: data}, files)


def load_fusion(model: nn.Module, path: str | os.PathLike, *, load_head: bool = True, activate: bool = False) -> str:
    """Load a fusion saved by :func:`save_fusion` (and its head); its adapters must be loaded first."""
    folder = Path(path)
    data = read_json(folder / CONFIG_FILE)
    tensors = read_tensors(folder / WEIGHTS_FILE)
    head = read_tensors(folder / io.HEAD_FILE) if load_head and data.get("head") and head_parameters(model) else {}
    io.check_head(model, head, folder / io.HEAD_FILE)
    try:
        fuse = Fuse(*data["adapter_names"], name=data["name"])
        config = FusionConfig(**data["config"])
    except (KeyError, TypeError) as e:
        raise AdapterFileError(f"{folder / CONFIG_FILE}: not an adapterkit fusion config ({e!r})") from e
    missing = [n for n in fuse.children if n not in adapters.list_adapters(model)]
    if missing:
        raise AdapterFileError(f"{folder}: fuses adapters {missing} that this model lacks; ak.load_adapter them first")
    name = add_fusion(model, fuse, config)
    try:
        io.copy_into(io.adapter_state_dict(model, name), tensors, folder / WEIGHTS_FILE)
    except AdapterFileError:
        delete_fusion(model, name)
        raise
    params = head_parameters(model)
    io.copy_into({k: params[k] for k in head}, head, folder / io.HEAD_FILE)
    if activate:
        adapters.set_active(model, fuse)
    return name
