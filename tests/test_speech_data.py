"""Synthesised speech data: held-out speakers, determinism, noise level, cache, trials, clear errors."""

import numpy as np
import pytest

from adapterkit.apps import speech_data as data
from adapterkit.errors import AdapterError


def test_training_validation_and_test_speakers_are_disjoint():
    split = data.speakers(seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 101, "validation": 33, "test": 34}
    names = [{s.name for s in people} for people in split.values()]
    assert len(set.union(*names)) == 168 == sum(map(len, names))
    assert data.speakers(seed=1)["test"] != split["test"]


def test_asr_test_sentences_are_new_but_their_names_are_not():
    heard = {t for t, *_ in data.items("asr", "train")}
    for split in data.SPLITS:
        chosen = data.items("asr", split)
        assert {style for _, _, style, _ in chosen} == {"fast"} and all(t == label for t, _, _, label in chosen)
        assert {name for name in data.NAMES if any(name in t.split() for t, *_ in chosen)} == set(data.NAMES)
        assert len(chosen) == 6 * len(data.speakers()[split])
        assert split == "train" or not heard & {t for t, *_ in chosen}
    assert sum(map(len, data.commands().values())) == 570


def test_synthesis_is_deterministic_and_noise_has_the_asked_snr():
    speaker = data.speakers()["train"][0]
    a = data.synthesise("open the door", speaker, snr_db=20.0, seed=7)
    b = data.synthesise("open the door", speaker, snr_db=20.0, seed=7)
    assert np.array_equal(a, b) and a.dtype == np.float32 and 0.5 < a.size / 16000 < 3
    clean = data.synthesise("open the door", speaker, snr_db=200.0, seed=7)
    noise = a - clean
    snr = 10 * np.log10(np.mean(clean**2) / np.mean(noise**2))
    assert snr == pytest.approx(20.0, abs=0.5)
    excited = data.synthesise("open the door", speaker, style="excited", seed=7)
    assert excited.size < a.size  # a faster rate: a shorter utterance


def test_load_caches_whole_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    audio, labels = data.load("intent", "test", limit=6)
    assert len(audio) == 6 and set(labels) <= set(data.INTENTS)
    files = list((tmp_path / "speech").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "speech").glob("*.tmp*"))
    again, labels_again = data.load("intent", "test", limit=6)
    assert labels_again == labels and all(np.array_equal(x, y) for x, y in zip(audio, again, strict=True))
    with pytest.raises(AdapterError, match="unknown speech task"):
        data.load("music", "train")


def test_trials_pair_same_and_other_speakers():
    labels = ["a", "a", "b", "b", "c"]
    labels[4] = "a"
    trials = data.trials(labels, per_utterance=4)
    assert len(trials) == 5 * 4 and sum(same for *_, same in trials) == 10
    assert all((labels[i] == labels[j]) == same and i != j for i, j, same in trials)


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda tool: None if tool == "sox" else "/usr/bin/" + tool)
    with pytest.raises(AdapterError, match="sox not found.*apt-get install espeak-ng sox"):
        data.check_tools()
