"""A new task from a handful of examples: mixing weights over existing adapters, found without gradients.

LoraHub's idea (Huang et al. 2023): the composed adapter is ``sum_i w_i delta_i`` over existing LoRA
adapters; the weights minimise the mean loss on 5-20 examples of the new task plus an L1 penalty
``l1 * sum_i |w_i|`` (which keeps the mix small and sparse where few examples would overfit it), found by
CMA-ES (the ``cma`` package) from ``w = 0`` (the base model), each ``w_i`` within ``[-bound, bound]``.

Every candidate is built with :func:`~adapterkit.core.merging.combine_adapters` (``svd`` at rank
``sum_i r_i``: the exact weighted sum of the updates), so the adapter evaluated is the adapter kept.
Bottleneck, IA3, prefix and prompt adapters do not combine this way (their parameter average is not
their outputs' average), so only plain LoRA adapters compose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.core import adapters as ad
from adapterkit.core.io import save_adapter
from adapterkit.core.merging import combine_adapters
from adapterkit.core.methods import LoRAConfig
from adapterkit.errors import AdapterError, ConfigError

IGNORE = -100  # the label of a position without loss (the prompt, the padding): transformers' value

# An example: (prompt, answer); a chat conversation (its assistant turns are the answer); or
# pre-tokenized {"input_ids": [...], "labels": [...]} with IGNORE where there is no loss.
Example = tuple[str, str] | Sequence[Mapping[str, str]] | Mapping[str, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    """How :func:`compose` searches.

    Args:
        budget: the most candidate weightings evaluated (each one forward pass over the examples).
        seed: CMA-ES's random seed: one seed, one result.
        l1: the L1 penalty per unit of ``sum_i |w_i|`` (LoraHub's 0.05).
        bound: each weight lies in ``[-bound, bound]`` (LoraHub's 1.5).
        sigma: CMA-ES's initial step size.
    """

    budget: int = 40
    seed: int = 0
    l1: float = 0.05
    bound: float = 1.5
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.budget < 1 or self.seed < 0:
            raise ConfigError(f"compose needs budget >= 1 and seed >= 0, got {self.budget} and {self.seed}")
        if self.l1 < 0 or self.bound <= 0 or not 0 < self.sigma <= self.bound:
            raise ConfigError(
                f"compose needs l1 >= 0, bound > 0, 0 < sigma <= bound; got {self.l1}, {self.bound}, {self.sigma}"
            )


@dataclasses.dataclass(frozen=True)
class ComposeResult:
    """What :func:`compose` found.

    ``loss_before`` is the base model's mean loss on the examples (all weights 0), ``loss_after`` the
    composed adapter's (without the penalty); ``evaluations`` counts the candidates tried.
    """

    name: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    loss_before: float
    loss_after: float
    evaluations: int
    path: str | None = None


def compose(
    model: nn.Module,
    tokenizer,
    adapters: Sequence[str],
    examples: Sequence[Example],
    name: str = "composed",
    budget: int = 40,
    seed: int = 0,
    *,
    l1: float = 0.05,
    bound: float = 1.5,
    chat: bool = True,
    path: str | os.PathLike | None = None,
) -> ComposeResult:
    """Add adapter ``name``: the mix of LoRA ``adapters`` that fits ``examples`` of a new task best.

    Args:
        model: a causal LM holding ``adapters`` (plain LoRA, equal rank and targets).
        tokenizer: its tokenizer (with a padding token; a chat template where ``chat``).
        examples: 1 or more (5-20 is the use): ``(prompt, answer)`` pairs, chat conversations
            (lists of ``{"role", "content"}``; the loss is on the assistant turns) or pre-tokenized
            ``{"input_ids", "labels"}`` (labels ``-100`` where there is no loss).
        name: the new adapter's name (it must not exist yet).
        budget, seed, l1, bound: see :class:`ComposeConfig`.
        chat: a ``(prompt, answer)`` pair goes through the chat template (a user and an assistant turn);
            else the answer's tokens follow the prompt's.
        path: also save the new adapter there (:func:`~adapterkit.core.io.save_adapter`).
    """
    config = ComposeConfig(budget=budget, seed=seed, l1=l1, bound=bound)
    names = _check(model, adapters, name)
    batch = encode_batch(tokenizer, examples, chat, next(model.parameters()).device)

    def loss_of(weights: Sequence[float]) -> float:
        if not any(weights):  # all zero: the base model (and a zero LoRA would be the same, slower)
            with ad.disable_adapters(model):
                return mean_loss(model, batch)
        combine_adapters(model, names, name, weights=list(weights), method="svd")
        try:
            with ad.use(model, name):
                return mean_loss(model, batch)
        finally:
            ad.delete_adapter(model, name)

    before = loss_of([0.0] * len(names))
    weights, after, evaluations = _search(loss_of, len(names), config, before)
    combine_adapters(model, names, name, weights=weights, method="svd")  # all 0 (nothing beat the base): a zero update
    saved = str(save_adapter(model, name, path)) if path is not None else None
    return ComposeResult(name, tuple(names), tuple(weights), before, after, evaluations, saved)


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The mean over examples of each example's mean token cross-entropy on its labelled positions."""
    with torch.no_grad(), _eval(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # position t predicts token t + 1
    per_token = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    counted = (labels != IGNORE).sum(1)
    return (per_token.sum(1) / counted).mean().item()


def encode(tokenizer, example: Example, chat: bool = True) -> dict[str, list[int]]:
    """One example as ``{"input_ids", "labels"}`` (labels ``IGNORE`` outside the answer)."""
    if isinstance(example, Mapping):
        ids, labels = list(example["input_ids"]), list(example["labels"])
    elif _is_pair(example):
        ids, labels = _pair(tokenizer, example[0], example[1], chat)
    else:
        ids, labels = _conversation(tokenizer, [dict(m) for m in example])
    if len(ids) != len(labels) or all(label == IGNORE for label in labels):
        raise AdapterError(f"an example needs one label per token and at least one answer token, got {example!r}")
    return {"input_ids": ids, "labels": labels}


def encode_batch(
    tokenizer, examples: Sequence[Example], chat: bool = True, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """All examples (:func:`encode`) right-padded into one batch for :func:`mean_loss` (a handful of
    short examples: one forward pass per candidate)."""
    if isinstance(examples, str | Mapping) or not examples:
        raise AdapterError("compose needs a non-empty list of examples of the new task (5-20 is the use)")
    if tokenizer.pad_token_id is None:
        raise AdapterError("the tokenizer has no padding token; set tokenizer.pad_token (e.g. to its eos token)")
    rows = [encode(tokenizer, e, chat) for e in examples]
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], device=device)

    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": padded("input_ids", tokenizer.pad_token_id), "labels": padded("labels", IGNORE),
            "attention_mask": mask.to(device)}  # fmt: skip


def _check(model: nn.Module, adapters: Sequence[str], name: str) -> list[str]:
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if len(names) < 2 or len(set(names)) != len(names):
        raise AdapterError(f"compose mixes at least two different adapters, got {names}")
    configs = [ad.known(model, n).configs[n] for n in names]
    if name in ad.list_adapters(model):
        raise ConfigError(f"adapter {name!r} already exists; pick another name for the composed adapter")
    others = {n: c.method for n, c in zip(names, configs, strict=True) if not isinstance(c, LoRAConfig)}
    if others:
        raise AdapterError(
            f"compose mixes LoRA adapters (a weighted sum of their updates); {others} cannot be mixed that way"
        )
    if len({c.r for c in configs}) > 1 or len({c.target_modules for c in configs}) > 1:
        ranks = {n: (c.r, c.target_modules) for n, c in zip(names, configs, strict=True)}
        raise ConfigError(f"compose mixes LoRA adapters of one rank and one set of targets, got {ranks}")
    return names


def _search(loss_of, n: int, config: ComposeConfig, base: float) -> tuple[list[float], float, int]:
    """CMA-ES over the weights from 0; the best candidate by loss + penalty (the base model counts)."""
    import cma  # a plain dependency; imported here so that `import adapterkit.core` stays light

    best, best_loss, best_objective, evaluations = [0.0] * n, base, base, 1
    options = {"bounds": [-config.bound, config.bound], "seed": config.seed + 1, "verbose": -9}  # cma: seed 0 = time
    with _numpy_random_kept():  # cma seeds numpy's global generator; the caller's stream is left as it was
        es = cma.CMAEvolutionStrategy([0.0] * n, config.sigma, options)
        while evaluations + es.popsize <= config.budget and not es.stop():
            candidates = es.ask()
            scores = []
            for x in candidates:
                weights = [round(float(v), 6) for v in x]  # rounded: the result prints and reproduces exactly
                loss = loss_of(weights)
                scores.append(loss + config.l1 * sum(abs(w) for w in weights))
                if scores[-1] < best_objective:
                    best, best_loss, best_objective = weights, loss, scores[-1]
            evaluations += len(candidates)
            es.tell(candidates, scores)
    return best, best_loss, evaluations


def _is_pair(example: Any) -> bool:
    return isinstance(example, tuple | list) and len(example) == 2 and all(isinstance(s, str) for s in example)


def _pair(tokenizer, prompt: str, answer: str, chat: bool) -> tuple[list[int], list[int]]:
    if chat:
        return _conversation(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return head + tail, [IGNORE] * len(head) + tail


def _conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation: each assistant turn is what the template adds after the
    conversation so far (with the generation prompt), as ``adapterkit train --task chat`` encodes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterError("chat examples need a tokenizer with a chat template; or pass chat=False")
    ids: list[int] = []
    labels: list[int] = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], prompt=True)
        full = _render(tokenizer, messages[: k + 1], prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise AdapterError("the chat template does not render this conversation turn by turn")
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    return ids, labels


def _render(tokenizer, messages: list[dict[str, str]], prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (no dropout: every candidate is scored on the same function), restored after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextlib.contextmanager
def _numpy_random_kept() -> Iterator[None]:
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


__all__ = ["ComposeConfig", "ComposeResult", "compose", "encode", "encode_batch", "mean_loss"]
