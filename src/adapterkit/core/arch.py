"""Architectures as data: where adapters go in each supported ``model_type``.

A new architecture is one :class:`ArchSpec` row in :data:`ARCHITECTURES` (or a call to
:func:`register_architecture`) plus one row in the tiny-config test table. No ``forward`` is ever
copied: adapters attach through forward hooks on the modules named here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch
from torch import nn

from adapterkit.errors import ArchitectureError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Module paths of one Transformer architecture.

    ``layers`` is a regex for the name of each Transformer block (matched at the end of the full
    module name, so it works with and without a task head). The other paths are relative to a
    block. ``attn_norm`` / ``ffn_norm`` name the LayerNorm that follows each residual add in
    post-LN models (BERT); they are ``None`` for pre-LN models (GPT-2, Llama, ViT), whose block
    output is the residual stream itself.
    """

    layers: str
    attn_in: str  # input = the attention sub-layer's input; contains or runs before attn_out
    attn_out: str  # attention output projection
    ffn_in: str  # input = the feed-forward sub-layer's input; contains or runs before ffn_out
    ffn_out: str  # feed-forward output projection
    attn_norm: str | None
    ffn_norm: str | None
    lora_targets: tuple[str, ...]  # module-name suffixes, like peft's target_modules
    kv: tuple[str, ...] = ()  # key and value projections (one fused module for GPT-2)
    ffn_hidden: str = ""  # the feed-forward's first projection (its output is the hidden layer)
    # Prompt tuning, paths relative to the backbone: the prompt is prepended to the output of
    # prompt_after and removed from the output of prompt_strip; prompt_before_positions says
    # that prompt_after runs before positions are assigned (decoders: the token embedding).
    prompt_after: str | None = "embeddings"  # None: no token sequence to prepend to (speech)
    prompt_strip: str = "encoder"  # also the module whose output the L-adapter replaces
    prompt_before_positions: bool = False
    # The attention passes its projections' weights to F.multi_head_attention_forward (WavLM):
    # adapterkit routes them through the modules (adapterkit.core.mha).
    functional_attention: bool = False
    # Speech: the convolutional feature extractor, relative to the backbone (the P-adapter's host).
    features: str | None = None

    @property
    def post_ln(self) -> bool:
        return self.ffn_norm is not None


_BERT = ArchSpec(
    layers=r"encoder\.layer\.\d+",
    attn_in="attention.self",
    attn_out="attention.output.dense",
    ffn_in="intermediate",
    ffn_out="output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_norm="output.LayerNorm",
    lora_targets=("query", "value"),
    kv=("attention.self.key", "attention.self.value"),
    ffn_hidden="intermediate.dense",
)
_LLAMA = ArchSpec(
    layers=r"layers\.\d+",
    attn_in="self_attn",
    attn_out="self_attn.o_proj",
    ffn_in="mlp",
    ffn_out="mlp.down_proj",
    attn_norm=None,
    ffn_norm=None,
    lora_targets=("q_proj", "v_proj"),
    kv=("self_attn.k_proj", "self_attn.v_proj"),
    ffn_hidden="mlp.up_proj",
    prompt_after="embed_tokens",
    prompt_strip="norm",
    prompt_before_positions=True,
)

# Speech encoders: wav2vec 2.0's layer is post-LN; "stable layer norm" checkpoints (large models)
# use the same module names in a pre-LN layer, so they get their own row (model_type + "-stable").
_WAV2VEC2 = ArchSpec(
    layers=r"encoder\.layers\.\d+",
    attn_in="attention",
    attn_out="attention.out_proj",
    ffn_in="feed_forward",
    ffn_out="feed_forward.output_dense",
    attn_norm="layer_norm",
    ffn_norm="final_layer_norm",
    lora_targets=("q_proj", "v_proj"),
    kv=("attention.k_proj", "attention.v_proj"),
    ffn_hidden="feed_forward.intermediate_dense",
    prompt_after=None,
    features="feature_extractor",
)
_WAV2VEC2_STABLE = dataclasses.replace(_WAV2VEC2, attn_norm=None, ffn_norm=None)

# Whisper's encoder layers (a WhisperModel's decoder layers are left out).
_WHISPER = ArchSpec(
    layers=r"(?<!decoder\.)layers\.\d+",
    attn_in="self_attn",
    attn_out="self_attn.out_proj",
    ffn_in="fc1",
    ffn_out="fc2",
    attn_norm=None,
    ffn_norm=None,
    lora_targets=("q_proj", "v_proj"),
    kv=("self_attn.k_proj", "self_attn.v_proj"),
    ffn_hidden="fc1",
    prompt_after=None,
    prompt_strip="",  # the encoder's output is the backbone's own
)
# Whisper for speech recognition: the encoder's and the decoder's layers (their attention, feed-forward
# and LoRA targets share names; the decoder's cross-attention q/v projections are LoRA targets too).
WHISPER_SEQ2SEQ = dataclasses.replace(_WHISPER, layers=r"layers\.\d+")

