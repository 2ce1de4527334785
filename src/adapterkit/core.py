"""The public functions that add, activate, train and merge adapters on any ``nn.Module``.

The model keeps its own class (``Trainer``, ``generate()`` and ``save_pretrained`` keep working):
adapters are child modules attached by :mod:`adapterkit.state`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from . import state as st
from .arch import ArchSpec
from .backbone import base_parameters, fingerprint, head_parameters
from .errors import AdapterError, ConfigError
from .methods import AdapterConfig, resolve_config


def add_adapter(
    model: nn.Module,
    name: str,
    config: str | AdapterConfig = "pfeiffer",
    *,
    arch: ArchSpec | None = None,
    activate: bool = False,
    **overrides: Any,
) -> AdapterConfig:
    """Insert a new adapter into ``model`` and return its resolved config.

    Args:
        model: any ``nn.Module`` of a supported architecture (or pass ``arch``).
        name: a new adapter name (letters, digits, ``_`` and ``-``).
        config: a preset name (``"pfeiffer"``, ``"houlsby"``, ``"parallel"``, ``"lora"``, ...) or
            a config object.
        arch: where adapters go, for an architecture missing from the table.
        activate: make it the active adapter.
        **overrides: fields of the config to change, e.g. ``bottleneck_size=64`` or ``r=16``.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-'")
    config = resolve_config(config, **overrides)
    state = st.get_state(model, create=True)
    if name in state.configs:
        raise ConfigError(
            f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name"
        )
    if state.fingerprint is None:
        state.fingerprint = fingerprint(model)  # before any merge can change the weights
    placements = config.build(model, arch)
    for path, module in placements:
        st.attach(model.get_submodule(path), name, module, state)
    state.configs[name] = config
    if activate:
        set_active(model, name)
    return config


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if it was merged)."""
    state = _known(model, name)
    if name in state.merged:
        unmerge_adapter(model, name)
    for host, _ in list(st.adapter_modules(model, name)):
        st.detach(host, name)
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter names and their configs, in the order they were added."""
    state = model.__dict__.get("_adapterkit_state")
    return dict(state.configs) if state else {}


def set_active(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Activate one adapter, several (applied in order at each site), or none (``None``)."""
    st.get_state(model, create=True).active = _names(model, names)


def _names(model: nn.Module, names: str | Sequence[str] | None) -> tuple[str, ...]:
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        _known(model, name)
    return names


@contextlib.contextmanager
def use(model: nn.Module, names: str | Sequence[str] | None) -> Iterator[None]:
    """Activate ``names`` inside the block for this thread / asyncio task only.

    The setup lives in a ``ContextVar``: concurrent requests may each ``use`` another adapter on
    one shared model. ``model``'s own ``set_active`` setup is untouched.
    """
    names = _names(model, names)
    state = st.get_state(model, create=True)
    if state.merged - set(names):
        raise AdapterError(f"adapters {sorted(state.merged)} are merged into the weights; unmerge_adapter them first")
    with state.override(names):
        yield


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters that run in the current context."""
    state = model.__dict__.get("_adapterkit_state")
    return state.current() if state else ()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: no adapter is active inside the block (this thread / task only)."""
    state = st.get_state(model, create=True)
    if state.merged:
        raise AdapterError(f"adapters {sorted(state.merged)} are merged into the weights; unmerge_adapter them first")
    with state.override(()):
        yield


def train_adapter(model: nn.Module, name: str, train_head: bool = True) -> None:
    """Freeze everything but adapter ``name`` (and the task head), and activate it."""
    state = _known(model, name)
    if name in state.merged:
        raise AdapterError(f"adapter {name!r} is merged; unmerge_adapter(model, {name!r}) before training it")
    head = set(head_parameters(model)) if train_head else set()
    for param_name, p in model.named_parameters():
        p.requires_grad_(st.is_adapter_param(param_name, name) or param_name in head)
    set_active(model, name)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights; it then costs nothing at inference.

    A merged adapter acts whatever the active setting says, until :func:`unmerge_adapter`.
    """
    state = _known(model, name)
    if name in state.merged:
        raise AdapterError(f"adapter {name!r} is already merged")
    sites = list(st.adapter_modules(model, name))
    for _, module in sites:
        if not module.mergeable:
            method = state.configs[name].method
            raise AdapterError(f"adapter {name!r} ({method}) is not linear in the weights and cannot be merged")
    for host, module in sites:
        module.merge(host)
    state.merged.add(name)
    st.sync_all(model)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Subtract a merged adapter from the base weights again (exact to fp32 rounding)."""
    state = _known(model, name)
    if name not in state.merged:
        raise AdapterError(f"adapter {name!r} is not merged")
    for host, module in st.adapter_modules(model, name):
        module.unmerge(host)
    state.merged.discard(name)
    st.sync_all(model)


def bake_adapter(model: nn.Module, name: str) -> None:
    """Freeze an adapter's training-time reparametrisation into plain tensors (prefix: drop the
    MLP, keep its output). Outputs are unchanged; the saved config records the baked form."""
    state = _known(model, name)
    config = state.configs[name]
    if not hasattr(config, "baked"):
        raise AdapterError(f"adapter {name!r} ({config.method}) has nothing to bake")
    for _, module in st.adapter_modules(model, name):
        getattr(module, "bake", lambda: None)()
    state.configs[name] = config.baked()


@dataclasses.dataclass
class AdapterRow:
    name: str
    method: str
    params: int
    percent_of_base: float
    active: bool
    merged: bool


@dataclasses.dataclass
class Summary:
    """Parameter counts of a model with adapters; ``str()`` gives a table."""

    base_params: int
    head_params: int
    total_params: int
    trainable_params: int
    adapters: list[AdapterRow]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.base_params, 1)

    def __str__(self) -> str:
        lines = [f"{'adapter':<16} {'method':<11} {'params':>12} {'% of base':>10}  active merged"]
        for row in self.adapters:
            lines.append(
                f"{row.name:<16} {row.method:<11} {row.params:>12,} {row.percent_of_base:>9.3f}%"
                f"  {'yes' if row.active else 'no':<6} {'yes' if row.merged else 'no'}"
            )
        lines.append(f"base model params: {self.base_params:,}; head params: {self.head_params:,}")
        lines.append(
            f"total params: {self.total_params:,}; trainable: {self.trainable_params:,} "
            f"({self.trainable_percent:.3f}% of base)"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Total, base, head and trainable parameter counts, and one row per adapter."""
    state = model.__dict__.get("_adapterkit_state") or st.State()
    base = sum(p.numel() for p in base_parameters(model).values())
    params = dict(model.named_parameters())
    rows = []
    for name, config in state.configs.items():
        n = sum(p.numel() for k, p in params.items() if st.is_adapter_param(k, name))
        rows.append(AdapterRow(name, config.method, n, 100.0 * n / base, name in state.current(), name in state.merged))
    return Summary(
        base_params=base,
        head_params=sum(p.numel() for p in head_parameters(model).values()),
        total_params=sum(p.numel() for p in params.values()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        adapters=rows,
    )


def _known(model: nn.Module, name: str) -> st.State:
    state = st.get_state(model, create=True)
    if name not in state.configs:
        known = ", ".join(state.configs) or "none"
        raise AdapterError(f"no adapter named {name!r} in this model (adapters: {known})")
    return state
