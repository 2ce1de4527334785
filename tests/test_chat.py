"""`adapterkit train --task chat`: conversations through the tokenizer's chat template, the loss on the
assistant's turns only (a tiny Llama and a word-level tokenizer with a ChatML-like template)."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from adapterkit.apps import cli
from adapterkit.training import DataError, read_table
from adapterkit.training.tasks import IGNORE, Chat

WORDS = [
    "<pad>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "user",
    "assistant",
    "system",
    "what",
    "is",
    "two",
    "three",
    "plus",
    "four",
    "five",
    "six",
    "?",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
SUMS = {("two", "two"): "four", ("two", "three"): "five", ("three", "three"): "six", ("two", "four"): "six"}


def tokenizer() -> T.PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tok.chat_template = TEMPLATE
    return tok


def conversation(a: str, b: str, system: bool = False) -> list[dict]:
    turns = [{"role": "system", "content": "what is"}] if system else []
    return [
        *turns,
        {"role": "user", "content": f"what is {a} plus {b} ?"},
        {"role": "assistant", "content": SUMS[a, b]},
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=37, vocab_size=len(WORDS), pad_token_id=0)  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    rows = [{"messages": conversation(a, b, system=i % 2 == 0)} for i, (a, b) in enumerate(list(SUMS) * 8)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_only_the_assistant_turns_carry_labels(work):
    task = Chat("text", "label", 64)
    assert task.text_column == "messages"
    two_turns = [*conversation("two", "two"), {"role": "user", "content": "what is"},
                 {"role": "assistant", "content": "five"}]  # fmt: skip
    (work / "two.jsonl").write_text(json.dumps({"messages": two_turns}) + "\n")
    [example] = task.encode(read_table(work / "two.jsonl"), tokenizer())
    words = tokenizer().convert_ids_to_tokens(example["input_ids"])
    learned = [w for w, y in zip(words, example["labels"], strict=True) if y != IGNORE]
    assert learned == ["four", "<|im_end|>", "five", "<|im_end|>"]  # not the prompts, headers or user turns
    assert [y for y in example["labels"] if y != IGNORE] == [i for i, y in zip(example["input_ids"], example["labels"],
                                                                strict=True) if y != IGNORE]  # fmt: skip


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"messages": [{"role": "user", "content": "what is"}]}, "no assistant message"),
        ({"messages": "not json"}, "not a JSON list of messages"),
        ({"messages": [{"role": "user"}]}, "expected a list of"),
    ],
)
def test_bad_conversations_name_their_row(work, row, problem):
    (work / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl, line 1, column 'messages': {problem}"):
        Chat("text", "label", 64).encode(read_table(work / "bad.jsonl"), tokenizer())


def test_training_on_chat_learns_the_answers(work, tmp_path):
    args = ["train", "--model", str(work / "llama"), "--data", str(work / "chat.jsonl"), "--validation",
            str(work / "chat.jsonl"), "--task", "chat", "--adapter", "lora", "--set", "r=4", "--lr", "2e-2",
            "--epochs", "8", "--batch-size", "8", "--output", str(tmp_path / "out"), "--threads", "1"]  # fmt: skip
    assert cli.main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    evals = [e["perplexity"] for e in metrics["history"]["eval"]]
    assert metrics["task"] == "chat" and metrics["selection_metric"] == "perplexity"
    assert evals[-1] < evals[0] / 2 and min(evals) < 2.0  # the answers (4 sums, 3 words) become near certain
