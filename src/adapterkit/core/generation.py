"""Text generation with adapters: prompts (plain or through the chat template) left-padded into one
``generate`` call, greedy or sampled, stop strings, and optionally a different adapter per prompt
(a ``PerRow`` block, so one batch serves several tasks)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from adapterkit.core import adapters, images
from adapterkit.core.banks import Bank
from adapterkit.core.composition import PerRow
from adapterkit.core.methods.image import ImageConfig, image_part
from adapterkit.errors import AdapterError

if TYPE_CHECKING:
    from adapterkit.core.routing import Router


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    *,
    chat: bool = True,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    per_prompt: Sequence[str | None] | None = None,
    route: Router | None = None,
    streamer: Any = None,
    vision: images.ImageEncoder | None = None,
) -> list[str]:
    """The completion of each prompt (without the prompt, special tokens or the stop string).

    ``chat``: wrap each prompt as a user message through the tokenizer's chat template; a prompt
    may also be a conversation, a list of ``{"role", "content"}`` messages (always templated).
    ``temperature`` 0 is greedy; above 0, sampling with ``top_p`` (seeded by ``seed``).
    ``per_prompt``: one adapter name (or None: the base model) per prompt, in one batch.
    ``route``: an :class:`~adapterkit.core.routing.Router` that picks ``per_prompt`` from the prompts
    themselves (its ``top_k`` > 1: a weighted ``Average`` of the best adapters per prompt).
    ``streamer``: a transformers streamer (e.g. ``TextStreamer``) fed the tokens as they come (one prompt).
    Images: a user turn's ``content`` may be a list of text and image parts (:mod:`adapterkit.core.images`),
    seen by the active (or per-prompt) image adapter through its encoder (``vision``: an encoder already
    loaded, else the one the adapter names).
    """
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise AdapterError(
            f"need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1 (got {max_tokens}, {temperature}, {top_p})"
        )
    if route is not None:
        if per_prompt is not None:
            raise AdapterError("give per_prompt or route, not both")
        if route.model is not model:  # its scores come from its own model's hidden states
            raise AdapterError("the router was built on another model; build one on this model (ak.Router.build)")
        per_prompt = route.setups(prompts)
    if per_prompt is not None and len(per_prompt) != len(prompts):
        raise AdapterError(f"per_prompt names {len(per_prompt)} adapters for {len(prompts)} prompts")
    device = next(model.parameters()).device  # the prompts go where the model is (a GPU)
    prompts, feed, image_token = _with_images(model, tokenizer, prompts, per_prompt, vision)
    batch = {k: v.to(device) for k, v in _encode(tokenizer, prompts, chat).items()}
    options = {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "pad_token_id": tokenizer.pad_token_id}
    if image_token is not None:  # reserved for images: never generated
        options["suppress_tokens"] = [image_token]
    options["eos_token_id"] = end_tokens(model, tokenizer)
    if temperature > 0:
        options |= {"temperature": temperature, "top_p": top_p}
    if stop:  # checked on the decoded text: works with any tokenizer (transformers' stop_strings does not)
        options["stopping_criteria"] = StoppingCriteriaList([StopStrings(tokenizer, stop, batch["input_ids"].shape[1])])
    if streamer is not None:
        options["streamer"] = streamer
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad(), _setup(model, per_prompt), feed:
        out = model.generate(**batch, **options)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [_cut(text, stop) for text in texts]


class StopStrings(StoppingCriteria):
    """A row is done once its completion (decoded) contains one of ``stops``."""

    def __init__(self, tokenizer, stops: Sequence[str], start: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _with_images(model: nn.Module, tokenizer, prompts: Sequence, per_prompt, vision) -> tuple[list, Any, int | None]:
    """The prompts with each image part replaced by its image positions, the features to feed, and the image
    token (prompts without images: unchanged, nothing fed, None)."""
    if not any(map(images.has_images, prompts)):
        return list(prompts), contextlib.nullcontext(), None
    config = image_adapter(model, per_prompt)
    vision = vision or images.encoder(config.encoder, config.image_size, config.pool)
    if vision.tokens != config.tokens or vision.width != config.features:
        raise images.ImageError(
            f"the encoder gives {vision.tokens} x {vision.width} features an image, not "
            f"the {config.tokens} x {config.features} the image adapter takes"
        )
    placeholder = tokenizer.convert_ids_to_tokens(config.image_token_id) * config.tokens
    flat, pictures = [], []
    for prompt in prompts:
        messages, found = images.flatten(_conversation(prompt), placeholder)
        flat.append(messages)
        pictures += found
    return flat, images.feeding(vision(pictures)), config.image_token_id


def image_adapter(model: nn.Module, per_prompt: Sequence[str | None] | None = None) -> ImageConfig:
    """The image projector's config of the active adapters (or of ``per_prompt``'s): exactly one kind."""
    names = [n for n in per_prompt if isinstance(n, str)] if per_prompt is not None else adapters.active_adapters(model)
    configs = adapters.list_adapters(model)
    found = {image_part(configs[n]) for n in names if n in configs} - {None}
    if len(found) != 1:
        raise images.ImageError(
            "images need one active image adapter (ak.ImageConfig in a union with the LLM's adapter)"
            if not found
            else "the prompts' image adapters differ in encoder or image token; batch them apart"
        )
    return found.pop()


def _encode(tokenizer, prompts: Sequence[str], chat: bool) -> dict[str, torch.Tensor]:
    """Left-padded ids and mask (decoders continue from the last position of every row)."""
    if tokenizer.pad_token_id is None:
        raise AdapterError("the tokenizer has no padding token; set tokenizer.pad_token (e.g. to its eos token)")
    templated = chat or any(not isinstance(p, str) for p in prompts)
    if templated:
        prompts = [
            tokenizer.apply_chat_template(_conversation(p), tokenize=False, add_generation_prompt=True) for p in prompts
        ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not templated))
    finally:
        tokenizer.padding_side = side


def end_tokens(model: nn.Module, tokenizer) -> list[int]:
    """The model's end tokens and the tokenizer's: a chat template ends each turn with the latter."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
    return ends + [tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, *ends) else ends


def _conversation(prompt: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _setup(model: nn.Module, per_prompt: Sequence[str | None] | None):
    """Row ``i`` through ``per_prompt[i]``: its adapters' weights stacked once for the whole generation
    (a :class:`~adapterkit.core.banks.Bank`), each step one gather per site."""
    if per_prompt is None:
        return contextlib.nullcontext()
    names = [n for n in per_prompt if n is not None]
    if not names or not all(isinstance(n, str) for n in names):  # blocks per row: PerRow builds them per call
        return adapters.use(model, PerRow(list(per_prompt)))
    for name in names:
        adapters.known(model, name)
    return Bank(model, names).use(list(per_prompt))


def _cut(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (generate stops after it, and keeps it)."""
    return text[: shown_upto(text, stop, final=True)[0]]


def shown_upto(text: str, stops: Sequence[str], final: bool = False) -> tuple[int, bool]:
    """How much of a growing completion ``text`` may be shown, and whether a stop string ended it: up
    to the first stop string, else all but a tail that could still grow into one (all, once ``final``).
    The one rule for every streamer (the CLI's printer, the server's deltas)."""
    hits = [text.index(s) for s in stops if s in text]
    if hits:
        return min(hits), True
    if final:
        return len(text), False
    keep = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - keep, False
