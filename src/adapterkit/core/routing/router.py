"""The router: each input to the adapter of lowest score, or to the base model when every score is above a
threshold (chosen on validation data when given); top-k mixing weights, and the per-row setups
(``PerRow``: a name, or an ``Average`` of LoRA-family / bottleneck adapters) that apply them."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core import adapters as ad
from adapterkit.core import composition as co
from adapterkit.core import io
from adapterkit.core import state as st
from adapterkit.core.backbone import same_base
from adapterkit.core.formats.detect import locate
from adapterkit.core.routing.files import has_signature, load_signature
from adapterkit.core.routing.inputs import Prompt, features
from adapterkit.core.routing.signatures import Signature, base_identity, signature
from adapterkit.errors import AdapterError, AdapterFileError, ConfigError
from adapterkit.runs import adapter_folder


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How a :class:`Router` decides.

    ``threshold``: an input whose best score is above it goes to the base model (scores: 1 = the 95th
    percentile of an adapter's own held-out inputs; replaced by one chosen on validation data when
    ``Router.build`` gets it). ``temperature``: mixing weights are ``softmax(-score / temperature)``
    over the top ``top_k`` adapters within the threshold. ``batch_size``, ``max_length``: how prompts
    run through the base model to be scored.
    """

    threshold: float = 1.5
    temperature: float = 0.1
    top_k: int = 1
    batch_size: int = 16
    max_length: int = 256

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"RouterConfig needs a finite threshold > 0, got {self.threshold}")
        if self.temperature <= 0 or self.top_k < 1 or self.batch_size < 1 or self.max_length < 1:
            raise ConfigError(
                f"RouterConfig needs temperature > 0 and top_k, batch_size, max_length >= 1 "
                f"(got {self.temperature}, {self.top_k}, {self.batch_size}, {self.max_length})"
            )


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a threshold chosen on validation data gives on that data: the share of in-task inputs sent
    to some adapter (``kept``) and to their own (``correct``), and of general inputs sent to the base."""

    threshold: float
    kept: float
    correct: float
    to_base: float
    inputs: int


def choose_threshold(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """The threshold that best separates in-task best scores ``inside`` (kept: <= threshold) from general
    ones ``outside`` (sent to the base: > threshold), by balanced accuracy; of equally good ones the
    middle, each between two neighbouring scores at their geometric mean (scores are ratios)."""
    values = torch.cat([inside, outside]).double().sort().values.clamp_min(1e-9)
    candidates = torch.cat([values[:1] / 2, (values[1:] * values[:-1]).sqrt(), values[-1:] * 2])
    kept = (inside.double()[None] <= candidates[:, None]).double().mean(dim=1)
    rejected = (outside.double()[None] > candidates[:, None]).double().mean(dim=1)
    balanced = (kept + rejected) / 2
    best = (balanced >= balanced.max() - 1e-12).nonzero().squeeze(1)
    return float(candidates[best[len(best) // 2]])


def _mixable(model: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` can run in an ``Average`` inside ``PerRow`` (LoRA family, bottlenecks)."""
    return all({"average", "rows_nested"} <= module.blocks for _, module in st.adapter_modules(model, name))


