"""`adapterkit train --task chat`: conversations through the tokenizer's chat template, the loss on the
assistant's turns only (a tiny Llama and a word-level tokenizer with a ChatML-like template)."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from adapterkit.apps import cli
from adapterkit.apps.cli import generation
from adapterkit.training import DataError, read_table
from adapterkit.training.data import epoch_batches
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


def chat_llama(**overrides) -> T.LlamaForCausalLM:
    """A tiny random Llama (seed 0, eval mode) over :data:`WORDS`; ``overrides`` change its config."""
    torch.manual_seed(0)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=37, vocab_size=len(WORDS), pad_token_id=0)  # fmt: skip
    return T.LlamaForCausalLM(T.LlamaConfig(**{**settings, **overrides})).eval()


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
    chat_llama().save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    rows = [{"messages": conversation(a, b, system=i % 3 == 0)} for i, (a, b) in enumerate(list(SUMS) * 8)]
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


@pytest.fixture(scope="module")
def trained(work, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["train", "--model", str(work / "llama"), "--data", str(work / "chat.jsonl"), "--validation",
            str(work / "chat.jsonl"), "--task", "chat", "--adapter", "lora", "--set", "r=4", "--lr", "2e-2",
            "--epochs", "20", "--batch-size", "8", "--output", str(out), "--threads", "1"]  # fmt: skip
    assert cli.main(args) == 0
    return out


def test_training_on_chat_learns_the_answers(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    evals = [e["perplexity"] for e in metrics["history"]["eval"]]
    assert metrics["task"] == "chat" and metrics["selection_metric"] == "perplexity"
    assert evals[-1] < evals[0] / 2 and min(evals) < 2.0  # the answers (4 sums, 3 words) become near certain
    assert 0 <= metrics["padding_share"] < 0.2 and metrics["train_tokens_per_s"] > 0


def test_generate_answers_with_the_trained_adapter_and_not_without(work, trained, capsys):
    base = ["generate", "--model", str(work / "llama"), "--max-tokens", "3", "--stop", "<|im_end|>"]
    prompts = [f"what is {a} plus {b} ?" for a, b in SUMS]
    assert cli.main([*base, "--adapter", str(trained), *sum([["--prompt", p] for p in prompts], [])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["completion"].split()[0] for r in rows] == list(SUMS.values())
    assert cli.main([*base, "--prompt", prompts[0]]) == 0  # the random base model does not know
    assert json.loads(capsys.readouterr().out)["completion"].split()[:1] != ["four"]


def test_generate_an_adapter_per_prompt_from_a_jsonl_file(work, trained, tmp_path, capsys):
    rows = [
        {"text": "what is two plus two ?", "adapter": "sums"},
        {"text": "what is two plus two ?", "adapter": "other"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", "--model", str(work / "llama"), "--adapter", f"sums={trained}", "--adapter",
            f"other={trained}/adapter", "--input", str(tmp_path / "in.jsonl"), "--max-tokens", "1"]  # fmt: skip
    assert cli.main(args) == 0
    assert [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()] == ["four", "four"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert cli.main([*args[:-4], "--input", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl, line 1: expected a JSON object with a 'text' field" in capsys.readouterr().err


def test_chat_streams_answers_turn_by_turn(work, trained, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("what is two plus three ?\nwhat is three plus three ?\n\n"))
    args = ["chat", "--model", str(work / "llama"), "--adapter", str(trained), "--max-tokens", "4"]
    assert cli.main([*args, "--stop", "<|im_end|>", "--system", "what is"]) == 0
    assert capsys.readouterr().out.split() == ["five", "six"]


def test_the_sparse_logits_loss_equals_the_models_own_with_the_same_gradients(work):
    """``token_nll`` computes logits only where a label is predicted: same loss and gradients as HF's."""
    model = T.LlamaForCausalLM.from_pretrained(work / "llama")
    task = Chat("text", "label", 64)
    examples = task.encode(read_table(work / "chat.jsonl"), tokenizer())[:6]
    batch = task.collate(examples, 0)
    ours = task.loss(model, batch)
    ours.backward()
    mine = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = model(**batch).loss
    theirs.backward()
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(mine, model.parameters(), strict=True))


def test_grouping_by_length_pads_less_and_keeps_every_row_once():
    lengths = [int(n) for n in torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    plain = epoch_batches(1000, 16, 0, 3)
    grouped = epoch_batches(1000, 16, 0, 3, lengths)

    def padding(batches):
        slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / slots

    assert sorted(i for b in grouped for i in b) == list(range(1000)) and len(grouped) == len(plain)
    assert padding(plain) > 0.4 and padding(grouped) < 0.05
    assert grouped == epoch_batches(1000, 16, 0, 3, lengths) != epoch_batches(1000, 16, 0, 4, lengths)


def test_the_stream_printer_holds_back_what_may_become_a_stop_string(capsys):
    printer = generation.printer(tokenizer(), ["STOP", "\x1b"])
    for piece in ["fo", "ur ST", "O", "P more"]:
        printer.on_finalized_text(piece)
    printer.on_finalized_text("", stream_end=True)
    assert capsys.readouterr().out == "four \n"
    printer = generation.printer(tokenizer(), [])
    printer.on_finalized_text("a\x1b[2Jb", stream_end=True)  # a model's escape codes are shown, not obeyed
    assert capsys.readouterr().out == "a\\x1b[2Jb\n"


def test_generate_streams_one_prompt(work, trained, capsys):
    args = ["generate", "--model", str(work / "llama"), "--adapter", str(trained), "--max-tokens", "3", "--stream"]
    assert cli.main([*args, "--prompt", "what is two plus three ?"]) == 0
    assert capsys.readouterr().out.split() == ["five"]
    assert cli.main([*args, "--prompt", "a", "--prompt", "b"]) == 2
    assert "--stream prints one completion" in capsys.readouterr().err


def test_eval_scores_the_generated_answers(work, trained, tmp_path, capsys):
    rows = [{"messages": conversation(a, b)} for a, b in SUMS]
    rows[1]["messages"][-1]["content"] = "six"  # a wrong gold answer: 3 of 4 match
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--model", str(work / "llama"), "--adapter", str(trained), "--data", str(tmp_path / "test.jsonl")]
    assert cli.main([*args, "--generate", "exact"]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.75, "n": 4}
    assert cli.main([*args, "--generate", "label"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.75
    assert cli.main(args) == 0  # without --generate: the perplexity of the gold answers
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.5
