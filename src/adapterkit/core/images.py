"""Images in an LLM's conversations: a frozen vision encoder, image parts in messages, and the image features
fed to the projector (:mod:`adapterkit.core.methods.image`) at the positions the images take.

An image becomes ``tokens`` copies of one reserved token of the LLM's tokenizer (:func:`image_token`) in the
text (LLaVA's ``<image>`` expanded); the prompt is tokenized as usual, and during the forward the projector
replaces those positions' embeddings with the projected patch features, in order. So masks, positions, the
KV cache and per-row batching see an ordinary token sequence.

A message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image",
"image": ...}`` (a Pillow image, or an image file's bytes) or OpenAI's ``{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}``. Image bytes are input from outside: they are decoded by Pillow from a
short list of formats under its decompression-bomb limit (:func:`open_image`); a remote URL is refused,
nothing is fetched.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.errors import AdapterError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # what Pillow may try to decode
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")


class ImageError(AdapterError):
    """An image that cannot be used: undecodable, too large, a remote URL, or images and image tokens that
    do not match."""


def open_image(data: bytes, max_pixels: int | None = None):
    """Decode ``data`` (a whole image file) to RGB; ``ValueError`` for anything Pillow will not decode safely:
    an unknown or truncated file, or more pixels than ``max_pixels`` or ``PIL.Image.MAX_IMAGE_PIXELS`` (a
    decompression bomb), checked from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise Image.DecompressionBombError(f"{width} x {height} pixels; at most {max_pixels} are taken")
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"refused: {e}") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"not an image in a known format ({', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, EOFError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"a damaged image file ({e})") from e


def data_url_bytes(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL; :class:`ImageError` for any other URL."""
    head, comma, payload = url.partition(",")
    if not url.startswith("data:"):
        raise ImageError("only data: URLs are accepted (data:image/png;base64,...): images are never fetched")
    kind = head.removeprefix("data:").split(";")
    if not comma or kind[-1] != "base64" or kind[0] not in DATA_URL_TYPES:
        raise ImageError(f"expected data:<{'|'.join(DATA_URL_TYPES)}>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL is not valid base64 ({e})") from None


def part_image(part: dict[str, Any], max_pixels: int | None = None):
    """The RGB Pillow image of one ``image`` or ``image_url`` content part."""
    from PIL import Image

    value = part.get("image") if part.get("type") == "image" else (part.get("image_url") or {}).get("url")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str):
        value = data_url_bytes(value)
    if not isinstance(value, (bytes, bytearray)):
        raise ImageError(f"an {part.get('type')} part holds {type(value).__name__}, not an image or its bytes")
    try:
        return open_image(bytes(value), max_pixels)
    except ValueError as e:
        raise ImageError(f"image: {e}") from None


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def has_images(messages: Any) -> bool:
    """Whether a conversation (a list of messages) holds an image part."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(map(is_image_part, m["content"]))
        for m in messages
    )


def flatten(
    messages: Sequence[dict[str, Any]], placeholder: str, max_pixels: int | None = None
) -> tuple[list[dict[str, str]], list]:
    """The conversation with string contents, each image part replaced by ``placeholder``, and its images in
    order (RGB Pillow images of at most ``max_pixels``)."""
    out, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            texts = []
            for part in content:
                if is_image_part(part):
                    images.append(part_image(part, max_pixels))
                    texts.append(placeholder)
                elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise ImageError(f"a content part must be text, image or image_url, not {part!r:.80}")
            content = "".join(texts)
        out.append({**message, "content": content})
    return out, images


def image_token(tokenizer) -> int:
    """A reserved token for image positions: the last added special token that is not the tokenizer's
    beginning, end, padding or unknown token and that its chat template does not use (SmolLM2:
    ``<empty_output>``)."""
    taken = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = getattr(tokenizer, "chat_template", None) or ""
    for token_id, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items(), reverse=True):
        if token.special and token_id not in taken and token.content not in template:
            return token_id
    raise ImageError("the tokenizer has no spare special token for images; add one (tokenizer.add_special_tokens)")


