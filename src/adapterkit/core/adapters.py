"""The public functions that add, activate, train and merge adapters on any ``nn.Module``.

The model keeps its own class (``Trainer``, ``generate()`` and ``save_pretrained`` keep working):
adapters are child modules attached by :mod:`adapterkit.core.state`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from adapterkit.core import composition as co
from adapterkit.core import mha
from adapterkit.core import state as st
from adapterkit.core.arch import ArchSpec, find_layers, spec_for
from adapterkit.core.backbone import base_parameters, fingerprint, head_parameters
from adapterkit.core.methods import AdapterConfig, resolve_config
from adapterkit.core.quantize import is_quantized
from adapterkit.errors import AdapterError, ArchitectureError, ConfigError


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
    _build(model, name, config, arch, state)
    state.configs[name] = config
    state.checked.clear()
    if activate:
        set_active(model, name)
    return config


def _build(model: nn.Module, name: str, config: AdapterConfig, arch: ArchSpec | None, state: st.State) -> None:
    """Place the adapter's modules; what its method changes outside them is recorded as owned by ``name``.
    If anything fails, the model is left as it was."""
    state.building = name
    try:
        for path, module in config.build(model, arch):
            st.attach(model.get_submodule(path), name, module, state)
        _route_functional_attention(model, name, arch)
    except BaseException:
        for host, _ in list(st.adapter_modules(model, name)):
            st.detach(host, name)
        st.release(model, name)
        raise
    finally:
        state.building = None


def _route_functional_attention(model: nn.Module, name: str, arch: ArchSpec | None) -> None:
    """WavLM-like attention: where adapter ``name`` sits in it, make its projections run as modules."""
    try:
        spec = spec_for(model, arch)
    except ArchitectureError:  # LoRA with target_modules on an architecture outside the table
        return
    if spec.functional_attention:
        for path, layer in find_layers(model, spec):
            attention = layer.get_submodule(spec.attn_in)
            if any(isinstance(m, st.Slot) and name in m for m in attention.modules()):
                st.change(model, f"route:{path}.{spec.attn_in}", lambda a=attention: mha.install(a))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if it was merged)."""
    state = known(model, name)
    users = [f for f, (fuse, _) in state.fusions.items() if name in fuse.children]
    if users:
        raise AdapterError(f"adapter {name!r} is fused in {users}; ak.delete_fusion(model, {users[0]!r}) first")
    if name in state.merged:
        unmerge_adapter(model, name)
    for host, _ in list(st.adapter_modules(model, name)):
        st.detach(host, name)
    del state.configs[name]
    state.checked.clear()
    st.release(model, name)
    if name in state.active.names():  # a plain stack loses the name; any other setup is switched off
        kept = [n for n in state.active.children if n != name]
        plain = isinstance(state.active, co.Stack) and all(isinstance(n, str) for n in kept)
        state.active = co.Stack(*kept) if plain else co.Stack()


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter names and their configs, in the order they were added."""
    state = model.__dict__.get("_adapterkit_state")
    return dict(state.configs) if state else {}


Setup = str | Sequence[str] | co.Block | None


def set_active(model: nn.Module, setup: Setup) -> None:
    """Activate one adapter, several (a list: stacked, applied in order at each site), a
    composition block (``ak.Stack``, ``ak.Average``, ``ak.Fuse``, ``ak.PerRow``, ...) or none."""
    st.get_state(model, create=True).active = _setup(model, setup)


def _setup(model: nn.Module, setup: Setup) -> co.Block:
    """``setup`` as a block, checked: known adapters and fusions, methods that fit their blocks."""
    block = co.parse(setup)
    state = st.get_state(model, create=True)
    if block in state.checked:  # a server's use() per request checks a setup once
        return block
    for name in block.names():
        known(model, name)
    for fuse in co.walk(block):
        if isinstance(fuse, co.Fuse) and fuse.name not in state.fusions:
            raise AdapterError(f"no fusion layer {fuse.name!r}; ak.add_fusion(model, {fuse!r}) first")

    def modules_of(name: str) -> Iterator[tuple[str, nn.Module]]:
        for _, module in st.adapter_modules(model, name):
            yield state.configs[name].method, module

    if not isinstance(block, co.Stack) or not all(isinstance(c, str) for c in block.children):
        if state.merged:
            raise AdapterError(
                f"adapters {sorted(state.merged)} are merged into the weights, so they act on every row and branch; "
                f"unmerge_adapter them before activating {type(block).__name__}"
            )
        co.check_support(block, modules_of)
    state.checked.add(block)
    return block


@contextlib.contextmanager
def use(model: nn.Module, setup: Setup) -> Iterator[None]:
    """Activate ``setup`` (as :func:`set_active` takes it) inside the block, for this thread /
    asyncio task only.

    The setup lives in a ``ContextVar``: concurrent requests may each ``use`` another adapter on
    one shared model. ``model``'s own ``set_active`` setup is untouched.
    """
    block = _setup(model, setup)
    state = st.get_state(model, create=True)
    if state.merged - set(block.names()):
        raise AdapterError(f"adapters {sorted(state.merged)} are merged into the weights; unmerge_adapter them first")
    with state.override(block):
        yield


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters that run in the current context (each once, in order)."""
    state = model.__dict__.get("_adapterkit_state")
    return tuple(state.current().names()) if state else ()


