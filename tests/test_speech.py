"""Speech encoders: the WavLM attention route, pre-LN variants, Whisper's encoder-only placement."""

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.core import mha
from adapterkit.core.arch import spec_for

from conftest import first_output, make_inputs, make_model, randomize_adapters


def test_wavlm_route_keeps_the_base_outputs():
    model = make_model("wavlm", head=False)
    plain = copy.deepcopy(model)
    ak.add_adapter(model, "a", "lora", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    randomize_adapters(model)
    assert mha.METHOD in model.encoder.layers[0].attention.__dict__
    other = make_model("wavlm", head=False)
    ak.add_adapter(other, "p", "pfeiffer")  # nothing in the attention: transformers' own path stays
    assert not any(mha.METHOD in layer.attention.__dict__ for layer in other.encoder.layers)
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


def branch(module, h):
    """LN(Up(ReLU(Down(h)))) written out."""
    down, up, norm = module.down, module.up, module.norm
    return torch.nn.functional.layer_norm(up(torch.relu(down(h))), norm.normalized_shape, norm.weight, norm.bias)


def test_e_adapter_formula_layers_and_init():
    model = make_model("wav2vec2", head=False)
    ak.add_adapter(model, "e", "e_adapter", bottleneck_size=6, layers=[-1], activate=True)
    names = [n for n, _ in model.named_parameters() if ".adapterkit." in n]
    assert names and all(n.startswith("encoder.layers.1.feed_forward.output_dense.") for n in names)
    site = model.encoder.layers[1].feed_forward.output_dense
    e = site.adapterkit["e"]
    assert e.branch.down.weight.std() < 3e-3 and e.branch.down.bias.abs().sum() == 0
    randomize_adapters(model)
    h = torch.randn(2, 5, 37)  # the feed-forward's hidden size
    with torch.no_grad():
        f = site.forward(h)
        torch.testing.assert_close(site(h), f + branch(e.branch, f))


def test_e_adapter_tunes_its_own_copies_of_the_layer_norms(tmp_path):
    model = make_model("wav2vec2")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "layer_norm" in n}
    ak.add_adapter(model, "e", "e_adapter", train_layer_norms=True)
    x = make_inputs("wav2vec2")
    with torch.no_grad():
        before = first_output(model(**x))
        ak.set_active(model, ak.Stack())  # the copies start equal to the model's norms
    ak.train_adapter(model, "e")
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**x)), before)
    tuned = [n for n, _ in model.named_parameters() if ".adapterkit.e." in n and n.endswith((".weight", ".bias"))]
    assert sum("layer_norm.adapterkit" in n for n in tuned) == 2 * 2 * 2  # 2 layers x 2 norms x (weight, bias)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**x, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # the base model's norms never move
    ak.save_adapter(model, "e", tmp_path / "e")
    other = make_model("wav2vec2")
    ak.load_adapter(other, tmp_path / "e", activate=True)
    with torch.no_grad():
        assert torch.equal(first_output(other(**x)), first_output(model(**x)))


@pytest.mark.parametrize("arch", ["wav2vec2", "wav2vec2-stable", "wavlm", "whisper"])
def test_l_adapter_returns_the_softmax_weighted_sum_of_layer_branches(arch):
    model = make_model(arch, head=False)
    ak.add_adapter(model, "l", "l_adapter", bottleneck_size=8, activate=True)
    randomize_adapters(model)
    x = make_inputs(arch)
    with torch.no_grad():
        got = model(**x).last_hidden_state
        layers = layer_outputs(model, x)  # the encoder's own layers are unchanged by the L-adapter
    modules = [m for n, m in model.named_modules() if n.endswith("adapterkit.l")]
    taps = [m for m in modules if hasattr(m, "branch")]
    weights = torch.softmax(next(m for m in modules if hasattr(m, "layer_weights")).layer_weights, 0)
    with torch.no_grad():
        want = sum(w * (h + branch(t.branch, h)) for w, t, h in zip(weights, taps, layers, strict=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def layer_outputs(model, x):
    """Each encoder layer's output, captured by hooks, with the adapters off."""
    seen = []
    layers = model.layers if hasattr(model, "layers") else model.encoder.layers

    def keep(module, args, out):
        seen.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    with ak.disable_adapters(model):
        model(**x)
    for handle in handles:
        handle.remove()
    return seen


def test_el_on_a_classifier_changes_logits_and_trains():
    model = make_model("wavlm")
    ak.add_adapter(model, "el", "el")
    ak.train_adapter(model, "el")
    x = make_inputs("wavlm")
    out = model(**x, labels=torch.tensor([1, 0]))
    out.loss.backward()
    with torch.no_grad(), ak.disable_adapters(model):
        base = model(**x).logits
    assert not torch.allclose(out.logits, base)
    params = [p for n, p in model.named_parameters() if ".adapterkit." in n]
    assert all(p.grad is not None for p in params)


def test_p_adapter_prepends_frames_and_keeps_padded_rows_exact():
    """Pseudo-frames in front; a zero-padded row equals the same audio alone on its P + valid frames.

    ``wav2vec2-stable`` has a per-frame (layer-norm) feature extractor, so padding does not leak
    into the real frames' features (group norm would, with or without adapters).
    """
    model = make_model("wav2vec2-stable", head=False)
    ak.add_adapter(model, "p", "p_adapter", prefix_length=3, activate=True)
    randomize_adapters(model)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(3))
    audio[1, 200:] = 0
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 200:] = 0
    with torch.no_grad():
        batch = model(input_values=audio, attention_mask=mask).last_hidden_state
        alone = model(input_values=audio[1:, :200]).last_hidden_state
        with ak.disable_adapters(model):
            base = model(input_values=audio[:1]).last_hidden_state
    assert batch.shape[1] == base.shape[1] + 3 == 23 + 3
    valid = alone.shape[1]
    assert valid == 3 + 11
    torch.testing.assert_close(batch[1, :valid], alone[0], atol=1e-5, rtol=1e-5)
    frames = model._get_feat_extract_output_lengths(torch.tensor([400, 200]))
    with ak.disable_adapters(model):
        assert (model._get_feat_extract_output_lengths(torch.tensor([400, 200])) == frames - 3).all()


def test_p_adapter_counts_pseudo_frames_in_a_ctc_loss():
    import transformers as T

    from conftest import SPEECH

    model = T.Wav2Vec2ForCTC(T.Wav2Vec2Config(**SPEECH)).eval()
    ak.add_adapter(model, "p", "p_adapter", prefix_length=4)
    ak.train_adapter(model, "p")
    x = make_inputs("wav2vec2")
    labels = torch.tensor([[3, 4, 5], [6, 7, -100]])
    out = model(**x, labels=labels)
    assert out.logits.shape[1] == 23 + 4 and torch.isfinite(out.loss)
    assert model._get_feat_extract_output_lengths(torch.tensor(400)) == 23 + 4
    out.loss.backward()
    assert model.wav2vec2.feature_extractor.adapterkit["p"].pseudo_features.grad.abs().sum() > 0
