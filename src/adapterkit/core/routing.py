"""Routing: pick the adapter for each input from the input alone (issue 26, items 1 and 2).

Each adapter carries a *routing signature*: what the frozen base model (adapters disabled) makes of a
sample of the adapter's inputs. An input's feature is the mean of one hidden layer over its tokens
(padding, special tokens and the first position left out: the first position is where decoders park
attention, its hidden state orders of magnitude larger than the rest and the same in every input). A
signature is a Gaussian over those features: a mean, a per-dimension scale, and in standardised units a
low-rank-plus-isotropic covariance (the top principal directions with their spread, and one residual
variance for the rest: an input off the task's subspace is far even where it looks normal dimension by
dimension); and *calibration*: the distances of held-out samples of its own (cross-fitted), sorted. An
input's score for an adapter is its Mahalanobis distance (over sqrt(D)) divided by the 95th percentile of
the calibration distances, so scores of different adapters are comparable and 1 means "as far as the
farthest 5% of the adapter's own inputs".

:class:`Router` sends an input to the adapter of lowest score, or to the base model (``None``) when
every score is above a threshold (chosen on validation data when given); ``weights`` gives top-k
mixing weights (softmax of the negated scores over a temperature) and ``setups`` turns them into
per-row setups for ``PerRow`` (``ak.generate(..., route=router)``): a name, or an ``Average`` of LoRA
family / bottleneck adapters (for LoRA, ``out + sum_i w_i delta_i``: a weighted sum of the deltas).

Files: ``routing.safetensors`` (``mean``, ``scale`` (D,), ``components`` (r, D), ``spread`` (r,),
``residual`` (1,), ``calibration`` (n,)) and
``routing.json`` (layer, depth, sample size, the base model's type and fingerprint), beside an adapter's
own files. Both are read as hostile: sizes, header, keys, dtypes, shapes and values are checked before
use and a problem raises :class:`~adapterkit.errors.AdapterFileError` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapterkit.core import adapters as ad
from adapterkit.core import composition as co
from adapterkit.core import io
from adapterkit.core import state as st
from adapterkit.core.arch import find_layers, model_type, spec_for
from adapterkit.core.backbone import fingerprint, same_base
from adapterkit.core.entries import CONFIG_FILE
from adapterkit.core.formats.detect import locate
from adapterkit.errors import AdapterError, AdapterFileError, ArchitectureError, ConfigError
from adapterkit.files import write_folder
from adapterkit.runs import adapter_folder

SIGNATURE_FILE = "routing.safetensors"
SIGNATURE_JSON = "routing.json"
SIGNATURE_FORMAT = "adapterkit-routing"
SIGNATURE_VERSION = 1
REFERENCE = 0.95  # scores are distances over this quantile of the adapter's own held-out distances
# Caps on what a file may declare: far above any real signature, far below what could exhaust memory.
MAX_FILE_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 64 * 2**10
MAX_JSON_BYTES = 32 * 2**20
MAX_RANK = 1024
MAX_DIM = 65536
MAX_SAMPLES = 1_000_000
MIN_SAMPLES = 4  # cross-fitting needs a few held-out inputs
# key -> number of dimensions, in the order Signature takes them
TENSORS = {"mean": 1, "scale": 1, "components": 2, "spread": 1, "residual": 1, "calibration": 1}
DTYPES = {"F32", "F16", "BF16"}

Prompt = str | Sequence[dict[str, str]]


# -- features --------------------------------------------------------------------------------------------


def routing_text(prompt: Any) -> str:
    """The text routing looks at: a string itself, a conversation's user turns (joined by newlines), a list
    of words (token classification) joined by spaces."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") == "user")
    if isinstance(prompt, Sequence) and all(isinstance(w, str) for w in prompt):
        return " ".join(prompt)
    raise AdapterError(
        f"cannot route a {type(prompt).__name__}: routing takes text, a list of chat messages or a list of words"
    )


