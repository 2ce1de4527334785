"""A routing signature: a Gaussian over an adapter's input features (mean, per-dimension scale, and in
standardised units a low-rank-plus-isotropic covariance), and its calibration: the cross-fitted distances
of held-out inputs of its own, sorted. A score is the Mahalanobis distance (over sqrt(D)) divided by the
95th percentile of the calibration, so scores of different adapters are comparable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.arch import model_type
from adapterkit.core.backbone import fingerprint
from adapterkit.core.routing.inputs import Prompt, features, layer_index
from adapterkit.errors import AdapterError, ConfigError

REFERENCE = 0.95  # scores are distances over this quantile of the adapter's own held-out distances
MAX_RANK = 1024
MAX_DIM = 65536
MAX_SAMPLES = 1_000_000
MIN_SAMPLES = 4  # cross-fitting needs a few held-out inputs
# key -> number of dimensions, in the order Signature takes them
TENSORS = {"mean": 1, "scale": 1, "components": 2, "spread": 1, "residual": 1, "calibration": 1}


@dataclasses.dataclass(frozen=True, eq=False)
class Signature:
    """An adapter's routing signature (see the module's docstring); checked at construction.

    A Gaussian over the features of the adapter's inputs: ``mean`` and ``scale`` (per dimension)
    standardise a feature; in standardised units the covariance is ``components.T @ diag(spread) @
    components + residual * I`` (a low-rank part, orthonormal rows, and an isotropic rest).
    ``calibration``: sorted held-out distances. ``layer``: the hidden state used (an index into
    ``hidden_states``, >= 0); ``depth``: how many hidden states the base model gives; ``base_model``:
    its ``model_type`` and fingerprint."""

    mean: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,), > 0
    components: torch.Tensor  # (r, D), orthonormal rows
    spread: torch.Tensor  # (r,), > 0
    residual: torch.Tensor  # (1,), > 0
    calibration: torch.Tensor  # (n,), sorted, >= 0
    layer: int
    depth: int
    base_model: dict[str, Any]

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ConfigError(f"invalid routing signature: {problem}")

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def reference(self) -> float:
        """The calibration distance at quantile :data:`REFERENCE` (what a score of 1 means)."""
        return max(float(torch.quantile(self.calibration.double(), REFERENCE)), 1e-6)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) Mahalanobis distance of each row of ``x`` (N, D) to the mean, over sqrt(D) (so about 1
        for the adapter's own inputs whatever the model's width)."""
        return _distances(x, *(getattr(self, key) for key in TENSORS if key != "calibration"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        tensors = all(torch.equal(getattr(self, k), getattr(other, k)) for k in TENSORS)
        return tensors and (self.layer, self.depth, self.base_model) == (other.layer, other.depth, other.base_model)

    __hash__ = None  # type: ignore[assignment]  # tensors: equal by value, so not hashable


def _problem(sig: Signature) -> str | None:
    """What is wrong with a signature's fields, or None."""
    for key, ndim in TENSORS.items():
        value = getattr(sig, key)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.ndim != ndim:
            return f"{key} must be a {ndim}-D float32 tensor"
        if not torch.isfinite(value).all():
            return f"{key} holds NaN or infinite values"
    (rank, dim), n = sig.components.shape, sig.calibration.shape[0]
    if not (1 <= rank <= MAX_RANK and 1 <= dim <= MAX_DIM and MIN_SAMPLES <= n <= MAX_SAMPLES):
        return f"sizes out of range: rank {rank} (1..{MAX_RANK}), dimension {dim} (1..{MAX_DIM}), {n} samples"
    shapes = {"mean": (dim,), "scale": (dim,), "spread": (rank,), "residual": (1,)}
    for key, shape in shapes.items():
        if getattr(sig, key).shape != shape:
            return f"{key} has shape {tuple(getattr(sig, key).shape)}, expected {shape} (components are {rank} x {dim})"
    if not all((getattr(sig, key) > 0).all() for key in ("scale", "spread", "residual")):
        return "scale, spread and residual must be positive"
    if (sig.calibration < 0).any() or (sig.calibration.diff() < 0).any():
        return "calibration must be non-negative and sorted"
    gram = sig.components.double() @ sig.components.double().T
    if not torch.allclose(gram, torch.eye(rank, dtype=torch.float64), atol=1e-3):
        return "components must have orthonormal rows"
    if not (type(sig.layer) is int and type(sig.depth) is int and 0 <= sig.layer < sig.depth <= 10_000):
        return f"layer {sig.layer!r} must be an integer in 0..depth-1 (depth {sig.depth!r})"
    return _base_problem(sig.base_model)


def _base_problem(base: Any) -> str | None:
    """What is wrong with a ``base_model`` entry (model type and fingerprint, as ``backbone.fingerprint``)."""
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        return "base_model must be an object with a model_type string"
    prints = base.get("fingerprint")
    if not isinstance(prints, dict) or not 0 < len(prints) <= 1_000_000:
        return "base_model.fingerprint must be a non-empty object"
    for name, entry in prints.items():
        shape, sample = (entry.get("shape"), entry.get("sample")) if isinstance(entry, dict) else (None, None)
        ints = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        floats = isinstance(sample, list) and len(sample) <= 16
        if not (ints and floats and all(type(v) in (int, float) and math.isfinite(v) for v in sample)):
            return f"base_model.fingerprint entry {name!r} must hold a shape (integers) and up to 16 finite samples"
    return None


def _distances(x, mean, scale, components, spread, residual) -> torch.Tensor:
    """Mahalanobis distance under the signature's covariance, over sqrt(D): the part of the standardised
    deviation in the span of ``components`` weighed by ``1 / spread``, the rest by ``1 / residual``."""
    z = (x - mean) / scale
    along = z @ components.T  # (N, r)
    rest = (z.pow(2).sum(dim=1) - along.pow(2).sum(dim=1)).clamp_min(0)
    return ((along.pow(2) / spread).sum(dim=1) + rest / residual).div(x.shape[1]).sqrt()


def _fit(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """``(mean, scale, components, spread, residual)`` of samples ``x`` (N, D).

    ``scale``: the standard deviation per dimension, its variance shrunk a tenth of the way to the mean
    variance (each dimension weighs 1/scale: one that barely moved in the sample must not weigh without
    bound). ``components``: the top ``rank`` principal directions of the standardised samples, at most
    one per 4 samples (the spread of more is noise). ``residual``: the mean variance left outside them,
    at least 5% of the total per dimension; no component's spread is below it."""
    n, dim = x.shape
    mean = x.mean(dim=0)
    variance = (x - mean).pow(2).sum(dim=0) / (n - 1)
    scale = (0.9 * variance + 0.1 * variance.mean()).clamp_min(1e-12).sqrt()
    z = (x - mean) / scale
    r = max(1, min(rank, n // 4, dim))
    _, singular, directions = torch.linalg.svd(z, full_matrices=False)
    spread = singular[:r].pow(2) / (n - 1)
    total = z.pow(2).sum() / (n - 1)
    residual = torch.maximum((total - spread.sum()) / max(dim - r, 1), 0.05 * total / dim).clamp_min(1e-12)
    return mean, scale, directions[:r].contiguous(), spread.clamp_min(residual), residual.reshape(1)


def _calibration(x: torch.Tensor, rank: int, generator: torch.Generator, folds: int = 5) -> torch.Tensor:
    """Each sample's distance under a signature fitted without it (``folds``-fold cross-fitting): what a
    new input of the task scores, not what the samples that made the signature score."""
    fold = torch.randperm(len(x), generator=generator) % min(folds, len(x))
    out = torch.empty(len(x))
    for f in fold.unique():
        held = fold == f
        out[held] = _distances(x[held], *_fit(x[~held], rank))
    return out.sort().values


def base_identity(model: nn.Module) -> dict[str, Any]:
    """The base model's type and fingerprint, as a signature records them (taken before any merge)."""
    state = st.get_state(model, create=True)
    if state.fingerprint is None:
        state.fingerprint = fingerprint(model)
    return {"model_type": model_type(model), "fingerprint": state.fingerprint}


def signature(
    model: nn.Module,
    tokenizer,
    texts: Sequence[Prompt],
    *,
    layer: int | None = None,
    rank: int = 32,
    max_texts: int = 256,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
) -> Signature:
    """The routing signature of an adapter's inputs ``texts`` (strings or chat conversations), from the
    frozen base model (adapters off).

    ``layer``: which hidden state (an index into ``hidden_states``; default: the middle one);
    ``rank``: principal directions kept (at most one per 4 texts);
    ``max_texts``: a seeded sample of this many is used when more are given.
    """
    if len(texts) < MIN_SAMPLES or rank < 1 or max_texts < MIN_SAMPLES:
        raise AdapterError(
            f"a routing signature needs at least {MIN_SAMPLES} example inputs (got {len(texts)}), "
            f"rank >= 1 and max_texts >= {MIN_SAMPLES}"
        )
    generator = torch.Generator().manual_seed(seed)
    if len(texts) > max_texts:
        texts = [texts[i] for i in torch.randperm(len(texts), generator=generator)[:max_texts].tolist()]
    found, depth = features(model, tokenizer, texts, [layer], batch_size=batch_size, max_length=max_length)
    x = found[layer]
    if float((x - x[0]).abs().max()) == 0:
        raise AdapterError("the example inputs all give the same features; give varied examples of the task")
    calibration = _calibration(x, rank, generator)
    fitted = _fit(x, rank)
    return Signature(*fitted, calibration, layer_index(layer, depth), depth, base_identity(model))
