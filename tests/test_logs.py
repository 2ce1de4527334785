"""``--report-to tensorboard``: the scalars a run writes, read back with TensorBoard's own event reader and
compared with ``metrics.json``, the learning-rate schedule and a recomputed gradient; the progress bar's
tokens/s and ETA."""

import json
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adapterkit.apps import cli
from adapterkit.errors import AdapterError
from adapterkit.training import TrainConfig, train
from adapterkit.training.distributed import Distributed
from adapterkit.training.loop import Run

from test_chat import SUMS, chat_llama, conversation, tokenizer

LR, STEPS = 1e-2, 4


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    chat_llama().save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    rows = [{"messages": conversation(a, b, system=i % 2 == 0)} for i, (a, b) in enumerate(list(SUMS) * 4)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(work: Path, out: Path, **options) -> TrainConfig:
    settings = dict(model=str(work / "llama"), data=str(work / "chat.jsonl"), validation=str(work / "chat.jsonl"),
                    output=str(out), task="chat", adapter="lora", lr=LR, max_steps=STEPS, batch_size=4,
                    report_to="tensorboard")  # fmt: skip
    return TrainConfig(**settings | options)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def logged(work, tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("run") / "out"
    torch.set_num_threads(1)
    metrics = train(config(work, out))
    return metrics, scalars(out / "tensorboard")


def test_tensorboard_reads_the_runs_loss_and_eval_metrics(logged):
    metrics, tb = logged
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= set(tb)
    assert {"eval/perplexity", "eval/loss"} <= set(tb)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in tb["train/loss"]] == pytest.approx([v for _, v in metrics["history"]["loss"]], rel=1e-6)
    [evaluation] = metrics["history"]["eval"]  # max_steps ends the first epoch: one evaluation
    assert tb["eval/perplexity"] == [(STEPS, pytest.approx(evaluation["perplexity"], rel=1e-6))]
    assert tb["eval/loss"] == [(STEPS, pytest.approx(evaluation["loss"], rel=1e-6))]


def test_the_logged_learning_rate_is_the_one_each_step_used(logged):
    """transformers' linear schedule, warm-up of max(1, 6% of 4) = 1 step: 0, then LR decaying to LR / 3."""
    _, tb = logged
    assert [v for _, v in tb["train/learning_rate"]] == pytest.approx([0, LR, LR * 2 / 3, LR / 3], rel=1e-6)


def test_the_logged_grad_norm_is_the_first_batchs_gradient_norm(logged, work, tmp_path):
    """Recomputed on a fresh run of the same config (same seed, same first batch): the norm before clipping."""
    _, tb = logged
    run = Run(config(work, tmp_path / "again", report_to=None), Distributed(), command="")
    run.wrapped.train()
    for part in run._loss(run._batches(0)[0]):
        part.backward()
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norm > 1.0  # above --max-grad-norm: the norm logged is the one before clipping
    assert tb["train/grad_norm"][0] == (1, pytest.approx(norm, rel=1e-5))
    assert all(v > 0 and v == v for _, v in tb["train/grad_norm"])


def test_tokens_per_second_per_step_bounds_the_runs_rate(logged):
    metrics, tb = logged
    rates = [v for _, v in tb["train/tokens_per_s"]]
    assert len(rates) == STEPS and min(rates) > 0
    # the run's rate counts checkpoint time as well: it cannot beat its fastest step
    assert 0 < metrics["train_tokens_per_s"] <= max(rates) * (1 + 1e-6)


def test_the_progress_bar_shows_tokens_per_second_and_the_eta(work, tmp_path, capsys):
    args = ["train", "--model", str(work / "llama"), "--data", str(work / "chat.jsonl"), "--task", "chat",
            "--adapter", "lora", "--max-steps", "3", "--batch-size", "8", "--output", str(tmp_path / "o")]  # fmt: skip
    assert cli.main([*args, "--threads", "1"]) == 0
    bar = capsys.readouterr().err
    final = json.loads((tmp_path / "o" / "metrics.json").read_text())["train_tokens_per_s"]
    shown = [float(v) for v in re.findall(r"tok/s=(\d+)", bar)]
    assert shown and shown[-1] == pytest.approx(final, abs=1)  # the last value is the run's rate
    assert re.search(r"3/3 \[\d\d:\d\d<00:00", bar)  # elapsed<remaining: tqdm's ETA
    assert not (tmp_path / "o" / "tensorboard").exists()  # no --report-to: no event files


def test_report_to_takes_none_or_tensorboard():
    with pytest.raises(AdapterError, match="--report-to 'wandb': choose none or tensorboard"):
        TrainConfig(model="m", data="d", output="o", report_to="wandb")
