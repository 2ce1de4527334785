"""Prompt tuning (Lester et al. 2021): P trainable vectors prepended to the input sequence.

Three hooks per adapter, placed by the architecture table:

* on the backbone, before its forward: decide whether this call inserts the prompt (not on a
  generation step whose KV cache already holds it), extend ``attention_mask`` by P ones and, for
  decoders, shift ``position_ids`` by P;
* on ``prompt_after`` (encoders: the embedding module, *after* position embeddings and LayerNorm,
  as AdapterHub; decoders: the token embedding, as peft): prepend the prompt;
* on ``prompt_strip`` (the encoder stack / the final norm): remove the P positions again, so
  heads see the original sequence (BERT's pooler still reads [CLS]) and outputs keep their shape.

Init (``init``): ``"random"`` uniform(-0.5, 0.5) (AdapterHub), ``"text"`` the embedding-module
output for ``init_token_ids`` (see :meth:`PromptConfig.from_text`), ``"vocab"`` that of tokens
sampled from the vocabulary.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.adapterhub_spec import HubFormat
from adapterkit.core.arch import ArchSpec, model_type, spec_for
from adapterkit.core.backbone import base_prefix
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.hosts import gather_rows, hidden, with_hidden
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, call_arguments, check, param_dtype, share
from adapterkit.core.peft_spec import PeftFormat, prompt_fields
from adapterkit.core.state import Relay
from adapterkit.errors import ConfigError

_WHY = "a prompt changes the sequence length; use Stack, or PerRow/BatchSplit/Parallel of adapter names"


class _PromptPart(AdapterModule):
    blocks = frozenset({"rows"})
    chunked_prompts = False
    why_not = _WHY

    def row_key(self):
        return type(self)


def _lengths(modules: list, index: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The longest prompt, and each row's prompt length (0: none)."""
    sizes = [m.prompt.shape[0] if hasattr(m, "prompt") else m.prompt_embedding.shape[0] for m in modules]
    return max(sizes), gather_rows(sizes, index)


