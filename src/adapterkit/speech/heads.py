"""Task heads for speech encoders: CTC characters, utterance classes, speaker embeddings.

Each head reads the encoder's frames ``(B, T, H)`` and a frame mask ``(B, T)`` (True = valid;
:func:`frame_mask` derives it from the model and the sample-level attention mask, counting a
P-adapter's pseudo-frames).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.errors import ConfigError


def frame_mask(model: nn.Module, frames: int, attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``(B, T)`` bool: which encoder frames are real (all, without an attention mask)."""
    if attention_mask is None:
        return torch.ones(batch, frames, dtype=torch.bool)
    lengths = model._get_feat_extract_output_lengths(attention_mask.sum(-1))
    return torch.arange(frames, device=attention_mask.device)[None] < lengths[:, None]


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H), (B, T) -> (B, H)``."""
    weights = mask.to(h.dtype).unsqueeze(-1)
    return (h * weights).sum(1) / weights.sum(1).clamp(min=1)


class CTCHead(nn.Module):
    """Characters of ``alphabet`` plus a blank (index 0): ``(B, T, H) -> (B, T, V + 1)`` log-probs."""

    def __init__(self, hidden: int, alphabet: str) -> None:
        super().__init__()
        if len(set(alphabet)) != len(alphabet):
            raise ConfigError("the CTC alphabet has repeated characters")
        self.alphabet = alphabet
        self.index = {c: i + 1 for i, c in enumerate(alphabet)}
        self.proj = nn.Linear(hidden, len(alphabet) + 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).log_softmax(-1)

    def loss(self, h: torch.Tensor, mask: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """CTC loss (mean over the batch of per-utterance loss / target length)."""
        unknown = sorted({c for t in texts for c in t} - set(self.alphabet))
        if unknown:
            raise ConfigError(f"characters {unknown} are not in the CTC alphabet {self.alphabet!r}")
        targets = torch.tensor([self.index[c] for t in texts for c in t], dtype=torch.long)
        target_lengths = torch.tensor([len(t) for t in texts])
        log_probs = self(h).transpose(0, 1).float()  # (T, B, V + 1)
        return F.ctc_loss(log_probs, targets, mask.sum(1), target_lengths, blank=0, zero_infinity=True)

    @torch.no_grad()
    def decode(self, h: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Greedy decoding: the best symbol per frame, repeats merged, blanks dropped."""
        best = self(h).argmax(-1)
        texts = []
        for row, valid in zip(best, mask, strict=True):
            path = row[valid].tolist()
            merged = [s for i, s in enumerate(path) if s != 0 and (i == 0 or s != path[i - 1])]
            texts.append("".join(self.alphabet[s - 1] for s in merged))
        return texts


class UtteranceHead(nn.Module):
    """Frame LayerNorm, then utterance classes from pooled frames: ``"mean"`` or ``"attentive"`` (a learned
    softmax over frames)."""

    def __init__(self, hidden: int, classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "attentive"):
            raise ConfigError(f"pooling must be 'mean' or 'attentive', not {pooling!r}")
        self.attention = (
            nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            if pooling == "attentive"
            else None
        )
        self.classifier = nn.Linear(hidden, classes)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.attention is None:
            return masked_mean(h, mask)
        scores = self.attention(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        return (torch.softmax(scores, dim=1).unsqueeze(-1) * h).sum(1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, H), (B, T) -> (B, classes)`` logits."""
        # normalised frames, as in SpeakerHead: an L-adapter's mix of un-normalised layers has a few huge
        # dimensions that saturate the attention's tanh and swamp the classifier
        return self.classifier(self.pool(F.layer_norm(h, h.shape[-1:]), mask))


class SpeakerHead(nn.Module):
    """Frame LayerNorm, statistics pooling (mean, std) + Linear: a speaker embedding, trained with
    additive-margin softmax.

    AM-softmax (Wang et al. 2018): ``logits = scale * (cos(e, w_k) - margin * [k = y])``.
    """

    def __init__(self, hidden: int, speakers: int, dim: int = 128, margin: float = 0.2, scale: float = 30.0) -> None:
        super().__init__()
        self.embedding = nn.Linear(2 * hidden, dim)
        self.classes = nn.Parameter(torch.randn(speakers, dim) * 0.01)
        self.margin, self.scale = margin, scale

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, H), (B, T) -> (B, dim)`` embeddings."""
        # Frames are normalised first: an L-adapter's mix of un-normalised layers has a few huge
        # dimensions that would otherwise dominate the statistics (Whisper tiny, speakers: EER 43% -> 31%).
        h = F.layer_norm(h, h.shape[-1:])
        mean = masked_mean(h, mask)
        var = masked_mean((h - mean.unsqueeze(1)) ** 2, mask)
        return self.embedding(torch.cat([mean, var.clamp(min=1e-6).sqrt()], dim=-1))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.normalize(embeddings, dim=-1) @ F.normalize(self.classes, dim=-1).T
        if labels is not None:
            cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return self.scale * cosine

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)


def cosine_scores(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Trial scores: the cosine of each pair of embeddings ``(N, D), (N, D) -> (N,)``."""
    return F.cosine_similarity(first, second, dim=-1)
