"""Whisper tiny.en and base from their CTranslate2 packages: conversion, offline loading, ASR with generate()."""

import copy
import re
import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch

import adapterkit as ak
from adapterkit.apps import ct2whisper

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def whisper():
    return ct2whisper.load_whisper()


@pytest.fixture(scope="module")
def base():
    return ct2whisper.load_whisper("base")


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    return speak("turn on the light", tmp_path_factory.mktemp("speech") / "light.wav")


def speak(text: str, path) -> np.ndarray:
    """espeak-ng at 16 kHz mono (sox resamples), as float samples."""
    assert shutil.which("espeak-ng") and shutil.which("sox"), "espeak-ng and sox: bash scripts/setup.sh installs them"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path) + ".raw.wav", text], check=True)
    subprocess.run(["sox", str(path) + ".raw.wav", "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True)
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def features(audio: np.ndarray) -> torch.Tensor:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="pt").input_features


def words(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def greedy(model, audio: np.ndarray, steps: int = 20, prompt: tuple[int, ...] = (50257, 50362)) -> list[int]:
    """Greedy decoding by hand; ``prompt``: <|startoftranscript|> <|notimestamps|> of the English-only model."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        encoded = model.model.encoder(features(audio)).last_hidden_state
        for _ in range(steps):
            token = int(model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == model.config.eos_token_id:
                break
    return ids[0].tolist()


def test_reads_the_ctranslate2_file(whisper):
    spec, tensors = ct2whisper.read_ct2(ct2whisper.model_files().parts)
    assert spec == "WhisperSpec" and len(tensors) == 149  # 148 variables + the projection alias
    assert tensors["decoder/projection/weight"] is tensors["decoder/embeddings/weight"]
    params = sum(p.numel() for p in whisper.parameters())
    assert params == pytest.approx(37.8e6, rel=0.01), params
    q = whisper.model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(q.half(), tensors["encoder/layer_0/self_attention/linear_0/weight"][:384])


def test_greedy_decodes_an_espeak_sentence(whisper, light):
    ids = greedy(whisper, light)
    text = ct2whisper.load_tokenizer().decode(ids, skip_special_tokens=True)
    assert words(text) == "turn on the light", text
    generated = whisper.generate(features(light))  # the generation config needs no language for tiny.en
    assert words(ct2whisper.load_tokenizer().decode(generated[0], skip_special_tokens=True)) == "turn on the light"


def test_converted_folder_loads_offline(whisper, light, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, WhisperForConditionalGeneration, WhisperProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from adapterkit.apps.cli import main

    assert main(["whisper-from-ct2", str(tmp_path / "whisper"), "--model", "tiny.en"]) == 0
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "whisper").eval()
    noise = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[50257, 50362]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(noise, decoder_input_ids=ids).logits, whisper(noise, decoder_input_ids=ids).logits
        )
    assert AutoTokenizer.from_pretrained(tmp_path / "whisper").decode([50256]) == "<|endoftext|>"
    processor = WhisperProcessor.from_pretrained(tmp_path / "whisper")  # the generation config travels too
    generated = loaded.generate(processor(light, sampling_rate=16000, return_tensors="pt").input_features)
    assert words(processor.batch_decode(generated, skip_special_tokens=True)[0]) == "turn on the light"


def test_short_window_encoder_trains_adapters(whisper):
    encoder = ct2whisper.load_encoder(seconds=2)
    assert encoder.config.max_source_positions == 100
    assert torch.equal(encoder.embed_positions.weight, whisper.model.encoder.embed_positions.weight[:100])
    noise = torch.randn(2, 80, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the convolutions see the same frames: equal up to the shorter attention span
        conv = torch.nn.functional.gelu(encoder.conv1(noise))
        torch.testing.assert_close(conv, torch.nn.functional.gelu(whisper.model.encoder.conv1(noise)))
    ak.add_adapter(encoder, "el", "el")
    ak.train_adapter(encoder, "el")
    encoder(noise).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in encoder.named_parameters() if ".adapterkit." in n)
    with pytest.raises(ak.AdapterFileError, match="seconds must be in"):
        ct2whisper.load_encoder(seconds=31)


def test_short_window_base_scores_the_right_transcript(base, light):
    """Sequence-to-sequence loss on a 3 s window: the tokenizer's labels (English prompt) fit the clip best."""
    from transformers import WhisperFeatureExtractor

    short = ct2whisper.shorten(copy.deepcopy(base), seconds=3)
    assert short.config.max_source_positions == 150 and base.config.max_source_positions == 1500
    frames = WhisperFeatureExtractor(chunk_length=3)(light, sampling_rate=16000, return_tensors="pt").input_features
    tokenizer = ct2whisper.load_tokenizer("base")

    def loss(text: str) -> float:
        labels = torch.tensor([tokenizer(text).input_ids[1:]])  # the model prepends <|startoftranscript|>
        with torch.no_grad():
            return float(short(frames, labels=labels).loss)

    right, wrong = loss(" Turn on the light."), loss(" Open the door.")
    assert right + 1 < wrong, (right, wrong)  # measured: 2.65 and 4.78 (prompt tokens included)


def test_parts_read_as_one_file(tmp_path):
    """A model.bin cut anywhere (here inside the version number and inside a tensor) reads as the whole file."""
    whole = ct2whisper.model_files().parts[0].read_bytes()
    cuts = [0, 3, 40_000_003, len(whole)]
    parts = [tmp_path / f"model.bin.part{i}" for i in range(3)]
    for part, start, end in zip(parts, cuts, cuts[1:], strict=False):
        part.write_bytes(whole[start:end])
    spec, tensors = ct2whisper.read_ct2(parts)
    _, reference = ct2whisper.read_ct2(ct2whisper.model_files().parts)
    assert spec == "WhisperSpec" and tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[name], reference[name]) for name in reference)
    with pytest.raises(ak.AdapterFileError, match="truncated"):
        ct2whisper.read_ct2(parts[:2])
    with pytest.raises(ak.AdapterFileError, match="unknown Whisper model 'small'"):
        ct2whisper.model_files("small")