def active_setup(model: nn.Module) -> co.Block:
    """The composition block that runs in the current context."""
    state = model.__dict__.get("_adapterkit_state")
    return state.current() if state else co.Stack()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: no adapter is active inside the block (this thread / task only)."""
    state = st.get_state(model, create=True)
    if state.merged:
        raise AdapterError(f"adapters {sorted(state.merged)} are merged into the weights; unmerge_adapter them first")
    with state.override(co.Stack()):
        yield


def train_adapter(model: nn.Module, name: str | co.Stack, train_head: bool = True) -> None:
    """Freeze everything but adapter ``name`` (and the task head), and activate it.

    ``name`` may be a ``Stack``: the stack is activated and its top (last) adapter trains on the
    frozen adapters below it.
    """
    setup = co.parse(name)
    if not isinstance(setup, co.Stack) or not setup.children or not isinstance(setup.children[-1], str):
        raise ConfigError(f"train_adapter takes an adapter name or a Stack ending in one, not {name!r}")
    name = setup.children[-1]
    state = known(model, name)
    if name in state.merged:
        raise AdapterError(f"adapter {name!r} is merged; unmerge_adapter(model, {name!r}) before training it")
    head = set(head_parameters(model)) if train_head else set()
    for param_name, p in model.named_parameters():
        p.requires_grad_(st.is_trainable_param(param_name, name) or param_name in head)
    set_active(model, setup)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights; it then costs nothing at inference.

    A merged adapter acts whatever the active setting says, until :func:`unmerge_adapter`.
    """
    state = known(model, name)
    if name in state.merged:
        raise AdapterError(f"adapter {name!r} is already merged")
    sites = list(st.adapter_modules(model, name))
    for _, module in sites:
        if not module.mergeable:
            method = state.configs[name].method
            raise AdapterError(f"adapter {name!r} ({method}) is not linear in the weights and cannot be merged")
    if any(is_quantized(host) for host, _ in sites):
        raise AdapterError(
            f"adapter {name!r} sits on quantized (int8/int4) weights: merging would requantize them and "
            "could not be undone exactly; keep it unmerged, or load it into the full-precision model and merge there"
        )
    for host, module in sites:
        module.merge(host)
    state.merged.add(name)
    state.checked.clear()
    st.sync_all(model)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Subtract a merged adapter from the base weights again (exact to fp32 rounding)."""
    state = known(model, name)
    if name not in state.merged:
        raise AdapterError(f"adapter {name!r} is not merged")
    for host, module in st.adapter_modules(model, name):
        module.unmerge(host)
    state.merged.discard(name)
    state.checked.clear()
    st.sync_all(model)


def bake_adapter(model: nn.Module, name: str) -> None:
    """Freeze an adapter's training-time reparametrisation into plain tensors (prefix: drop the
    MLP, keep its output). Outputs are unchanged; the saved config records the baked form."""
    state = known(model, name)
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
    setup: co.Block = dataclasses.field(default_factory=co.Stack)

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
        lines.append(f"active setup: {self.setup!r}")
        lines.append(f"base model params: {self.base_params:,}; head params: {self.head_params:,}")
        lines.append(
            f"total params: {self.total_params:,}; trainable: {self.trainable_params:,} "
            f"({self.trainable_percent:.3f}% of base)"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Total, base, head and trainable parameter counts, one row per adapter and per fusion, and
    the active composition."""
    state = model.__dict__.get("_adapterkit_state") or st.State()
    base = sum(p.numel() for p in base_parameters(model).values())
    params = dict(model.named_parameters())
    setup = state.current()
    used = set(setup.names()) | {b.name for b in co.walk(setup) if isinstance(b, co.Fuse)}
    methods = {**{n: c.method for n, c in state.configs.items()}, **{n: "fusion" for n in state.fusions}}
    rows = []
    for name, method in methods.items():
        n = sum(p.numel() for k, p in params.items() if st.is_adapter_param(k, name))
        rows.append(AdapterRow(name, method, n, 100.0 * n / base, name in used, name in state.merged))
    return Summary(
        setup=setup,
        base_params=base,
        head_params=sum(p.numel() for p in head_parameters(model).values()),
        total_params=sum(p.numel() for p in params.values()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        adapters=rows,
    )


def known(model: nn.Module, name: str) -> st.State:
    """The model's adapter state, after checking it holds adapter ``name`` (else a clear error)."""
    state = model.__dict__.get(st.STATE)
    if state is None or name not in state.configs:
        names = ", ".join(state.configs) if state and state.configs else "none"
        raise AdapterError(f"no adapter named {name!r} in this model (adapters: {names})")
    return state
