"""An input's routing feature: the mean of one hidden layer of the frozen base (adapters disabled) over the
input's tokens, padding, special tokens and the first position left out (the first position is where
decoders park attention: its hidden state is orders of magnitude larger than the rest and the same in
every input). The forward stops at that layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.core import adapters as ad
from adapterkit.core.arch import find_layers, spec_for
from adapterkit.errors import AdapterError, ArchitectureError, ConfigError

Prompt = str | Sequence[dict[str, str]]


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
            parts.append({layer: _mean(states[layer_index(layer, depth)], keep) for layer in wanted})
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
    indices = {layer_index(layer, depth) for layer in wanted} if blocks else set()
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


def layer_index(layer: int | None, depth: int) -> int:
    if layer is None:  # the middle: a frozen LM's features tell tasks apart better there than at the top
        return depth // 2
    if not -depth <= layer < depth:
        raise ConfigError(f"layer {layer} is out of range: the model gives {depth} hidden states (0..{depth - 1})")
    return layer % depth
