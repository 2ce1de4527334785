"""Tiny random-config models: one row per supported architecture."""

from pathlib import Path

import pytest
import torch
import transformers as T

T.logging.set_verbosity_error()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where torch sees a CUDA GPU and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    skip = pytest.mark.skip(reason=f"gpu: needs a CUDA GPU, and torch {torch.__version__} ({built}) sees none")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def pytest_report_header(config):
    found = torch.cuda.is_available()
    return f"gpu tests: {'run on ' + torch.cuda.get_device_name(0) if found else 'skipped (no CUDA GPU)'}"


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=100)
DECODER = dict(SMALL, num_key_value_heads=2)
SPEECH = dict(
    SMALL,
    vocab_size=20,
    conv_dim=(8, 8),
    conv_stride=(4, 4),
    conv_kernel=(8, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    classifier_proj_size=8,
    layerdrop=0.0,  # no random layer skipping or SpecAugment masking when the tests train
    mask_time_prob=0.0,
)
WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=37,
    num_mel_bins=8,
    max_source_positions=16,
    vocab_size=60,
    classifier_proj_size=8,
)


def whisper_encoder(config):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(config)


VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=8, patch_size=4
)
TEXT_TOWER = dict(SMALL, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2)
VISION_ARCHS = ("vit", "dinov2", "clip_vision_model", "siglip_vision_model")
SPEECH_ARCHS = ("wav2vec2", "wav2vec2-stable", "hubert", "wavlm", "data2vec-audio", "whisper")

# model_type -> (config class, kwargs, bare model class, model class with a head)
ARCHS = {
    "bert": (T.BertConfig, SMALL, T.BertModel, T.BertForSequenceClassification),
    "roberta": (T.RobertaConfig, dict(SMALL, pad_token_id=1), T.RobertaModel, T.RobertaForSequenceClassification),
    "xlm-roberta": (
        T.XLMRobertaConfig,
        dict(SMALL, pad_token_id=1),
        T.XLMRobertaModel,
        T.XLMRobertaForSequenceClassification,
    ),
    "electra": (T.ElectraConfig, dict(SMALL, embedding_size=16), T.ElectraModel, T.ElectraForSequenceClassification),
    "distilbert": (
        T.DistilBertConfig,
        dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=100),
        T.DistilBertModel,
        T.DistilBertForSequenceClassification,
    ),
    "gpt2": (
        T.GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0),
        T.GPT2Model,
        T.GPT2LMHeadModel,
    ),
    "llama": (T.LlamaConfig, DECODER, T.LlamaModel, T.LlamaForCausalLM),
    "mistral": (T.MistralConfig, DECODER, T.MistralModel, T.MistralForCausalLM),
    "qwen2": (T.Qwen2Config, DECODER, T.Qwen2Model, T.Qwen2ForCausalLM),
    "vit": (T.ViTConfig, dict(SMALL, image_size=8, patch_size=4), T.ViTModel, T.ViTForImageClassification),
    "dinov2": (T.Dinov2Config, VISION, T.Dinov2Model, T.Dinov2ForImageClassification),
    "clip_vision_model": (
        T.CLIPVisionConfig,
        dict(VISION, projection_dim=16),
        T.CLIPVisionModel,
        T.CLIPVisionModelWithProjection,
    ),
    "siglip_vision_model": (
        T.SiglipVisionConfig,
        VISION,
        T.SiglipVisionModel,
        T.SiglipVisionModel,
    ),  # its own pooling head
    "clip_text_model": (
        T.CLIPTextConfig,
        dict(TEXT_TOWER, projection_dim=16),
        T.CLIPTextModel,
        T.CLIPTextModelWithProjection,
    ),
    "siglip_text_model": (
        T.SiglipTextConfig,
        dict(TEXT_TOWER, projection_size=16),
        T.SiglipTextModel,
        T.SiglipTextModel,
    ),
    "wav2vec2": (T.Wav2Vec2Config, SPEECH, T.Wav2Vec2Model, T.Wav2Vec2ForSequenceClassification),
    "wav2vec2-stable": (
        T.Wav2Vec2Config,
        dict(SPEECH, do_stable_layer_norm=True, feat_extract_norm="layer"),
        T.Wav2Vec2Model,
        T.Wav2Vec2ForSequenceClassification,
    ),
    "hubert": (T.HubertConfig, SPEECH, T.HubertModel, T.HubertForSequenceClassification),
    "wavlm": (T.WavLMConfig, SPEECH, T.WavLMModel, T.WavLMForSequenceClassification),
    "data2vec-audio": (
        T.Data2VecAudioConfig,
        dict(SPEECH, num_conv_pos_embeddings=5),
        T.Data2VecAudioModel,
        T.Data2VecAudioForSequenceClassification,
    ),
    "whisper": (T.WhisperConfig, WHISPER, whisper_encoder, T.WhisperForAudioClassification),
}


