"""Image projector (LLaVA, Liu et al. 2023, at small scale): a frozen vision encoder's patch features, mapped
by a trainable two-layer MLP into a frozen LLM's embedding space, take the place of an image's tokens.

``W2 gelu(W1 f + b1) + b2`` for each patch feature ``f`` (LLaVA-1.5's projector), written over the token
embedding's output at the positions holding the reserved image token (:mod:`adapterkit.core.images`). One
adapter of any other family on the LLM joins it in a union (``ak.union(ImageConfig(...), LoRAConfig())``),
so the projector and the LLM's adapter train, save, load and go as one adapter. The encoder is named, not
saved: it stays frozen and is loaded from ``encoder`` where the adapter is used.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core import images
from adapterkit.core.arch import ArchSpec
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, param_dtype
from adapterkit.core.state import base_modules


@dataclasses.dataclass(frozen=True)
class ImageConfig(AdapterConfig):
    """A projector from ``encoder``'s features (``features`` wide; ``image_size`` px images, patch features
    pooled ``pool x pool``) to the LLM's embeddings at the positions of token ``image_token_id``."""

    method = "image"
    encoder: str = ""  # the frozen vision encoder's folder or Hub id
    features: int = 384  # its hidden width (DINOv2-S: 384)
    image_size: int = 112
    patch: int = 14
    pool: int = 2  # 112 px, patch 14: an 8 x 8 grid pooled to 4 x 4, 16 positions an image
    image_token_id: int = -1  # the reserved token (core.images.image_token)
    hidden: int = 0  # the MLP's inner width (0: the LLM's)

    def validate(self) -> None:
        check(bool(self.encoder), "an image adapter names its vision encoder (encoder=<folder or Hub id>)")
        check(self.features > 0 and self.hidden >= 0, "features must be > 0 and hidden >= 0")
        check(self.patch > 0 and self.pool > 0, "patch and pool must be > 0")
        check(self.image_size % (self.patch * self.pool) == 0, "image_size must be a multiple of patch x pool")
        check(self.image_token_id >= 0, "image_token_id must name the tokenizer's reserved image token")

    @property
    def tokens(self) -> int:
        """Positions one image takes in the prompt."""
        return (self.image_size // self.patch // self.pool) ** 2

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        embedding = model.get_input_embeddings()
        name = next((n for n, m in base_modules(model) if m is embedding), None)
        check(name is not None, f"{type(model).__name__} has no input embedding for image positions")
        check(self.image_token_id < embedding.num_embeddings, "image_token_id is beyond the vocabulary")
        width = embedding.embedding_dim
        projector = ImageProjector(self.features, self.hidden or width, width, self.image_token_id)
        return [(name, projector.to(param_dtype(embedding)))]


class ImageProjector(AdapterModule):
    """On the token embedding: ``(B, T, H)`` with the image positions' rows projected from fed features."""

    blocks = frozenset({"rows"})
    why_not = "an image projector writes the image positions; run it alone, in a Stack or per row"

    def __init__(self, features: int, hidden: int, width: int, token_id: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.token_id = token_id

    def row_key(self):
        return (type(self), self.token_id)  # one group reads one token's positions

    def adapt(self, host, x, out):
        where = x == self.token_id  # (B, T)
        features = images.take(int(where.sum()))
        if features is None or not len(features):
            return out
        return out.masked_scatter(where[..., None], self.project(features).to(out.dtype))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, features) -> (N, width)``."""
        return self.projector(features.to(self.projector[0].weight))

    @classmethod
    def adapt_rows(cls, host, x, out, modules: list[ImageProjector], index: torch.Tensor):
        """Each image position through its row's projector (rows without one keep the token's embedding)."""
        where = x == modules[0].token_id
        features = images.take(int(where.sum()))
        if features is None or not len(features):
            return out
        owner = index[where.nonzero()[:, 0]]  # each image position's adapter
        rows = out[where]  # (N, H)
        for k, module in enumerate(modules):
            mine = (owner == k).nonzero().squeeze(1)
            if len(mine):
                rows = rows.index_copy(0, mine, module.project(features[mine]).to(rows.dtype))
        return out.masked_scatter(where[..., None], rows)


def image_part(config: AdapterConfig) -> ImageConfig | None:
    """The image projector's config in ``config`` (itself, or a union's part), else None."""
    parts = getattr(config, "configs", None) or (config,)
    return next((c for c in parts if isinstance(c, ImageConfig)), None)