# DINOv2: BERT's paths with transformers 5's attention names; pre-LN, each branch scaled by a LayerScale
# after its output projection (so adapters on attn_out / ffn_out sit before the scale).
_DINOV2 = ArchSpec(
    layers=r"encoder\.layer\.\d+",
    attn_in="attention",
    attn_out="attention.o_proj",
    ffn_in="mlp",
    ffn_out="mlp.fc2",
    attn_norm=None,
    ffn_norm=None,
    lora_targets=("q_proj", "v_proj"),
    kv=("attention.k_proj", "attention.v_proj"),
    ffn_hidden="mlp.fc1",
)
# CLIP's and SigLIP's towers share one pre-LN layer (CLIPEncoderLayer / SiglipEncoderLayer). A prompt goes
# after the embeddings (patch + position embeddings, or token + position embeddings): "patch tokens" for the
# vision towers, and before CLIP's pre-LayerNorm; the encoder's output loses it again, so CLIP's [CLS] pooling,
# the text towers' EOS / last-token pooling and SigLIP's attention-pooling head see the original sequence.
_CLIP = ArchSpec(
    layers=r"encoder\.layers\.\d+",
    attn_in="self_attn",
    attn_out="self_attn.out_proj",
    ffn_in="mlp",
    ffn_out="mlp.fc2",
    attn_norm=None,
    ffn_norm=None,
    lora_targets=("q_proj", "v_proj"),
    kv=("self_attn.k_proj", "self_attn.v_proj"),
    ffn_hidden="mlp.fc1",
)


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": ArchSpec(
        layers=r"transformer\.layer\.\d+",
        attn_in="attention",
        attn_out="attention.out_lin",
        ffn_in="ffn",
        ffn_out="ffn.lin2",
        attn_norm="sa_layer_norm",
        ffn_norm="output_layer_norm",
        lora_targets=("q_lin", "v_lin"),
        kv=("attention.k_lin", "attention.v_lin"),
        ffn_hidden="ffn.lin1",
        prompt_strip="transformer",
    ),
    "gpt2": ArchSpec(
        layers=r"h\.\d+",
        attn_in="attn",
        attn_out="attn.c_proj",
        ffn_in="mlp",
        ffn_out="mlp.c_proj",
        attn_norm=None,
        ffn_norm=None,
        lora_targets=("c_attn",),
        kv=("attn.c_attn",),
        ffn_hidden="mlp.c_fc",
        prompt_after="wte",
        prompt_strip="ln_f",
        prompt_before_positions=True,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "vit": ArchSpec(
        layers=r"layers\.\d+",
        attn_in="attention",
        attn_out="attention.o_proj",
        ffn_in="mlp",
        ffn_out="mlp.fc2",
        attn_norm=None,
        ffn_norm=None,
        lora_targets=("q_proj", "v_proj"),
        kv=("attention.k_proj", "attention.v_proj"),
        ffn_hidden="mlp.fc1",
        prompt_strip="layernorm",
    ),
    "dinov2": _DINOV2,
    "clip_vision_model": _CLIP,
    "clip_text_model": _CLIP,
    "siglip_vision_model": _CLIP,
    "siglip_text_model": _CLIP,
    "wav2vec2": _WAV2VEC2,
    "wav2vec2-stable": _WAV2VEC2_STABLE,
    "hubert": _WAV2VEC2,
    "hubert-stable": _WAV2VEC2_STABLE,
    "data2vec-audio": _WAV2VEC2,
    "wavlm": dataclasses.replace(_WAV2VEC2, functional_attention=True),
    "wavlm-stable": dataclasses.replace(_WAV2VEC2_STABLE, functional_attention=True),
    "whisper": _WHISPER,
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add or replace the table row for ``model_type`` (``model.config.model_type``)."""
    ARCHITECTURES[model_type] = spec


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def spec_for(model: nn.Module, override: ArchSpec | None = None) -> ArchSpec:
    """The architecture row for ``model``; ``override`` wins over the table."""
    if override is not None:
        return override
    kind = model_type(model)
    stable = getattr(getattr(model, "config", None), "do_stable_layer_norm", False)
    if stable and f"{kind}-stable" in ARCHITECTURES:
        return ARCHITECTURES[f"{kind}-stable"]
    if kind not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(
            f"architecture {kind!r} is not in adapterkit's table (known: {known}). "
            f"Describe it with ak.register_architecture({kind!r}, ak.ArchSpec(...)) or pass "
            "arch=ak.ArchSpec(...) to add_adapter; for LoRA alone, target_modules=[...] is enough."
        )
    return ARCHITECTURES[kind]


def find_layers(model: nn.Module, spec: ArchSpec) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, block)`` for every Transformer block of ``model``, in order."""
    pattern = re.compile(rf"(?:^|\.){spec.layers}$")
    found = False
    for name, module in model.named_modules():
        if pattern.search(name):
            found = True
            yield name, module
    if not found:
        raise ArchitectureError(
            f"no module of {type(model).__name__} matches the layer pattern {spec.layers!r}; "
            "pass arch=ak.ArchSpec(layers=...) naming its Transformer blocks."
        )


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out), peft's ``fan_in_fan_out``."""
    return type(module).__name__ == "Conv1D"


def out_in(host: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in ``host``'s weight layout seen as (out, in), or an (out, in) tensor in ``host``'s layout:
    transposed for ``Conv1D`` (its own inverse), as is for ``nn.Linear``. A view: writes reach ``host``."""
    return tensor.T if is_conv1d(host) else tensor


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or GPT-2 ``Conv1D`` (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or hasattr(module, "weight"):
        dim = module.weight.shape[-1]
        return dim, dim
    raise ArchitectureError(f"cannot tell the feature size of {type(module).__name__}")
