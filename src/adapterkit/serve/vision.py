"""Images in chat requests (OpenAI's ``image_url`` parts with ``data:`` URLs) for an image adapter.

An image request names an adapter with an image projector (``ak.ImageConfig``). Its images are decoded
with Pillow (:func:`adapterkit.core.images.open_image`: a few formats, the pixel count read from the header
and bounded before any pixel is decoded), turned into features by the adapter's frozen vision encoder in
the engine thread (between steps, as any model call), and the prompt gets the image positions the adapter
reads. The engine then prefills them with the text around them, row by row beside text-only requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from adapterkit.core import images
from adapterkit.core.generation import image_adapter
from adapterkit.errors import shown
from adapterkit.serve.plumbing import ApiError, State

MAX_IMAGES = 8  # image parts in one request
MAX_PIXELS = 4096 * 4096  # pixels of one image, read from its header before it is decoded

Encode = Callable[[State, list[dict[str, str]]], Awaitable[list[int]]]


class Vision:
    """The images of one chat request, prepared for the adapter it runs on."""

    def __init__(self, messages: list[dict[str, Any]], count: int) -> None:
        if count > MAX_IMAGES:
            raise ApiError(400, f"the request holds {count} images; this server takes at most {MAX_IMAGES}",
                           param="messages")  # fmt: skip
        self.messages = messages

    async def prepared(self, s: State, inner: str | None, encode: Encode) -> tuple[list[int], tuple]:
        """The prompt's token ids with the image positions, and ``(features, image token)`` for the engine."""
        if inner is None:
            raise ApiError(400, "the base model takes no images; name an image adapter as the model", param="model")
        config = await self._engine(s, lambda model: image_adapter(model, [inner]))
        with s.tokenizers.borrow() as tokenizer:
            placeholder = tokenizer.convert_ids_to_tokens(config.image_token_id) * config.tokens
        flat, pictures = await self._decoded(placeholder)
        features = await self._engine(  # the encoder is loaded once, in the engine thread
            s, lambda _model: images.encoder(config.encoder, config.image_size, config.pool)(pictures)
        )
        ids = await encode(s, flat)
        if ids.count(config.image_token_id) != len(pictures) * config.tokens:
            raise ApiError(400, "the text holds the token reserved for image positions; remove it", param="messages")
        return ids, (features.reshape(-1, features.shape[-1]).to(torch.float32), config.image_token_id)

    async def _decoded(self, placeholder: str) -> tuple[list[dict[str, str]], list]:
        try:
            return await run_in_threadpool(images.flatten, self.messages, placeholder, MAX_PIXELS)
        except images.ImageError as e:
            raise ApiError(400, shown(str(e))[:300], param="messages", code="invalid_image") from None

    @staticmethod
    async def _engine(s: State, fn: Callable[[Any], Any]) -> Any:
        try:
            return await asyncio.wrap_future(s.engine.call(fn))
        except images.ImageError as e:
            raise ApiError(400, shown(str(e))[:300], param="model", code="invalid_image") from None
