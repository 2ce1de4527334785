"""The speech demo's training and scoring on a tiny random Whisper encoder (the real run: README)."""

import pytest
import torch
import transformers as T
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from adapterkit.apps import speech_demo as demo

from conftest import WHISPER


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return WhisperEncoder(T.WhisperConfig(**dict(WHISPER, num_mel_bins=80, max_source_positions=150))).eval()


def split(labels):
    g = torch.Generator().manual_seed(len(labels))
    valid = torch.arange(150)[None] < torch.randint(50, 150, (len(labels),), generator=g)[:, None]
    return demo.Split(torch.randn(len(labels), 80, 300, generator=g), valid, labels)


SPLITS = {
    "speaker": {"train": split(["s1", "s2", "s3"] * 4), "test": split(["t1", "t2", "t3"] * 2)},
    "emotion": {"train": split(["sad", "angry"] * 6), "test": split(["sad", "angry"] * 3)},
    "intent": {"train": split(["time", "weather", "lights_on"] * 4), "test": split(["time", "weather"] * 3)},
    "asr": {"train": split(["open the door", "hi"] * 6), "test": split(["open the door", "hi"] * 2)},
}


@pytest.mark.parametrize("task", demo.TASKS)
@pytest.mark.parametrize("preset", [None, demo.ROWS[6][1]])  # full fine-tuning, EL
def test_run_trains_and_scores_every_task(encoder, task, preset):
    result = demo.run(encoder, preset, 1e-3, task, SPLITS[task], demo.Sizes(train=12, test=6, epochs=1))
    assert result["score"] >= 0 and (task == "asr" or result["score"] <= 1)  # CER can exceed 1 (insertions)
    full = sum(p.numel() for p in encoder.parameters() if p.requires_grad)  # Whisper's positions stay fixed
    assert (result["trainable"] == full) == (preset is None) and result["trainable"] > 0
    assert not any(".adapterkit." in n for n, _ in encoder.named_parameters())  # the base copy is untouched


def test_elp_is_refused_on_whisper_and_the_table_says_why(encoder):
    from adapterkit.errors import ConfigError

    with pytest.raises(ConfigError, match="no variable-length convolutional features"):
        demo.run(encoder, demo.ROWS[7][1], 1e-3, "emotion", SPLITS["emotion"], demo.Sizes(12, 6, 1))
    row = {task: {"trainable": 10, "score": 0.5} for task in demo.TASKS}
    text = demo.table({"EL": row, "ELP": {"refused": "no convolutional features"}}, total=100)
    assert "| EL | 10 | 10.00% | 50.0 | 50.0 | 50.0 | 50.0 |" in text
    assert "| ELP | - | - | n/a: no convolutional features |" in text