def test_reads_base_from_its_two_packages(base):
    files = ct2whisper.model_files("base")
    assert [part.name for part in files.parts] == ["model.bin.part1", "model.bin.part2"]
    spec, tensors = ct2whisper.read_ct2(files.parts)
    assert spec == "WhisperSpec" and len(tensors) == 213  # 212 variables + the projection alias
    c = base.config
    shape = (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.decoder_attention_heads)
    assert shape == (512, 6, 6, 8, 8) and c.vocab_size == 51865
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(72.6e6, rel=0.001)
    fused = tensors["decoder/layer_5/self_attention/linear_0/weight"]  # q | k | v stacked
    attention = base.model.decoder.layers[5].self_attn
    for i, projection in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert torch.equal(projection.weight.half(), fused[512 * i : 512 * (i + 1)])
    with pytest.raises(ak.AdapterFileError, match="version"):
        ct2whisper.read_ct2(files.parts[::-1])


def test_base_transcribes_english_with_generate(base, light):
    tokenizer = ct2whisper.load_tokenizer("base")
    prompt = tokenizer.prefix_tokens  # checked against tokenizer.json's ids
    assert prompt == [50258, 50259, 50359, 50363]  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
    assert words(tokenizer.decode(greedy(base, light, prompt=tuple(prompt)), skip_special_tokens=True)) == (
        "turn on the light"
    )
    with torch.no_grad():
        named = base.generate(features(light), language="en", task="transcribe")
        detected = base.generate(features(light))  # detects <|en|>, then transcribes (the default task)
    assert words(tokenizer.decode(named[0], skip_special_tokens=True)) == "turn on the light"
    assert torch.equal(detected, named)
