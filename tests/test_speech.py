"""Speech encoders: the WavLM attention route, pre-LN variants, Whisper's encoder-only placement."""

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit import mha
from adapterkit.arch import spec_for

from conftest import first_output, make_inputs, make_model, randomize_adapters


def test_wavlm_route_keeps_the_base_outputs():
    model = make_model("wavlm", head=False)
    plain = copy.deepcopy(model)
    ak.add_adapter(model, "a", "lora", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    randomize_adapters(model)
    assert mha.METHOD in model.encoder.layers[0].attention.__dict__
    x = make_inputs("wavlm")
    with torch.no_grad(), ak.disable_adapters(model):
        torch.testing.assert_close(model(**x).last_hidden_state, plain(**x).last_hidden_state, atol=1e-6, rtol=1e-6)


def test_without_the_route_wavlm_projections_get_no_gradient():
    """The trap itself: WavLM passes q/k/v/out weights to F.multi_head_attention_forward."""
    model = make_model("wavlm", head=False)
    ak.add_adapter(model, "a", "lora", target_modules=["q_proj"])
    randomize_adapters(model)
    for layer in model.encoder.layers:
        del layer.attention.__dict__[mha.METHOD]  # back to transformers' own method
    model(**make_inputs("wavlm")).last_hidden_state.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapterkit." in n)


def test_wavlm_prefix_acts():
    """Prefix keys reach WavLM's attention (PerRow prefixes on WavLM: tests/test_composition.py)."""
    model = make_model("wavlm", head=False)
    ak.add_adapter(model, "p", "prefix", prefix_length=3, activate=True)
    randomize_adapters(model)
    x = make_inputs("wavlm")
    with torch.no_grad():
        with_prefix = model(**x).last_hidden_state
        with ak.disable_adapters(model):
            base = model(**x).last_hidden_state
    assert (with_prefix - base).abs().max() > 1e-2


@pytest.mark.parametrize("arch,post_ln", [("wav2vec2", True), ("wav2vec2-stable", False), ("whisper", False)])
def test_layer_norm_layout_per_variant(arch, post_ln):
    assert spec_for(make_model(arch)).post_ln == post_ln


def test_whisper_adapters_go_to_the_encoder_only():
    import transformers as T

    from conftest import WHISPER

    model = T.WhisperModel(T.WhisperConfig(**WHISPER, pad_token_id=0, decoder_start_token_id=1))
    ak.add_adapter(model, "a", "houlsby")
    hosts = {n.split(".adapterkit.")[0] for n, _ in model.named_parameters() if ".adapterkit." in n}
    assert hosts and all(h.startswith("encoder.layers.") for h in hosts)
    assert len({h.split(".")[2] for h in hosts}) == 2  # both encoder layers


def test_speech_classifier_trains_an_adapter():
    model = make_model("wavlm")  # WavLMForSequenceClassification
    ak.add_adapter(model, "a", "lora")
    ak.train_adapter(model, "a")
    out = model(**make_inputs("wavlm"), labels=torch.tensor([0, 1]))
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".adapterkit." in n]
    assert grads and all(g is not None for g in grads)
    assert first_output(out).shape == (2, 2)