@contextlib.contextmanager
def _frozen_base(model: nn.Module) -> Iterator[nn.Module]:
    """The backbone, adapters off, in eval mode (dropout would move the features), without gradients.
    The backbone rather than the model: a causal LM's head would make (batch, length, vocab) logits."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), ad.disable_adapters(model):
            yield getattr(model, "base_model", model)
    finally:
        model.train(training)


def _pool_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions a row's feature averages (right padding): attended, not special, not the first;
    a row left with none (a one-token input) keeps its attended positions."""
    attended = batch["attention_mask"].bool()
    keep = attended & ~batch.pop("special_tokens_mask").bool()
    keep[:, 0] = False
    empty = ~keep.any(dim=1)
    keep[empty] = attended[empty]
    return keep


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token_id is None:
        raise AdapterError("the tokenizer has no padding token; set tokenizer.pad_token (e.g. to its eos token)")
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        options = dict(padding=True, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        return dict(tokenizer(texts, return_tensors="pt", **options))
    finally:
        tokenizer.padding_side = side


def features(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    layers: Iterable[int | None],
    *,
    batch_size: int = 16,
    max_length: int = 256,
) -> tuple[dict[int | None, torch.Tensor], int]:
    """Per layer (an index into ``hidden_states``: 0 the embeddings, negative from the end, None the
    middle one): the (N, D) float32 features of ``prompts``; and the depth (how many hidden states the
    model gives). The forward stops after the deepest block asked for (:func:`_states`)."""
    texts = [routing_text(p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    wanted, parts, depth = list(layers), [], 0
    with _frozen_base(model) as base:
        device = next(base.parameters()).device
        for start in range(0, len(order), batch_size):
            batch = _encode(tokenizer, [texts[i] for i in order[start : start + batch_size]], max_length)
            keep = _pool_mask(batch).to(device)
            states, depth = _states(base, {k: v.to(device) for k, v in batch.items()}, wanted)
            parts.append({layer: _mean(states[_index(layer, depth)], keep) for layer in wanted})
    inverse = torch.tensor(order).argsort()
    return {layer: torch.cat([p[layer] for p in parts])[inverse] for layer in wanted}, depth


class _Reached(Exception):
    """Raised by a hook on the deepest block a feature needs: the rest of the forward is not run."""


def _states(base: nn.Module, batch: dict[str, torch.Tensor], wanted: list[int | None]) -> tuple[dict, int]:
    """``({index: hidden state}, depth)`` for the ``wanted`` indices into ``hidden_states``.

    ``hidden_states[i]`` is block ``i - 1``'s output (0: block 0's input), except the last, which the
    model normalises: a block's forward hook records what is needed and, at the deepest, stops the
    forward, so a middle layer costs half a forward. The last index, or a model whose blocks adapterkit's
    table does not name, runs the whole forward with ``output_hidden_states``."""
    blocks = _blocks(base)
    depth = len(blocks) + 1
    indices = {_index(layer, depth) for layer in wanted} if blocks else set()
    if not blocks or max(indices) >= depth - 1:
        states = base(**batch, output_hidden_states=True).hidden_states
        if states is None:
            raise AdapterError(f"{type(base).__name__} returns no hidden states; routing needs a text model")
        return dict(enumerate(states)), len(states)
    found: dict[int, torch.Tensor] = {}
    with contextlib.ExitStack() as hooks:
        for index in sorted(indices):
            hooks.enter_context(_record(blocks, index, found, stop=index == max(indices)))
        with contextlib.suppress(_Reached):
            base(**batch)
    return found, depth


def _blocks(base: nn.Module) -> list[nn.Module]:
    try:
        return [block for _, block in find_layers(base, spec_for(base))]
    except ArchitectureError:
        return []


@contextlib.contextmanager
def _record(blocks: list[nn.Module], index: int, found: dict, stop: bool) -> Iterator[None]:
    """Store ``hidden_states[index]`` into ``found`` (block 0's input for 0, else block ``index - 1``'s
    output) and raise :class:`_Reached` after it when ``stop``."""

    def keep(hidden: torch.Tensor) -> None:
        found[index] = hidden
        if stop:
            raise _Reached

    if index == 0:
        handle = blocks[0].register_forward_pre_hook(
            lambda _, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    else:
        handle = blocks[index - 1].register_forward_hook(
            lambda _, args, out: keep(out[0] if isinstance(out, tuple) else out)
        )
    try:
        yield
    finally:
        handle.remove()


def _mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    weights = keep.to(torch.float32)[..., None]
    return ((hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)).cpu()  # empty: zeros


def _index(layer: int | None, depth: int) -> int:
    if layer is None:  # the middle: a frozen LM's features tell tasks apart better there than at the top
        return depth // 2
    if not -depth <= layer < depth:
        raise ConfigError(f"layer {layer} is out of range: the model gives {depth} hidden states (0..{depth - 1})")
    return layer % depth


# -- signatures --------------------------------------------------------------------------------------------


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
    return Signature(*fitted, calibration, _index(layer, depth), depth, base_identity(model))


# -- files -----------------------------------------------------------------------------------------------


def save_signature(folder: str | os.PathLike, sig: Signature) -> Path:
    """Write ``sig`` as ``routing.safetensors`` + ``routing.json`` into ``folder`` (an adapter's folder:
    its other files stay; ``adapterkit hub push`` sends both along)."""
    meta = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "layer": sig.layer,
        "depth": sig.depth,
        "samples": sig.calibration.shape[0],
        "base_model": sig.base_model,
    }
    tensors = {key: getattr(sig, key).contiguous() for key in TENSORS}

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / SIGNATURE_FILE, metadata={"format": "pt"})
        (tmp / SIGNATURE_JSON).write_text(json.dumps(meta) + "\n")

    return write_folder(Path(folder), fill, last=SIGNATURE_JSON)


def has_signature(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a routing signature (not whether it is valid: :func:`load_signature` checks)."""
    return (Path(folder) / SIGNATURE_JSON).is_file()


def load_signature(folder: str | os.PathLike) -> Signature:
    """The routing signature saved in ``folder``, every field checked (:class:`AdapterFileError` if not)."""
    folder = Path(folder)
    if not has_signature(folder):
        raise AdapterFileError(
            f"{folder} holds no routing signature ({SIGNATURE_JSON}); compute one from a few of the adapter's "
            "inputs: ak.save_signature(folder, ak.signature(model, tokenizer, inputs))"
        )
    meta, tensors = _read_meta(folder / SIGNATURE_JSON), _read_tensors(folder / SIGNATURE_FILE)
    if tensors["calibration"].shape[0] != meta["samples"]:
        raise AdapterFileError(f"{folder / SIGNATURE_FILE}: calibration length differs from {SIGNATURE_JSON}'s samples")
    try:
        return Signature(**tensors, layer=meta["layer"], depth=meta["depth"], base_model=meta["base_model"])
    except ConfigError as e:
        raise AdapterFileError(f"{folder}: {e}; compute the signature again (ak.signature)") from None


def _refuse(file: Path, problem: str) -> AdapterFileError:
    return AdapterFileError(f"{file}: {problem}; not a routing signature adapterkit wrote, compute it again")


def _read_meta(file: Path) -> dict[str, Any]:
    if file.stat().st_size > MAX_JSON_BYTES:
        raise _refuse(file, f"{file.stat().st_size} bytes, over the {MAX_JSON_BYTES} a signature's JSON may have")
    try:
        meta = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise _refuse(file, f"not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIGNATURE_FORMAT:
        raise _refuse(file, f'no "format": "{SIGNATURE_FORMAT}"')
    if meta.get("version") != SIGNATURE_VERSION:
        raise _refuse(file, f"version {meta.get('version')!r}, this adapterkit reads version {SIGNATURE_VERSION}")
    for key in ("layer", "depth", "samples"):
        if type(meta.get(key)) is not int:
            raise _refuse(file, f"{key} must be an integer, not {meta.get(key)!r}")
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The three tensors, the header checked before the library reads the file (sizes, keys, dtypes, shapes)."""
    if not file.is_file():
        raise _refuse(file, "missing (the JSON is there)")
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _refuse(file, f"{size} bytes, over the {MAX_FILE_BYTES} a signature may have")
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise _refuse(file, f"header length {length} out of range (file of {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise _refuse(file, f"corrupt header ({e})") from None
    _check_header(file, header)
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise _refuse(file, f"corrupt or truncated ({e})") from None
    return {key: tensors[key].float() for key in TENSORS}


def _check_header(file: Path, header: Any) -> None:
    keys = set(header) - {"__metadata__"} if isinstance(header, dict) else set()
    if keys != set(TENSORS):
        raise _refuse(file, f"tensors {sorted(keys)}, expected {sorted(TENSORS)}")
    caps = {
        "mean": (MAX_DIM,),
        "scale": (MAX_DIM,),
        "components": (MAX_RANK, MAX_DIM),
        "spread": (MAX_RANK,),
        "residual": (1,),
        "calibration": (MAX_SAMPLES,),
    }
    for key, cap in caps.items():  # every key is there: checked above
        entry = header[key]
        dtype, shape = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
        if dtype not in DTYPES:
            raise _refuse(file, f"{key} has dtype {dtype!r}, expected one of {sorted(DTYPES)}")
        fits = isinstance(shape, list) and len(shape) == len(cap)
        if not fits or not all(type(d) is int and 1 <= d <= c for d, c in zip(shape, cap, strict=True)):
            raise _refuse(file, f"{key} has shape {shape!r}, expected {len(cap)} dimensions of at most {list(cap)}")


# -- routing ---------------------------------------------------------------------------------------------


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


# -- the training hook -------------------------------------------------------------------------------------


def sign_training_output(
    model: nn.Module, tokenizer, inputs: Sequence[Any], folder: str | os.PathLike, **options: Any
) -> Signature | None:
    """Compute and save into ``folder`` the signature of a training set's inputs (its text column: strings,
    word lists, conversations or conversations as JSON strings, as ``adapterkit train`` reads them), for
    ``adapterkit train`` to call after saving the adapter. Returns None, writing nothing, where ``folder``
    holds no adapter (a full fine-tune), for inputs that are not text (speech) or fewer than a signature
    needs."""
    if not (Path(folder) / CONFIG_FILE).is_file() or not callable(tokenizer) or len(inputs) < MIN_SAMPLES:
        return None
    try:
        prompts = [_training_prompt(value) for value in inputs]
    except AdapterError:
        return None
    sig = signature(model, tokenizer, prompts, **options)
    save_signature(folder, sig)
    return sig


def _training_prompt(value: Any) -> Prompt:
    """A training row's text column as routing sees it: a JSON list of messages (a CSV cell) decoded."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(ValueError):
            decoded = json.loads(value)
            if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
                value = decoded
    routing_text(value)  # raises for what routing cannot read
    return value
