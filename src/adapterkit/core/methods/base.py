"""The protocol every adapter method follows.

A method is a config dataclass (``method`` names it) whose :meth:`AdapterConfig.build` returns
``(host module path, adapter module)`` placements, and adapter modules whose ``adapt`` edits the
host's output. Central code only attaches, activates, saves and merges; it never asks which
method it holds.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, is_conv1d, spec_for
from adapterkit.core.hosts import loop_kv_rows, loop_rows, take_rows
from adapterkit.core.merge_rules import GENERIC
from adapterkit.core.state import base_modules
from adapterkit.errors import AdapterError, ConfigError

if TYPE_CHECKING:
    from adapterkit.core.adapterhub_spec import HubFormat
    from adapterkit.core.peft_spec import PeftFormat


class AdapterModule(nn.Module):
    """One adapter at one host module.

    Composition (:mod:`adapterkit.core.composition`): ``blocks`` names the blocks it can run in
    besides ``Stack``; adapters with equal ``row_key()`` at one host compute a ``PerRow`` batch
    together in ``adapt_rows`` (the default runs each on its own rows).
    """

    edits_inputs = False  # True: the slot also calls adapt_inputs before the host's forward
    # False where a prompt must be seen in one forward (a prompt or prefix inserted on the first): the
    # serving engine then prefills it whole rather than in chunks
    chunked_prompts = True
    blocks: frozenset[str] = frozenset({"average", "split", "rows", "rows_nested"})
    why_not = "this adapter's method does not support that block"
    kv_rows = staticmethod(loop_kv_rows)

    @staticmethod
    def row_tables(modules: list[AdapterModule]) -> list[torch.Tensor] | None:
        """The group's weights as per-adapter tables (``hosts.stack_rows``: one entry per module, the
        last the identity), or None where its modules cannot compute together. A group's tables are all
        that its rows' batched computation (:meth:`adapt_tables`) reads, so a server stacks them once per
        loaded adapter (:mod:`adapterkit.core.banks`) instead of at every call."""
        return None

    @staticmethod
    def adapt_tables(host: nn.Module, x: Any, out: Any, rows: list[torch.Tensor], modules: list) -> Any:
        """The host's output with row ``i`` through its adapter: ``rows[k][i]`` is row ``i``'s entry of the
        group's :meth:`row_tables` table ``k`` (``modules``: the group, for what its members share)."""
        return out

    @staticmethod
    def adapt_inputs_tables(host: nn.Module, args: tuple, kwargs: dict, rows: list, modules: list) -> tuple:
        """As :meth:`adapt_tables`, for the host's call arguments (methods that edit inputs)."""
        return args, kwargs

    @classmethod
    def adapt_rows(cls, host: nn.Module, x: Any, out: Any, modules: list[AdapterModule], index: torch.Tensor) -> Any:
        """Row ``i`` through ``modules[index[i]]`` (the last index: unchanged): one batched computation over
        the group's tables where it has them, else each module on its own rows."""
        tables = cls.row_tables(modules)
        if tables is not None:
            return cls.adapt_tables(host, x, out, take_rows(tables, index), modules)
        if type(modules[0]).adapt is AdapterModule.adapt:  # edits inputs only
            return out
        return loop_rows(host, x, out, modules, index)

    @classmethod
    def adapt_inputs_rows(cls, host: nn.Module, args: tuple, kwargs: dict, modules: list, index: torch.Tensor):
        """As :meth:`adapt_rows`, for the host's call arguments (``edits_inputs``)."""
        tables = cls.row_tables(modules)
        if tables is None:
            raise AdapterError(
                f"{cls.__name__} edits its host's inputs but cannot run per row: give the method row_tables and "
                "adapt_inputs_tables, or its own adapt_inputs_rows"
            )
        return cls.adapt_inputs_tables(host, args, kwargs, take_rows(tables, index), modules)

    def explain(self, kind: str) -> str:
        """Why this module cannot run inside blocks of ``kind``."""
        if kind == "fuse":
            return "AdapterFusion attends over bottleneck adapters' outputs; fuse bottleneck adapters"
        if kind == "arrow":
            return "Arrow routes tokens among plain LoRA adapters of linear layers (no DoRA, gating or unions)"
        return self.why_not

    def row_key(self) -> Any:
        """Adapters at one host with equal keys run a ``PerRow`` batch as one computation."""
        return id(self)

    def kv_prefix(self, key: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values this adapter prepends in attention (prefix tuning)."""
        return []

    def adapt_inputs(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Return the host's call arguments changed (runs before its forward)."""
        return args, kwargs

    def adapt(self, host: nn.Module, x: torch.Tensor, out: Any) -> Any:
        """Return the host's output with this adapter applied (the default: unchanged).

        Args:
            host: the module this adapter is attached to.
            x: the host's first input, e.g. ``(batch, seq, in_features)``.
            out: the host's output, e.g. ``(batch, seq, out_features)``.
        """
        return out

    def merge(self, host: nn.Module) -> None:
        """Fold this adapter into ``host``'s weights (only linear methods can)."""
        raise AdapterError(
            f"{type(self).__name__} is not linear in the host's weights and cannot be merged; "
            "keep it unmerged (it still runs at inference)"
        )

    def unmerge(self, host: nn.Module) -> None:
        """Undo :meth:`merge`."""
        raise AdapterError(f"{type(self).__name__} cannot be merged, so it cannot be unmerged")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not AdapterModule.merge


@dataclasses.dataclass(frozen=True)
class AdapterConfig(abc.ABC):
    """Base of every method's config: a frozen value of plain JSON fields, validated when built.

    Change one with :meth:`replace` (``ak.PRESETS`` can be shared safely: nobody can alter them)."""

    method: ClassVar[str] = ""
    peft: ClassVar[PeftFormat | None] = None  # how peft's folders hold it, where peft has the method
    adapterhub: ClassVar[HubFormat | None] = None  # how AdapterHub's folders hold it, where AdapterHub has it
    merge_methods: ClassVar[frozenset[str]] = GENERIC  # the merge rules it accepts (none: it cannot merge)
    # (model, names, configs, weights, rule) -> (new config, its tensors), for a method that merges in its own
    # way; None: every parameter merged by the rule (core.merging)
    merge_adapters: ClassVar[Callable | None] = None

    def __post_init__(self) -> None:
        """Lists become tuples (a config is a value: hashable, never changed in place), then validate."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook; most methods check their fields
        """Raise :class:`ConfigError` for a value the method cannot use."""

    @abc.abstractmethod
    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        """Create the adapter modules and say where each goes (full module paths)."""

    def training_hook(self, model: nn.Module, name: str, total_step: int) -> Any:
        """What a training loop must run for this adapter besides the loss (AdaLoRA's rank allocation): an object
        with ``regularizer()`` (a loss term) and ``update(step)`` (after each optimiser step), or None."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists), with the method's name."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict` (without the ``method`` key)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for a {cls.method} adapter; valid fields: {sorted(names)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> AdapterConfig:
        """A copy with some fields changed; an unknown field is a :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for a {self.method} adapter; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)  # validated by __post_init__


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def param_dtype(host: nn.Module) -> torch.dtype:
    """Adapters train in fp32 even on a half-precision base model."""
    dtype = next(host.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer with its weight stored (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def find_targets(
    model: nn.Module, targets: list[str] | str, kinds=(is_linear,), what: str = "Linear or Conv1D"
) -> list[str]:
    """Module names matching ``targets``: a list of name suffixes, or one full-match regex (peft's rule)."""

    def hit(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    names = [n for n, _ in base_modules(model) if hit(n)]
    check(bool(names), f"no module of {type(model).__name__} matches target_modules={targets!r}")
    for name in names:
        module = model.get_submodule(name)
        check(any(k(module) for k in kinds), f"cannot adapt {name} ({type(module).__name__}); target {what} modules")
    return names


def lora_targets(model: nn.Module, arch: ArchSpec | None, targets: list[str] | str | None) -> list[str]:
    """The Linear / Conv1D modules ``targets`` names, by default the architecture's LoRA targets (the methods
    that adapt a linear layer's weight: LoHa, LoKr, VeRA, FourierFT, OFT, BOFT, AdaLoRA)."""
    return find_targets(model, targets or list(spec_for(model, arch).lora_targets))


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_arguments(host: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by name (positional ones too), ``**kwargs`` flattened."""
    signature = _signature(type(host))
    arguments = dict(signature.bind_partial(None, *args, **kwargs).arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def share(module: nn.Module, name: str, value: Any, owner: bool) -> None:
    """Give ``module`` an attribute shared by all layers of one adapter.

    Only the owner registers it (one parameter name, so ``state_dict`` and ``save_pretrained``
    see no shared tensors); the others hold a plain reference to the same object.
    """
    if owner:
        setattr(module, name, value)
    else:
        object.__setattr__(module, name, value)