class Router:
    """Routes inputs among adapters of one model by their :class:`Signature` (see the module's docstring).

    >>> router = ak.Router.build(model, tokenizer, ["out/sentiment", "out/topics"], validation=held_out)
    >>> router.route(["the film was a delight"])  # ['sentiment']
    >>> ak.generate(model, tokenizer, prompts, route=router)  # each prompt through its adapter
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        signatures: Mapping[str, Signature],
        config: RouterConfig | None = None,
        calibration: Calibration | None = None,
        *,
        resident: bool = True,
    ) -> None:
        """``resident=False``: the adapters are not in ``model`` (a server loads each on first use): routing
        decides among their names, and ``setups`` gives top-1 names only (a mix needs them loaded)."""
        if not signatures:
            raise AdapterError("a Router needs at least one adapter with a signature")
        base = base_identity(model)
        for name, sig in signatures.items():
            if resident:
                ad.known(model, name)
            if sig.base_model["model_type"] != base["model_type"] or not same_base(
                sig.base_model["fingerprint"], base["fingerprint"]
            ):
                raise AdapterFileError(
                    f"the routing signature of {name!r} was computed on another base model than this one; "
                    "compute it again on this model (ak.signature)"
                )
        self.model, self.tokenizer = model, tokenizer
        self.signatures = dict(signatures)
        self.config = config or RouterConfig()
        self.calibration = calibration
        self.references = torch.tensor([sig.reference() for sig in self.signatures.values()])
        self.mixable = {name: resident and _mixable(model, name) for name in self.signatures}

    @property
    def names(self) -> list[str]:
        return list(self.signatures)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer,
        adapters: Sequence[str | os.PathLike],
        examples: Mapping[str, Sequence[Prompt]] | None = None,
        validation: Mapping[str | None, Sequence[Prompt]] | None = None,
        config: RouterConfig | None = None,
        **signature_options: Any,
    ) -> Router:
        """A router over ``adapters``: names of adapters in ``model`` or saved adapter folders (a path, or a
        string naming a folder that exists; loaded unless an adapter of that name is already in the model).

        Each adapter's signature is computed from ``examples[name]`` (a few of its inputs; options as
        :func:`signature` takes them) when given, else read from its folder (``routing.json``).
        ``validation``: in-task inputs under adapter names and general inputs (of no adapter's task)
        under ``None``; the threshold for "none of them" is then chosen on it (:meth:`calibrate`).
        """
        pending, signatures = dict(examples or {}), {}
        for item in adapters:
            name, folder = _adapter(model, item)
            if name in signatures:
                raise AdapterError(f"adapter {name!r} is given twice")
            if name in pending:
                signatures[name] = signature(model, tokenizer, pending.pop(name), **signature_options)
            elif folder is not None and has_signature(folder):
                signatures[name] = load_signature(folder)
            else:
                raise AdapterError(
                    f"adapter {name!r} has no routing signature{f' in {folder}' if folder else ''}; "
                    f"pass examples={{{name!r}: [a few of its inputs]}}"
                )
        if pending:
            raise AdapterError(f"examples name {sorted(pending)}, which are not among the adapters")
        router = cls(model, tokenizer, signatures, config)
        return router.calibrate(validation) if validation else router

    def with_config(self, **changes: Any) -> Router:
        """A copy with ``RouterConfig`` fields changed (``router.with_config(top_k=2)``); a new threshold drops
        the calibration report, which described the old one."""
        copy = object.__new__(Router)
        copy.__dict__.update(self.__dict__, config=dataclasses.replace(self.config, **changes))
        if "threshold" in changes:
            copy.calibration = None
        return copy

    def scores(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """(N, adapters) scores, lower is closer: whitened distance over the adapter's reference distance."""
        if not prompts:
            return torch.empty(0, len(self.signatures))
        layers = sorted({sig.layer for sig in self.signatures.values()})
        options = dict(batch_size=self.config.batch_size, max_length=self.config.max_length)
        found, depth = features(self.model, self.tokenizer, prompts, layers, **options)
        columns = []
        for name, sig in self.signatures.items():
            if (depth, found[sig.layer].shape[1]) != (sig.depth, sig.dim):
                raise AdapterFileError(
                    f"the routing signature of {name!r} has {sig.depth} hidden states of size {sig.dim}, this "
                    f"model {depth} of size {found[sig.layer].shape[1]}; compute it again on this model"
                )
            columns.append(sig.distances(found[sig.layer]))
        return torch.stack(columns, dim=1) / self.references

    def weights(self, prompts: Sequence[Prompt], top_k: int | None = None) -> list[list[tuple[str, float]]]:
        """Per prompt: ``[(adapter, weight), ...]`` for the best ``top_k`` adapters (default: the config's)
        within the threshold, weights summing to 1, best first; ``[]``: the base model."""
        k = self.config.top_k if top_k is None else top_k
        if k < 1:
            raise ConfigError(f"top_k must be >= 1, got {k}")
        return [self._mix(row, k) for row in self.scores(prompts)]

    def _mix(self, row: torch.Tensor, k: int) -> list[tuple[str, float]]:
        order = row.argsort()[:k]
        order = order[row[order] <= self.config.threshold]
        weights = torch.softmax(-row[order].double() / self.config.temperature, dim=0)
        return [(self.names[i], float(w)) for i, w in zip(order.tolist(), weights, strict=True)]

    def route(self, prompts: Sequence[Prompt]) -> list[str | None]:
        """Per prompt: the adapter of lowest score, or None (the base model) when all are above the threshold."""
        return [mix[0][0] if mix else None for mix in self.weights(prompts, top_k=1)]

    def setups(self, prompts: Sequence[Prompt]) -> list[str | co.Average | None]:
        """Per prompt, for ``PerRow``: an adapter name, None, or (``top_k`` > 1) an ``Average`` of the chosen
        adapters, weights rounded to 0.01 (rows of nearly the same mix then compute together). Adapters that
        cannot average inside ``PerRow`` (IA3, prefix, prompt) are left out of a mix; one chosen first
        runs alone."""
        return [self._setup(mix) for mix in self.weights(prompts)]

    def _setup(self, mix: list[tuple[str, float]]) -> str | co.Average | None:
        if not mix:
            return None
        if not self.mixable[mix[0][0]]:
            return mix[0][0]
        kept = [(name, round(w, 2)) for name, w in mix if self.mixable[name] and round(w, 2) > 0]
        if len(kept) == 1:
            return kept[0][0]
        return co.Average(*[n for n, _ in kept], weights=[w for _, w in kept])

    def calibrate(self, validation: Mapping[str | None, Sequence[Prompt]]) -> Router:
        """A copy whose threshold best separates ``validation``'s in-task inputs (under adapter names) from
        its general ones (under ``None``), with what that gives on them in ``calibration``."""
        tasks = {name: list(v) for name, v in validation.items() if name is not None and len(v)}
        general = list(validation.get(None, []))
        if not tasks or not general or set(tasks) - set(self.names):
            raise AdapterError(
                "validation needs in-task inputs under adapter names (of " + ", ".join(self.names) + ") and "
                f"general inputs under None; got {sorted(map(str, validation))}"
            )
        inside = [p for v in tasks.values() for p in v]
        best = self.scores(inside + general).min(dim=1)
        n = len(inside)
        threshold = choose_threshold(best.values[:n], best.values[n:])
        kept = best.values[:n] <= threshold
        labels = torch.tensor([self.names.index(name) for name, v in tasks.items() for _ in v])
        report = Calibration(
            threshold=threshold,
            kept=float(kept.double().mean()),
            correct=float((kept & (best.indices[:n] == labels)).double().mean()),
            to_base=float((best.values[n:] > threshold).double().mean()),
            inputs=n + len(general),
        )
        copy = self.with_config(threshold=threshold)
        copy.calibration = report
        return copy


def _adapter(model: nn.Module, item: str | os.PathLike) -> tuple[str, Path | None]:
    """``(name, folder or None)`` of an adapter given by name or folder; a folder's adapter is loaded into
    ``model`` unless one of its name is there already."""
    if isinstance(item, str) and item.startswith("hub:"):
        raise AdapterError(
            f"Router.build takes adapter names and local folders; pull {item} first: "
            f"folder = adapterkit.hub.client.pull({item!r}, model=model)"
        )
    path = adapter_folder(item)
    if not isinstance(item, os.PathLike) and not path.is_dir():
        ad.known(model, item)
        return item, None
    folder, name = saved_adapter(path)
    if name not in ad.list_adapters(model):
        io.load_adapter(model, folder, name)
    return name, folder


def saved_adapter(path: str | os.PathLike) -> tuple[Path, str]:
    """``(folder, name)`` of the adapter saved in ``path`` (adapterkit's, peft's or AdapterHub's layout): the
    name it was saved under, else its folder's name."""
    folder, data, peer = locate(adapter_folder(path))
    return folder, (data.get("name") if peer is None else None) or folder.name
