"""Token classification reports entity-level F1 (as seqeval and conlleval compute it) and token accuracy."""

import pytest

from adapterkit.training.tasks import TokenClassification, entities


def score(gold, predicted):
    task = TokenClassification("tokens", "tags", 32)
    task.labels = sorted({t for row in gold + predicted for t in row})
    index = {t: i for i, t in enumerate(task.labels)}
    return task.score([[index[t] for t in row] for row in predicted], [[index[t] for t in row] for row in gold])


def test_seqeval_documentation_example():
    # seqeval's README: f1_score(y_true, y_pred) == 0.50 (one of two entities found, one of two predicted right)
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predicted = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = score(gold, predicted)
    assert scores["f1"] == pytest.approx(0.5) and scores["precision"] == scores["recall"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(8 / 10)  # token accuracy is reported apart


def test_chunks_of_every_scheme():
    assert entities(["B-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == {
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("ORG", 5, 5)}  # fmt: skip
    assert entities(["S-X", "B-Y", "E-Y", "S-X", "E-Z"]) == {("X", 0, 0), ("Y", 1, 2), ("X", 3, 3), ("Z", 4, 4)}
    assert entities(["POL", "POL", "O", "POL"]) == {("POL", 0, 1), ("POL", 3, 3)}  # tags without a prefix
    assert entities(["O", "O"]) == set()


def test_a_partly_found_entity_counts_as_missed():
    # Token-level scoring would give this 2 of 3 tags right; an entity is found only whole.
    scores = score([["B-PER", "I-PER", "I-PER"]], [["B-PER", "I-PER", "O"]])
    assert scores["f1"] == 0.0 and scores["accuracy"] == pytest.approx(2 / 3)
    assert score([["O"]], [["O"]])["f1"] == 1.0  # nothing to find, nothing found
