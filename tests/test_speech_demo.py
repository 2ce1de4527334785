"""The speech demo's pieces on a tiny random Whisper with the real tiny.en tokenizer (the real run:
README): ASR targets and decoding, every task's grid chosen on validation, refusals, the table."""

import dataclasses

import pytest
import torch
import transformers as T

from adapterkit.apps import speech_demo as demo
from adapterkit.apps.ct2whisper import load_tokenizer, shorten
from adapterkit.speech import metrics

from conftest import WHISPER

ROW = {row.label: row for row in demo.ROWS}


@pytest.fixture(scope="module")
def whisper():
    torch.manual_seed(0)
    config = T.WhisperConfig(**dict(WHISPER, vocab_size=51864, num_mel_bins=80, max_source_positions=1500))
    model = T.WhisperForConditionalGeneration(config).eval()
    model.generation_config = T.GenerationConfig(
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, no_timestamps_token_id=50362,
        is_multilingual=False, max_length=448,
    )  # fmt: skip
    return shorten(model, demo.WINDOW)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny.en")


def split(labels, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(150)[None] < torch.randint(50, 150, (len(labels),), generator=g)[:, None]
    return demo.Split(torch.randn(len(labels), 80, 300, generator=g), valid, labels)


def splits(labels: dict[str, list[str]]) -> dict[str, demo.Split]:
    return {name: split(values, seed) for seed, (name, values) in enumerate(labels.items())}


SPLITS = {
    "asr": splits({"train": ["call zorvath at nine", "open the door"] * 4, "validation": ["open the door"] * 2,
                   "test": ["call zorvath at nine"] * 2}),
    "speaker": splits({"train": ["s1", "s2", "s3"] * 4, "validation": ["v1", "v2"] * 2,
                       "test": ["t1", "t2", "t3"] * 2}),
    "emotion": splits({"train": ["sad", "angry"] * 6, "validation": ["sad", "angry"], "test": ["sad", "angry"] * 2}),
}  # fmt: skip


def test_shorten_keeps_the_first_positions(whisper):
    table = whisper.model.encoder.embed_positions
    assert table.weight.shape == (150, 32) and whisper.config.max_source_positions == 150
    out = whisper.model.encoder(torch.randn(1, 80, 300)).last_hidden_state
    assert out.shape == (1, 150, 32)


def test_targets_score_the_text_and_the_end_but_not_the_prompt(whisper, tokenizer):
    inputs, labels = demo.targets(whisper, tokenizer, ["open the door", "hi"])
    text = tokenizer.encode(" open the door", add_special_tokens=False)
    assert demo.prompt_ids(whisper) == [50257, 50362]
    assert inputs[0].tolist() == [50257, 50362, *text]  # teacher forcing: the prompt, then the text
    assert labels[0].tolist() == [-100, *text, 50256]  # each position predicts the next token
    short = tokenizer.encode(" hi", add_special_tokens=False)
    assert labels[1].tolist() == [-100, *short, 50256] + [-100] * (len(text) - len(short))
    assert tokenizer.decode(text) == " open the door"


def test_normalise_keeps_words_only():
    assert demo.normalise(" Call Zorvath, at nine!") == "call zorvath at nine"


@pytest.mark.parametrize("task", demo.TASKS)
def test_the_grid_is_chosen_on_validation_and_scored_on_test(whisper, tokenizer, task):
    row = dataclasses.replace(ROW["LoRA"], rates=(1e-4, 3e-2))
    result = demo.cell(whisper, row, task, tokenizer, SPLITS[task], epochs=2)
    sign = 1 if demo.LOWER_IS_BETTER[task] else -1
    assert set(result["grid"]) == {1e-4, 3e-2} and result["epoch"] in (1, 2)
    assert result["validation"] == min(result["grid"].values(), key=lambda v: sign * v)
    assert result["grid"][result["lr"]] == result["validation"]
    assert result["score"] >= 0 and (task == "asr" or result["score"] <= 1)  # WER can exceed 1 (insertions)
    assert not any(".adapterkit." in n for n, _ in whisper.named_parameters())  # the base copy is untouched


def test_asr_adapters_reach_the_decoder_and_e_stays_in_the_encoder(whisper):
    lora = demo.setup(whisper, ROW["LoRA"], "asr", SPLITS["asr"]["train"])
    e = demo.setup(whisper, ROW["E"], "asr", SPLITS["asr"]["train"])
    names = lambda s: [n for n, p in s.model.named_parameters() if p.requires_grad]  # noqa: E731
    assert any("decoder.layers" in n for n in names(lora)) and any("encoder.layers" in n for n in names(lora))
    assert names(e) and not any("decoder" in n for n in names(e))
    full = demo.setup(whisper, ROW["full fine-tuning"], "asr", SPLITS["asr"]["train"])
    positions = whisper.model.encoder.embed_positions.weight  # sinusoids, frozen in transformers' Whisper
    assert (
        sum(p.numel() for p in demo.trainable(full)) == sum(p.numel() for p in whisper.parameters()) - positions.numel()
    )


def test_validation_keeps_the_best_epoch_weights(whisper, tokenizer):
    """The weights scored on test are the chosen epoch's: re-scoring validation gives the kept number."""
    run = demo.fit(whisper, ROW["E"], 3e-2, "emotion", tokenizer, SPLITS["emotion"], epochs=3)
    again = demo.score(run["setup"], "emotion", tokenizer, SPLITS["emotion"]["validation"])["score"]
    assert again == run["validation"]


def test_l_rows_are_left_out_of_asr_and_elp_is_refused_on_whisper(whisper, tokenizer):
    from adapterkit.errors import ConfigError

    assert demo.cell(whisper, ROW["EL"], "asr", tokenizer, SPLITS["asr"], 1) == {"refused": demo.NOT_ASR}
    with pytest.raises(ConfigError, match="no variable-length convolutional features"):
        demo.cell(whisper, ROW["ELP"], "speaker", tokenizer, SPLITS["speaker"], 1)


def test_table_shows_scores_intervals_and_choices():
    cell = {"trainable": 10, "score": 0.25, "lr": 1e-3, "epoch": 2}
    results = {
        "untouched": {"asr": {"score": 0.9, "trainable": 0}},
        "EL": {"asr": {"refused": demo.NOT_ASR}, "speaker": {**cell, "interval": (0.2, 0.3)}, "emotion": cell},
        "ELP": {"refused": "no convolutional features"},
    }
    text = demo.table(results, {"whisper": 1000, "encoder": 100})
    assert "| untouched | 0 (0.00%) | - | 90.0 |  |  |" in text
    assert "| EL | - | 10 (10.00%) | n/a | 25.0 [20.0, 30.0] | 25.0 |" in text
    assert "| ELP | - | - | n/a: no convolutional features |" in text
    assert "| EL |  | lr 0.001, 2 ep | lr 0.001, 2 ep |" in demo.choices(results)


def test_eer_interval_brackets_the_eer_and_narrows_with_more_trials():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(4000, generator=g) < 0.5
    scores = same.float() + torch.randn(4000, generator=g)
    value = metrics.eer(scores, same)
    low, high = metrics.eer_interval(scores, same, rounds=200)
    assert low < value < high and high - low < 0.05
    small_low, small_high = metrics.eer_interval(scores[:400], same[:400], rounds=200)
    assert small_high - small_low > 2 * (high - low)  # a tenth of the trials: about 3x as wide
    assert metrics.eer_interval(scores, same, rounds=200) == (low, high)  # seeded
