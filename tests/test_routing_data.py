"""The routing benchmark's extra tasks (adapterkit.apps.routing_data): seeded, disjoint splits, right answers."""

import pytest

from adapterkit.apps import routing_data

SIZES = {"train": 30, "validation": 10, "test": 10}


@pytest.mark.parametrize("task", ["topic", "acronym"])
def test_splits_are_seeded_disjoint_and_answered(task):
    first, again = routing_data.splits(task, SIZES), routing_data.splits(task, SIZES)
    assert first == again
    questions = [row[1]["content"] for split in first.values() for row in split]
    assert len(questions) == len(set(questions)) == 50
    for row in first["test"]:
        body = row[1]["content"].split("\n\n", 1)[1]
        if task == "acronym":
            assert row[2]["content"] == "".join(word[0] for word in body.split()).upper()
        else:
            assert any(body.lower().startswith(event) for event in routing_data.TOPICS[row[2]["content"]])


def test_general_prompts_are_split_without_overlap():
    found = routing_data.general(24, 44)
    assert len(found["validation"]) == 24 and len(found["test"]) == 44
    assert not set(found["validation"]) & set(found["test"])
