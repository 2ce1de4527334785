"""Tiny random-config models: one row per supported architecture."""

import pytest
import torch
import transformers as T

T.logging.set_verbosity_error()

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=100)
DECODER = dict(SMALL, num_key_value_heads=2)

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
}


def make_model(arch: str, head: bool = True, seed: int = 0):
    config_cls, kwargs, bare, with_head = ARCHS[arch]
    torch.manual_seed(seed)
    model = (with_head if head else bare)(config_cls(**kwargs))
    return model.eval()


def make_inputs(arch: str, batch: int = 2, seq: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    ids = torch.randint(2, 100, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def randomize_adapters(model, std: float = 0.1, seed: int = 2):
    """Give every adapter parameter random values (zero-init B would block A's gradient).

    Biases are made positive so that no ReLU unit of a tiny bottleneck is dead on a short input.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapterkit." in name:
                value = torch.randn(p.shape, generator=g) * std
                p.copy_(value.abs() + std if name.endswith("bias") else value)


@pytest.fixture
def bert():
    return make_model("bert")
