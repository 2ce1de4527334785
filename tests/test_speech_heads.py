"""Speech heads and metrics against closed forms."""

import math

import pytest
import torch

import adapterkit as ak
from adapterkit import speech

from conftest import make_inputs, make_model


def test_error_rates():
    assert speech.edit_distance("kitten", "sitting") == 3
    assert speech.cer(["abc", "de"], ["abd", "de"]) == pytest.approx(1 / 5)
    assert speech.wer(["turn on the light"], ["turn the lights"]) == pytest.approx(2 / 4)


def test_eer_and_min_dcf():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])
    targets = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    # accept >= 0.6: miss 1/4 (0.4), false alarm 1/4 (0.6); accept >= 0.7: miss 1/4, false alarm 0
    assert speech.eer(scores, targets) == pytest.approx(0.25)
    assert speech.min_dcf(scores, targets, p_target=0.5) == pytest.approx(0.25)  # (0.5 * 1/4 + 0) / 0.5
    # p = 0.01: accept >= 0.7 (miss 1/4, no false alarm): 0.01 * 1/4 / 0.01; accepting 0.6 too adds 0.99 / 4
    assert speech.min_dcf(scores, targets, p_target=0.01) == pytest.approx(0.25)
    shifted = torch.tensor([0.9, 0.5, 0.45, 0.4, 0.6, 0.3, 0.2, 0.1])  # a non-target above three targets
    assert speech.min_dcf(shifted, targets, p_target=0.01) == pytest.approx(0.75)  # accept only 0.9
    assert speech.eer(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])) == 0


def test_ctc_greedy_decoding_and_loss():
    head = speech.CTCHead(4, "ab ")
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(4))
        head.proj.bias.zero_()
    # frame symbols: a a blank b b blank b (pad) -> "abb"
    path = torch.tensor([1, 1, 0, 2, 2, 0, 2, 3])
    h = torch.nn.functional.one_hot(path, 4).float()[None] * 10
    mask = torch.tensor([[True] * 7 + [False]])
    assert head.decode(h, mask) == ["abb"]
    loss = head.loss(h, mask, ["abb"])
    assert torch.isfinite(loss) and loss < 0.5
    with pytest.raises(ak.ConfigError, match="not in the CTC alphabet"):
        head.loss(h, mask, ["xyz"])


def test_pooling_ignores_padding():
    for pooling in ("mean", "attentive"):
        head = speech.UtteranceHead(8, 3, pooling)
        h = torch.randn(2, 5, 8)
        mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        changed = h.clone()
        changed[1, 3:] = 100.0
        torch.testing.assert_close(head(h, mask), head(changed, mask))
    torch.testing.assert_close(speech.masked_mean(h, mask)[1], h[1, :3].mean(0))


def test_utterance_head_normalises_each_frame_first():
    torch.manual_seed(0)
    head = speech.UtteranceHead(8, 3, "attentive")
    h, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    frames = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    weights = torch.softmax(head.attention(frames).squeeze(-1), dim=1)
    torch.testing.assert_close(head(h, mask), head.classifier((weights[..., None] * frames).sum(1)))
    scaled = h * torch.tensor([1.0, 1e3])[:, None, None] + 5.0  # an un-normalised layer mix: same frames
    torch.testing.assert_close(head(scaled, mask), head(h, mask), rtol=1e-4, atol=1e-4)


def test_am_softmax_logits_and_statistics_pooling():
    head = speech.SpeakerHead(8, speakers=4, dim=6, margin=0.2, scale=30.0)
    h, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    emb = head(h, mask)
    frames = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    stats = torch.cat([frames.mean(1), frames.var(1, unbiased=False).sqrt()], -1)
    torch.testing.assert_close(emb, head.embedding(stats))
    labels = torch.tensor([0, 2, 3])
    cosine = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(head.classes, dim=-1).T
    want = 30.0 * (cosine - 0.2 * torch.nn.functional.one_hot(labels, 4))
    torch.testing.assert_close(head.logits(emb, labels), want)
    score = speech.cosine_scores(emb[:1], emb[1:2])
    assert score.item() == pytest.approx(
        float(emb[0] @ emb[1] / (emb[0].norm() * emb[1].norm())), rel=1e-5
    ) and not math.isnan(score.item())


def test_frame_mask_counts_pseudo_frames():
    model = make_model("wav2vec2", head=False)
    ak.add_adapter(model, "p", "p_adapter", prefix_length=2, activate=True)
    x = make_inputs("wav2vec2")
    x["attention_mask"][1, 200:] = 0
    frames = model(**x).last_hidden_state.shape[1]
    mask = speech.frame_mask(model, frames, x["attention_mask"], 2)
    assert mask.shape == (2, 25) and mask[0].all() and mask[1].sum() == 2 + 11
