"""The LLM demo's data (deterministic, disjoint splits, answers that check out) and, slow, a reduced run
on the real SmolLM2-135M-Instruct: zero-shot vs LoRA scored by generation."""

import json
import re

import pytest

from adapterkit.apps import llm_data, llm_demo
from adapterkit.training.answers import first_json_object

SIZES = {"train": 20, "validation": 5, "test": 10}


@pytest.fixture(scope="module")
def splits():
    return llm_data.task_splits(seed=3, sizes=SIZES)


def test_splits_are_deterministic_sized_and_disjoint(splits):
    assert splits == llm_data.task_splits(seed=3, sizes=SIZES)
    assert splits != llm_data.task_splits(seed=4, sizes=SIZES)
    for task in llm_data.TASKS:
        assert {k: len(v) for k, v in splits[task].items()} == SIZES
        questions = [{row[1]["content"] for row in splits[task][s]} for s in ("train", "validation", "test")]
        assert sum(map(len, questions)) == sum(SIZES.values())  # no question twice, within or across splits
        for row in sum(splits[task].values(), []):
            assert [m["role"] for m in row] == ["system", "user", "assistant"]
            assert row[0]["content"] == llm_data.SYSTEM


def test_arithmetic_answers_compute(splits):
    for row in sum(splits["arithmetic"].values(), []):
        text, answer = row[1]["content"], row[2]["content"]
        first, *steps, question = text.split(". ")
        count = int(re.fullmatch(r"\w+ has (\d+) \w+", first).group(1))
        assert question.startswith("How many") and 2 <= len(steps) <= 3
        for step, equation in zip(steps, answer.split(", "), strict=True):
            k = int(re.search(r"\d+", step).group())  # "X gives 3 to Y", "X loses/sells 3" take away; others add
            sign = "-" if re.search(r"gives \d+ to|loses|sells", step) else "+"
            count, before = count + (-k if sign == "-" else k), count
            assert equation == f"{before} {sign} {k} = {count}"
        assert llm_data.result(answer) == count and 0 <= count <= 99


def test_extraction_answers_parse_and_match_the_sentence(splits):
    for row in sum(splits["extraction"].values(), []):
        fields = json.loads(row[2]["content"])
        assert first_json_object(row[2]["content"]) == fields and set(fields) == {"name", "age", "city", "order"}
        sentence = row[1]["content"].split("\n\n")[1]
        assert all(str(value) in sentence for value in fields.values())


def test_sentiment_is_balanced_with_label_answers(splits):
    answers = [row[2]["content"] for row in sum(splits["sentiment"].values(), [])]
    assert set(answers) == {"positive", "negative"} and abs(answers.count("positive") - len(answers) / 2) <= 5


def test_few_shot_puts_training_turns_before_the_question(splits):
    shots = splits["arithmetic"]["train"][:2]
    row = llm_demo.with_shots(splits["arithmetic"]["test"][:1], shots)[0]
    assert [m["role"] for m in row] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert row[1:3] == shots[0][1:] and row[-2:] == splits["arithmetic"]["test"][0][1:]


@pytest.mark.slow
def test_lora_beats_zero_shot_on_smollm2(capsys):
    rows = llm_demo.main(methods="zero-shot,lora", sizes={"train": 40, "validation": 2, "test": 10}, threads=1)
    zero, lora = rows
    assert zero["trainable"] == 0 and zero["bytes"] == 0 and zero["seconds"] == 0
    assert 0 < lora["trainable"] < 2e6 and 0.1e6 < lora["bytes"] < 10e6 and lora["tokens_per_s"] > 20
    gains = [lora[task] - zero[task] for task in llm_data.TASKS]
    assert sum(gain >= 0.25 for gain in gains) >= 2, gains
    assert lora["extraction"] >= 0.3 and 0.3e3 < lora["peak_rss_mb"] < 4e3
    assert "| lora (r=8) |" in capsys.readouterr().out
