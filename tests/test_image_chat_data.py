"""The image-chat demo's questions: deterministic, and each answer is what the picture shows."""

import numpy as np
from scipy import ndimage

from adapterkit.apps import image_chat_data as data


def red_blobs(image) -> int:
    rgb = np.asarray(image).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    return ndimage.label(red)[1]


def test_scenes_hold_as_many_red_circles_as_the_answer_says():
    samples = data.count_samples(40, seed=3)
    assert {s.answer for s in samples} == {"1", "2", "3", "4"}
    assert all(red_blobs(s.image) == int(s.answer) for s in samples)


def test_splits_are_the_same_every_time_and_digits_are_real():
    a, b = data.dataset({"train": 20, "test": 10}), data.dataset({"train": 20, "test": 10})
    assert [(s.kind, s.answer) for s in a["train"]] == [(s.kind, s.answer) for s in b["train"]]
    assert np.array_equal(np.asarray(a["test"][0].image), np.asarray(b["test"][0].image))
    assert len(a["train"]) == 60 and {s.kind for s in a["test"]} == set(data.QUESTIONS)
    words = data.word_samples(30, seed=1)
    assert {s.answer for s in words} <= set(data.WORDS)
    assert all(np.asarray(s.image).min() < 100 for s in words)  # ink was drawn


def test_exact_match_reads_the_first_word():
    assert data.exact_match(" 7.", "7") and data.exact_match("Cat, I think", "cat")
    assert not data.exact_match("It is 7", "7") and not data.exact_match("", "7")