def make_model(arch: str, head: bool = True, seed: int = 0):
    config_cls, kwargs, bare, with_head = ARCHS[arch]
    torch.manual_seed(seed)
    model = (with_head if head else bare)(config_cls(**kwargs))
    return model.eval()


def make_inputs(arch: str, batch: int = 2, seq: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if arch in VISION_ARCHS:
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    if arch == "whisper":
        return {"input_features": torch.randn(batch, 8, 32, generator=g)}
    if arch in SPEECH_ARCHS:  # 400 samples: 23 frames after the two strided convolutions
        return {
            "input_values": torch.randn(batch, 400, generator=g),
            "attention_mask": torch.ones(batch, 400, dtype=torch.long),
        }
    ids = torch.randint(2, 100, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


LARGER = {".hada_w": 3, ".lora_E": 10}


def randomize_adapters(model, std: float = 0.1, seed: int = 2):
    """Give every adapter parameter random values (zero-init B would block A's gradient).

    Biases are made positive so that no ReLU unit of a tiny bottleneck is dead on a short input.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapterkit." in name and ".fixed." not in name:  # fixed ones (VeRA's projections) never train
                # LoHa's update multiplies four factors, AdaLoRA's three (E holds singular values): at std 0.1
                # they would barely move the output
                scale = next((k for part, k in LARGER.items() if part in name), 1)
                value = torch.randn(p.shape, generator=g) * std * scale
                p.copy_(value.abs() + std if name.endswith("bias") else value)


@pytest.fixture
def bert():
    return make_model("bert")


def assert_generate_matches_recompute(model, steps: int = 5):
    """Greedy ``generate()`` with a KV cache equals greedy decoding that recomputes everything."""
    ids = torch.tensor([[5, 9, 13, 2]])
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    tokens = ids
    for _ in range(steps):
        logits = model(tokens, use_cache=False).logits
        assert logits.shape[1] == tokens.shape[1]
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tokens)


def assert_left_padding_ignored(model):
    """A left-padded row gives the logits of the same row alone."""
    ids = torch.tensor([[0, 0, 7, 8, 9], [3, 4, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    alone = model(input_ids=ids[:1, 2:]).logits
    torch.testing.assert_close(batched[0, 2:], alone[0], atol=1e-4, rtol=1e-4)


def assert_right_padding_ignored(model):
    """An encoder's right-padded row gives the hidden states of the same row alone."""
    ids = torch.randint(2, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batched = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = model.base_model(input_ids=ids[1:, :4]).last_hidden_state
    torch.testing.assert_close(batched[1, :4], alone[0], atol=1e-5, rtol=1e-5)


def source_lines(pattern: str, allowed=lambda path: False) -> list[str]:
    """``file:line`` of every line of adapterkit's source matching ``pattern``, outside the ``allowed`` files
    (tests that one idea lives in one place)."""
    import re
    from pathlib import Path

    src = Path(__file__).parents[1] / "src" / "adapterkit"
    regex = re.compile(pattern)
    return [
        f"{p.relative_to(src)}:{i}"
        for p in sorted(src.rglob("*.py"))
        if not allowed(p)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if regex.search(line)
    ]


def saved_tensors(folder) -> dict:
    """An adapter folder's saved weights (adapter and head) by ``file:key``, not the routing signature that
    ``adapterkit train`` writes beside them."""
    from safetensors.torch import load_file

    from adapterkit.core.routing import SIGNATURE_FILE

    files = [f for f in sorted(Path(folder).glob("*.safetensors")) if f.name != SIGNATURE_FILE]
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}
