"""``adapterkit eval`` without ``--adapter``: the base model scored zero-shot on the same data and scorer as a
run. A LoRA that never moved from its zero-initialised B (lr 0) is the identity, so its scores are the
base's exactly; a trained one's differ (and are better on the data it learned)."""

import json
from pathlib import Path

import pytest
import torch

from adapterkit.apps import cli
from adapterkit.errors import AdapterError
from adapterkit.training import evaluate_base, evaluate_output

from test_chat import SUMS, chat_llama, conversation, tokenizer


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    chat_llama().save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    rows = [{"messages": conversation(a, b)} for a, b in list(SUMS) * 4]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def trained(work: Path, out: Path, lr: str, steps: str) -> Path:
    args = ["train", "--model", str(work / "llama"), "--data", str(work / "chat.jsonl"), "--task", "chat",
            "--adapter", "lora", "--lr", lr, "--max-steps", steps, "--batch-size", "8", "--max-length", "64",
            "--output", str(out), "--threads", "1"]  # fmt: skip
    assert cli.main(args) == 0
    return out


@pytest.fixture(scope="module")
def identity(work, tmp_path_factory) -> Path:
    return trained(work, tmp_path_factory.mktemp("lr0") / "out", "0", "2")


@pytest.fixture(scope="module")
def learned(work, tmp_path_factory) -> Path:
    return trained(work, tmp_path_factory.mktemp("lr") / "out", "3e-2", "24")


def base(work: Path, **options) -> dict:
    torch.set_num_threads(1)
    return evaluate_base(str(work / "llama"), str(work / "chat.jsonl"), "chat", max_length=64, **options)


def test_a_zero_initialised_lora_scores_what_the_base_scores(work, identity):
    zero_shot, with_adapter = base(work), evaluate_output(str(work / "llama"), identity, str(work / "chat.jsonl"))
    assert zero_shot.keys() == {"perplexity", "loss"} and zero_shot["perplexity"] > 1.5  # a random model
    assert with_adapter == zero_shot  # bit for bit: B = 0 adds exactly nothing


def test_generated_answers_score_the_same_through_the_identity_adapter(work, identity):
    zero_shot = base(work, scorer="exact")
    assert zero_shot == evaluate_output(str(work / "llama"), identity, str(work / "chat.jsonl"), scorer="exact")
    assert zero_shot["n"] == 16 and 0 <= zero_shot["accuracy"] < 0.5  # a random model rarely answers


def test_a_trained_adapter_beats_the_baseline_it_is_compared_with(work, learned):
    zero_shot, with_adapter = base(work), evaluate_output(str(work / "llama"), learned, str(work / "chat.jsonl"))
    assert with_adapter["perplexity"] < zero_shot["perplexity"] / 2
    generated = evaluate_output(str(work / "llama"), learned, str(work / "chat.jsonl"), scorer="exact")
    assert generated["accuracy"] > base(work, scorer="exact")["accuracy"] + 0.5


def test_the_command_line_scores_the_base_without_adapter(work, capsys):
    argv = ["eval", "--model", str(work / "llama"), "--data", str(work / "chat.jsonl"), "--max-length", "64"]
    assert cli.main([*argv, "--task", "chat"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(base(work))
    assert cli.main(argv) == 2
    assert "pass --task chat or causal-lm" in capsys.readouterr().err


def test_a_baseline_needs_a_task_without_a_trained_head(work):
    with pytest.raises(AdapterError, match="'classification' needs the head an adapter run trains"):
        evaluate_base(str(work / "llama"), str(work / "chat.jsonl"), "classification")
    with pytest.raises(AdapterError, match="--generate scores the answers of chat data"):
        evaluate_base(str(work / "llama"), str(work / "chat.jsonl"), "causal-lm", scorer="exact")
