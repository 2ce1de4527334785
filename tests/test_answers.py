"""Scorers of generated answers (exact, label, JSON fields) and evaluate_generations on a tiny Llama."""

import json

import pytest

import adapterkit as ak
from adapterkit.training.answers import (
    SCORERS,
    evaluate_generations,
    exact_match,
    first_json_object,
    first_label,
    json_match,
    label_accuracy,
    normalise,
)

from test_chat import chat_llama, tokenizer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Positive. ", "positive"),
        ("The   ANSWER\nis  42!", "the answer is 42"),
        ("1,200", "1200"),
        ("1,200.0", "1200"),
        ("12.50", "12.5"),
        ("-7.", "-7"),
        ("**19**", "19"),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_exact_match_normalises_numbers_and_case():
    result = exact_match(["1,200", "Paris.", "12 apples", "7.0"], ["1200", "paris", "12", "7"])
    assert result == {"accuracy": 0.75}
    with pytest.raises(ak.AdapterError, match="2 predictions for 1 gold"):
        exact_match(["a", "b"], ["a"])


def test_label_accuracy_takes_the_first_label_word():
    labels = ["positive", "negative"]
    assert first_label("Negative, not positive", labels) == "negative"
    assert first_label("It is positively great", labels) is None  # whole words only
    assert first_label("", labels) is None
    predicted = ["Positive.", "negative, though at first positive", "I cannot tell", "NEGATIVE"]
    assert label_accuracy(predicted, ["positive", "negative", "negative", "positive"], labels) == {"accuracy": 0.5}
    assert first_label("not bad at all", ["bad", "not bad"]) == "not bad"  # the longer label where both start


def test_first_json_object_skips_malformed_and_keeps_nesting():
    assert first_json_object('Sure: {"a": {"b": [1, {"c": 2}]}, "d": "}"} trailing {"x": 1}') == {
        "a": {"b": [1, {"c": 2}]},
        "d": "}",
    }
    assert first_json_object('{"a": 1,, } then {"b": 2}') == {"b": 2}
    assert first_json_object("[1, 2] {broken") is None
    assert first_json_object("no braces") is None


def test_json_match_rows_and_fields():
    gold = [json.dumps({"name": "Ann Lee", "age": 34, "order": 1200})] * 4
    predicted = [
        'Here: {"name": "ann lee", "age": "34", "order": 1200, "extra": true}',  # case, "34" vs 34, extra key: right
        '{"name": "Ann Lee", "age": 35, "order": 1200}',  # one field wrong
        '{"name": "Ann Lee", "age": 34',  # malformed: nothing parsed
        '```json\n{"name": "Ann Lee", "age": 34, "order": "1,200"}\n```',
    ]
    result = json_match(predicted, gold)
    assert result["accuracy"] == 0.5 and result["parsed"] == 0.75
    assert result["fields"] == {"name": 0.75, "age": 0.5, "order": 0.75}


@pytest.fixture
def llama():
    return chat_llama(), tokenizer()


def test_a_conversation_prompt_equals_its_string(llama):
    model, tok = llama
    as_text = ak.generate(model, tok, ["what is two plus two ?"], max_tokens=4)
    as_messages = ak.generate(model, tok, [[{"role": "user", "content": "what is two plus two ?"}]], max_tokens=4)
    assert as_text == as_messages


def test_evaluate_generations_scores_what_generate_says(llama):
    model, tok = llama
    questions = ["what is two plus two ?", "what is three plus three ?", "what is two plus three ?"]
    rows = [
        [{"role": "system", "content": "what"}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(questions, ["four", "six", "five"], strict=True)
    ]
    result = evaluate_generations(model, tok, rows, "exact", batch_size=2, max_tokens=3)
    by_hand = ak.generate(model, tok, [row[:-1] for row in rows], max_tokens=3)
    assert result["predictions"] == by_hand and result["n"] == 3
    assert result["accuracy"] == exact_match(by_hand, ["four", "six", "five"])["accuracy"]
    labelled = evaluate_generations(model, tok, rows, "label", max_tokens=3)
    assert labelled["accuracy"] == label_accuracy(by_hand, ["four", "six", "five"], ["five", "four", "six"])["accuracy"]
    with pytest.raises(ak.AdapterError, match="unknown scorer"):
        evaluate_generations(model, tok, rows, "bleu")
    with pytest.raises(ak.AdapterError, match="last message is the gold assistant answer"):
        evaluate_generations(model, tok, [row[:-1] for row in rows], "exact")
    assert set(SCORERS) == {"exact", "label", "json"}