class PromptCall(_PromptPart):
    """On the backbone: extend the mask (and positions) for the P prompt positions.

    ``PerRow``: every row gets P = the longest prompt's positions; a row's own prompt sits in
    the last of them and the rest are masked out (and positioned as if absent), so each row
    computes what it computes alone.
    """

    edits_inputs = True

    def __init__(self, prompt: nn.Parameter, flag: Relay, shift_positions: bool, patches: PatchCount | None) -> None:
        super().__init__()
        share(self, "prompt", prompt, owner=False)
        self.flag, self.shift_positions, self.patches = flag, shift_positions, patches

    def adapt_inputs(self, host, args, kwargs):
        bound = call_arguments(host, args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        insert = cache is None or cache.get_seq_length() == 0
        self.flag.put(insert)
        length = self.prompt.shape[0]
        mask = bound.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            bound["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
        positions = bound.get("position_ids")
        if self.shift_positions and positions is not None:
            front = torch.arange(length, device=positions.device).expand(positions.shape[0], -1)
            bound["position_ids"] = torch.cat([front, positions + length], 1) if insert else positions + length
        return (), bound

    @staticmethod
    def adapt_inputs_rows(host, args, kwargs, modules: list[PromptCall], index: torch.Tensor):
        bound = call_arguments(host, args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        insert = past == 0
        for m in modules:
            m.flag.put(insert)
        batch, new = _sequence(host, bound, modules[0].patches)
        length, mine = _lengths(modules, index)
        mask = bound.get("attention_mask")
        front = torch.arange(length, device=index.device)[None] >= (length - mine)[:, None]  # (B, P)
        if mask is None:
            mask = torch.ones(batch, past - (0 if insert else length) + new, dtype=torch.long, device=index.device)
        mask = torch.cat([front.to(mask.dtype), mask], dim=1)
        bound["attention_mask"] = mask if _takes_mask(host) else _additive(mask, modules[0].prompt.dtype)
        if modules[0].shift_positions:
            positions = bound.get("position_ids")
            if positions is None:
                start = 0 if insert else past - length
                positions = torch.arange(start, start + new, device=index.device)[None]
            positions = positions + mine[:, None]
            if insert:
                own = (torch.arange(length, device=index.device)[None] - (length - mine)[:, None]).clamp(min=0)
                positions = torch.cat([own, positions], dim=1)
            bound["position_ids"] = positions
        return (), bound


@dataclasses.dataclass(frozen=True)
class PatchCount:
    """The positions of an image's embedding: its patch grid plus the tokens before it ([CLS]; none in SigLIP)."""

    patch: int
    extra: int

    def __call__(self, pixels: torch.Tensor) -> int:
        return (pixels.shape[-2] // self.patch) * (pixels.shape[-1] // self.patch) + self.extra


def _sequence(host: nn.Module, bound: dict, patches: PatchCount | None) -> tuple[int, int]:
    """``(batch, positions)`` of this call's input sequence, tokens or image patches."""
    tokens = next((bound[k] for k in ("input_ids", "inputs_embeds") if bound.get(k) is not None), None)
    if tokens is not None:
        return tokens.shape[0], tokens.shape[1]
    pixels = bound.get("pixel_values")
    if pixels is None or patches is None:
        raise ConfigError(
            f"{type(host).__name__} takes no tokens or images, so one row's prompt cannot be hidden from another; "
            "run rows with different prompts in separate batches"
        )
    return pixels.shape[0], patches(pixels)


def _takes_mask(host: nn.Module) -> bool:
    return "attention_mask" in inspect.signature(type(host).forward).parameters


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, T) 0/1 mask as the (B, 1, 1, T) additive mask that attention layers take as is: for vision towers
    whose forward has no ``attention_mask`` (CLIP, SigLIP) but passes its keyword arguments down to them."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)[
        :, None, None
    ]


class PromptInsert(_PromptPart):
    """On the embedding module: ``(B, T, H) -> (B, P + T, H)`` with ``prompt_embedding`` (P, H)."""

    def __init__(self, prompt: nn.Parameter, flag: Relay) -> None:
        super().__init__()
        self.prompt_embedding = prompt
        self.flag = flag

    def vectors(self) -> torch.Tensor:
        """The ``(P, H)`` vectors inserted: the prompt itself (P-tuning: its encoder's output)."""
        return self.prompt_embedding

    def adapt(self, host, x, out):
        if not self.flag.get(True):
            return out
        prompt = self.vectors().to(out.dtype).expand(out.shape[0], -1, -1)
        return torch.cat([prompt, out], dim=1)

    @staticmethod
    def adapt_rows(host, x, out, modules: list[PromptInsert], index: torch.Tensor):
        if not modules[0].flag.get(True):
            return out
        length, _ = _lengths(modules, index)
        vectors = [m.vectors() for m in modules]
        prompts = gather_rows([F.pad(v, (0, 0, length - v.shape[0], 0)) for v in vectors], index)
        return torch.cat([prompts.to(out.dtype), out], dim=1)  # (B, P + T, H), prompts right-aligned


class PromptStrip(_PromptPart):
    """On the last module of the stack: drop the P prompt positions again."""

    def __init__(self, prompt: nn.Parameter, flag: Relay) -> None:
        super().__init__()
        share(self, "prompt", prompt, owner=False)
        self.flag = flag

    def adapt(self, host, x, out):
        if not self.flag.get(True):
            return out
        return self.strip(out, self.prompt.shape[0])

    @staticmethod
    def adapt_rows(host, x, out, modules: list[PromptStrip], index: torch.Tensor):
        if not modules[0].flag.get(True):
            return out
        return PromptStrip.strip(out, _lengths(modules, index)[0])

    @staticmethod
    def strip(out, length: int):
        """The output without its first ``length`` positions (a ModelOutput's ``hidden_states`` too)."""
        out = with_hidden(out, hidden(out)[:, length:])
        if not isinstance(out, (torch.Tensor, tuple)) and out.get("hidden_states") is not None:
            out["hidden_states"] = tuple(h[:, length:] for h in out["hidden_states"])
        return out


def peft_placement(model: nn.Module) -> None:
    """peft puts prompts before the position embeddings, adapterkit after them on encoders (AdapterHub's
    placement): the two agree on decoders only."""
    if not spec_for(model).prompt_before_positions:
        raise unsupported(
            CONFIG_FILE,
            "peft_type",
            "PROMPT_TUNING",
            f"on an encoder ({model_type(model)}) peft puts prompts before the position embeddings, adapterkit "
            "after them (AdapterHub's placement); peft prompt files load into decoders (GPT-2, Llama)",
        )


def _from_peft(data: dict, model: nn.Module) -> PromptConfig:
    peft_placement(model)
    return PromptConfig(prompt_length=data["num_virtual_tokens"])


def _peft_fields(config: PromptConfig, model: nn.Module, found: list[Entry]) -> dict:
    peft_placement(model)
    return {"prompt_tuning_init": "RANDOM", **prompt_fields(model, config.prompt_length)}


_HUB_PROMPT = {"architecture": "prompt_tuning", "prompt_length": 10, "prompt_init": "random_uniform"}
_HUB_PROMPT.update(prompt_init_text=None, combine="prefix", init_weights_seed=None)


def hub_placement(model: nn.Module) -> None:
    """AdapterHub has prompts on encoders only (after their position embeddings, as adapterkit)."""
    if spec_for(model).prompt_before_positions:
        raise unsupported(
            CONFIG_FILE, "architecture", "prompt_tuning", f"AdapterHub has no prompts on {model_type(model)}"
        )


def _from_hub(config: dict, model: nn.Module) -> PromptConfig:
    if config.get("combine", "prefix") != "prefix":
        raise unsupported(CONFIG_FILE, "combine", config["combine"])
    hub_placement(model)
    return PromptConfig(prompt_length=config["prompt_length"])


def _hub_fields(config: PromptConfig, model: nn.Module, found: list[Entry]) -> dict:
    hub_placement(model)
    return {**_HUB_PROMPT, "prompt_length": config.prompt_length}


def _hub_key(model: nn.Module, entry: Entry, peer: str) -> str:
    return f"prompt_tuning.prompt_tunings.{peer}.prompt_embedding.weight"


@dataclasses.dataclass(frozen=True)
class PromptConfig(AdapterConfig):
    """Prompt tuning config (AdapterHub's ``prompt_length`` default of 10)."""

    method = "prompt"
    peft = PeftFormat(
        "PROMPT_TUNING",
        _from_peft,
        _peft_fields,
        shared={"prompt_embedding": "prompt_embeddings"},
        task_type="FEATURE_EXTRACTION",
    )
    adapterhub = HubFormat("prompt_tuning", _from_hub, _hub_fields, _hub_key, presets={"prompt_tuning": _HUB_PROMPT})
    prompt_length: int = 10
    init: str = "random"
    init_token_ids: tuple[int, ...] | None = None

    @classmethod
    def from_text(cls, tokenizer, text: str, prompt_length: int = 10) -> PromptConfig:
        """Init from ``text``'s tokens, repeated or cut to ``prompt_length``."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        check(bool(ids), f"init text {text!r} has no tokens")
        return cls(prompt_length, "text", (ids * prompt_length)[:prompt_length])

    def validate(self) -> None:
        check(self.prompt_length > 0, f"prompt_length must be > 0, got {self.prompt_length}")
        check(self.init in ("random", "text", "vocab"), f"init must be random, text or vocab, not {self.init!r}")
        check(
            self.init != "text" or bool(self.init_token_ids),
            "init='text' needs init_token_ids (PromptConfig.from_text)",
        )

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, AdapterModule]]:
        spec = spec_for(model, arch)
        check(
            spec.prompt_after is not None,
            f"prompt tuning prepends vectors to a token sequence, which {type(model).__name__} does not have; "
            "for speech models use prefix tuning",
        )
        prefix = base_prefix(model)
        after = model.get_submodule(prefix + spec.prompt_after)
        prompt = nn.Parameter(self._init(model, after))
        flag = Relay()  # whether this forward inserts the prompt (not a generation step)
        backbone = prefix[:-1] if prefix else ""
        patches = _patch_count(model, after)
        return [
            (backbone, PromptCall(prompt, flag, spec.prompt_before_positions, patches)),
            (prefix + spec.prompt_after, self.insert(prompt, flag)),
            (prefix + spec.prompt_strip, PromptStrip(prompt, flag)),
        ]

    def insert(self, prompt: nn.Parameter, flag: Relay) -> PromptInsert:
        """The module that puts the prompt's vectors in front of the token embeddings."""
        return PromptInsert(prompt, flag)

    @torch.no_grad()
    def _init(self, model: nn.Module, after: nn.Module) -> torch.Tensor:
        dtype = param_dtype(after)
        if self.init == "random":
            dim = getattr(model.config, "embedding_size", None) or model.config.hidden_size  # ELECTRA: 128
            return torch.empty(self.prompt_length, dim, dtype=dtype).uniform_(-0.5, 0.5)
        if self.init == "text":
            ids = torch.tensor([self.init_token_ids])
        else:
            ids = torch.randint(0, model.config.vocab_size, (1, self.prompt_length))
        training = after.training
        after.eval()  # no dropout in the init; .forward skips other adapters' hooks
        embedded = after.forward(ids)[0].to(dtype).clone()
        after.train(training)
        return embedded


@torch.no_grad()
def _patch_count(model: nn.Module, after: nn.Module) -> PatchCount | None:
    """For an image model, how many positions its embedding module gives an image (found by running it once on
    a blank image of the configured size); None for other models."""
    config = model.config
    if getattr(model, "main_input_name", None) != "pixel_values" or not hasattr(config, "patch_size"):
        return None
    size, patch = config.image_size, config.patch_size
    blank = torch.zeros(1, getattr(config, "num_channels", 3), size, size, dtype=param_dtype(after))
    training = after.training
    after.eval()
    out = after.forward(blank)  # .forward: no hooks, so no adapter
    after.train(training)
    out = out[0] if isinstance(out, tuple) else out
    return PatchCount(patch, out.shape[1] - (size // patch) ** 2)
