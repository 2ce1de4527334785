"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): prompt tuning whose virtual tokens are the output of
a small trained encoder of the prompt embeddings, peft's ``PromptEncoder``.

``MLP``: ``Linear(H, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, H)``; ``LSTM``: a bidirectional LSTM of
``encoder_num_layers`` then ``Linear(2h, 2h) -> ReLU -> Linear(2h, H)``; ``h`` = ``encoder_hidden_size``
(default: the model's hidden size). Everything else is prompt tuning's (:mod:`.prompt`): where the
vectors go, per-row batching, removal. peft's folders hold the encoder's output (``prompt_embeddings``),
so a saved P-tuning adapter loads back as a plain prompt, in peft as in adapterkit.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.entries import Entry
from adapterkit.core.methods.base import check
from adapterkit.core.methods.prompt import PromptConfig, PromptInsert, peft_placement
from adapterkit.core.peft_spec import PeftFormat, prompt_fields
from adapterkit.core.state import Relay


class PromptEncoder(nn.Module):
    """``(P, H) -> (P, H)``: peft's reparametrisation of the prompt embeddings."""

    def __init__(self, config: PTuningConfig, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.encoder_hidden_size or dim
        self.kind = config.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(
                dim,
                hidden,
                config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            ).to(dtype)
            widths = (2 * hidden, 2 * hidden, dim)
        else:
            widths = (dim, hidden, hidden, dim)
        layers = [nn.Linear(a, b, dtype=dtype) for a, b in zip(widths, widths[1:], strict=False)]
        self.mlp_head = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        if self.kind == "LSTM":
            prompt = self.lstm_head(prompt[None])[0][0]  # one sequence of P positions
        return self.mlp_head(prompt)


class EncodedPromptInsert(PromptInsert):
    """Prompt tuning's insertion, of the encoder's output."""

    def __init__(self, prompt: nn.Parameter, flag: Relay, encoder: PromptEncoder) -> None:
        super().__init__(prompt, flag)
        self.encoder = encoder

    def vectors(self) -> torch.Tensor:
        return self.encoder(self.prompt_embedding)


def _peft_fields(config: PTuningConfig, model: nn.Module, found: list[Entry]) -> dict:
    peft_placement(model)
    return {
        "encoder_reparameterization_type": config.encoder_reparameterization_type,
        "encoder_hidden_size": config.encoder_hidden_size or model.config.hidden_size,
        "encoder_num_layers": config.encoder_num_layers,
        "encoder_dropout": config.encoder_dropout,
        **prompt_fields(model, config.prompt_length),
    }


@dataclasses.dataclass(frozen=True)
class PTuningConfig(PromptConfig):
    """P-tuning config: prompt tuning's fields and peft's ``PromptEncoderConfig`` encoder fields."""

    method = "p_tuning"
    peft = PeftFormat(
        "P_TUNING",
        lambda data, model: PromptConfig.peft.to_config(data, model),  # the file holds the encoder's output
        _peft_fields,
        shared={"prompt_embedding": "prompt_embeddings", "encoder": "prompt_embeddings"},
        tensor=lambda entry: entry.module.vectors(),
        task_type="FEATURE_EXTRACTION",
    )
    adapterhub = None  # AdapterHub has no P-tuning (prompt tuning's record would write the encoder's input)
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        kind = self.encoder_reparameterization_type
        check(kind in ("MLP", "LSTM"), f"encoder_reparameterization_type must be MLP or LSTM, not {kind!r}")
        check(self.encoder_num_layers >= 1 and 0 <= self.encoder_dropout < 1, "bad encoder_num_layers or dropout")

    def insert(self, prompt: nn.Parameter, flag: Relay) -> PromptInsert:
        encoder = PromptEncoder(self, prompt.shape[1], prompt.dtype).to(prompt.device)
        return EncodedPromptInsert(prompt, flag, encoder)