class ImageEncoder:
    """A frozen vision tower and its image processor: images -> ``(N, tokens, width)`` patch features (the
    last hidden state without [CLS] or register tokens, average-pooled ``pool x pool``)."""

    def __init__(self, model: nn.Module, processor: Any, size: int, pool: int) -> None:
        self.model, self.processor, self.size, self.pool = model.eval().requires_grad_(False), processor, size, pool
        self.patch = int(model.config.patch_size)
        if size % (self.patch * pool):
            raise ImageError(f"image_size {size} must be a multiple of patch {self.patch} x pool {pool}")
        self.grid = size // self.patch // pool

    @classmethod
    def load(cls, path: str, size: int, pool: int) -> ImageEncoder:
        """The vision model (``AutoModel``) and its image processor from folder (or Hub id) ``path``."""
        from transformers import AutoImageProcessor, AutoModel

        from adapterkit.core.pretrained import from_pretrained

        return cls(from_pretrained(AutoModel, path), from_pretrained(AutoImageProcessor, path), size, pool)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any], batch: int = 64) -> torch.Tensor:
        """``(len(images), tokens, width)`` float32 features of RGB Pillow images."""
        out = [self._features(images[i : i + batch]) for i in range(0, len(images), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.tokens, self.width)

    def _features(self, images: Sequence[Any]) -> torch.Tensor:
        size = {"height": self.size, "width": self.size}
        kwargs = {"do_center_crop": False} if hasattr(self.processor, "do_center_crop") else {}
        pixels = self.processor(list(images), size=size, return_tensors="pt", **kwargs)["pixel_values"]
        device = next(self.model.parameters()).device
        states = self.model(pixel_values=pixels.to(device)).last_hidden_state.float()  # (N, extra + G*G, W)
        side = self.size // self.patch
        patches = states[:, states.shape[1] - side * side :]  # drop [CLS] and registers
        grid = patches.transpose(1, 2).reshape(len(images), -1, side, side)
        pooled = nn.functional.avg_pool2d(grid, self.pool) if self.pool > 1 else grid  # (N, W, g, g)
        return pooled.flatten(2).transpose(1, 2).cpu()  # (N, g*g, W), rows first


@functools.lru_cache(maxsize=4)
def encoder(path: str, size: int, pool: int) -> ImageEncoder:
    """The encoder an image adapter names, loaded once per process."""
    return ImageEncoder.load(path, size, pool)


class _Feed(threading.local):
    queue: list[torch.Tensor] | None = None  # the features not yet taken: one (rows, width) tensor


_FEED = _Feed()


@contextlib.contextmanager
def feeding(features: torch.Tensor, whole: bool = True) -> Iterator[None]:
    """Inside the block the projector takes ``features`` (``(images, tokens, width)`` or ``(rows, width)``) for
    the image positions of the forwards, row-major, in order. ``whole``: each must be taken by the end (else
    the prompt held fewer image positions than its images, or no active adapter takes images)."""
    prior, _FEED.queue = _FEED.queue, [features.reshape(-1, features.shape[-1])]
    try:
        yield
        left = len(_FEED.queue[0])
        if whole and left:
            raise ImageError(
                f"{left} image feature rows were not used: the prompt holds fewer image positions than its images "
                "need, or no active adapter takes images (activate the image adapter)"
            )
    finally:
        _FEED.queue = prior


def take(rows: int) -> torch.Tensor | None:
    """The next ``rows`` fed feature rows (None where nothing is fed: image tokens stay plain tokens)."""
    if _FEED.queue is None:
        return None
    queue = _FEED.queue[0]
    if rows > len(queue):
        raise ImageError(
            f"the input holds {rows} image positions but only {len(queue)} image feature rows are left: write "
            "the image token only where images are (it is reserved), one image part per image"
        )
    _FEED.queue[0] = queue[rows:]
    return queue[:rows]
