"""Training and evaluation without writing a loop: ``adapterkit train`` / ``eval`` / ``compare``.

>>> from adapterkit.training import TrainConfig, train
>>> train(TrainConfig(model="MODEL_DIR", data="train.jsonl", validation="val.jsonl", output="out"))
"""

from __future__ import annotations

from pathlib import Path

from adapterkit.core.device import place, resolve_device
from adapterkit.errors import AdapterError
from adapterkit.runs import RUN_CONFIG, adapter_folder, is_run, run_config
from adapterkit.training.answers import SCORERS, evaluate_generations
from adapterkit.training.config import TrainConfig
from adapterkit.training.data import load_data
from adapterkit.training.loop import train
from adapterkit.training.models import evaluate, task_model
from adapterkit.training.report import compare
from adapterkit.training.tables import DataError, read_table
from adapterkit.training.tasks import TASKS, conversation

__all__ = [
    "RUN_CONFIG",
    "SCORERS",
    "TASKS",
    "ZERO_SHOT",
    "DataError",
    "TrainConfig",
    "adapter_folder",
    "compare",
    "is_run",
    "evaluate_base",
    "evaluate_output",
    "read_table",
    "run_config",
    "train",
]


ZERO_SHOT = ("causal-lm", "chat")  # the tasks a base model does without a trained head


def evaluate_output(
    model: str,
    output: str | Path,
    data: str,
    batch_size: int = 64,
    scorer: str | None = None,
    device: str | None = None,
    autocast: str | None = None,
) -> dict[str, float]:
    """Score the run in ``output`` (its adapter on base ``model``, or its full model) on ``data``.

    ``scorer`` (``"exact"``, ``"label"`` or ``"json"``, :data:`.answers.SCORERS`): a chat run is
    scored on its generations instead: each conversation's last, assistant message is the gold
    answer to the greedy completion of the messages before it. ``device``: ``cpu``, ``cuda`` (None:
    CUDA when present); ``autocast``: ``bf16``, ``fp16`` or ``none`` (None: the run's own, else bf16 on CUDA).
    """
    from adapterkit.core import io

    saved = run_config(output)
    fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    fields |= {"model": model, "data": data, "validation": None, "device": device}
    config = TrainConfig(**fields | ({"autocast": autocast} if autocast else {}))
    task, examples, _, tokenizer = load_data(config, labels=saved["labels"])
    if scorer and task.name != "chat":
        raise AdapterError(f"--generate scores the answers of a chat run; {output} trained task {task.name!r}")
    if config.full_finetune:
        net = task_model(str(Path(output) / "model"), task)
    else:
        net = task_model(model, task)
        io.load_adapter(net, adapter_folder(output), activate=True)
    return _score(config, task, net, examples, tokenizer, scorer, batch_size)


def evaluate_base(
    model: str,
    data: str,
    task: str = "chat",
    batch_size: int = 64,
    scorer: str | None = None,
    *,
    text_column: str = "text",
    max_length: int = 128,
    device: str | None = None,
    autocast: str | None = None,
) -> dict[str, float]:
    """Score base ``model`` itself, without an adapter (the zero-shot baseline), on ``data``: the same
    task, metrics and ``scorer`` as :func:`evaluate_output`, so the two numbers say what an adapter
    bought. ``task`` is ``causal-lm`` or ``chat`` (:data:`ZERO_SHOT`: other tasks need a trained head);
    ``text_column`` and ``max_length`` as for training (give a run's own to compare with it).
    """
    if task not in ZERO_SHOT:
        raise AdapterError(
            f"a zero-shot baseline scores a base model on a task it does without a trained head "
            f"({' or '.join(ZERO_SHOT)}); {task!r} needs the head an adapter run trains: pass --adapter OUT"
        )
    if scorer and task != "chat":
        raise AdapterError(f"--generate scores the answers of chat data; pass --task chat, not {task!r}")
    config = TrainConfig(model=model, data=data, output="", task=task, text_column=text_column,
                         max_length=max_length, device=device, autocast=autocast)  # fmt: skip
    chosen, examples, _, tokenizer = load_data(config)
    return _score(config, chosen, task_model(model, chosen), examples, tokenizer, scorer, batch_size)


def _score(config: TrainConfig, task, net, examples: list, tokenizer, scorer: str | None, batch_size: int):
    """``net``'s metrics on ``examples`` (or, with ``scorer``, on its greedy answers to ``config.data``'s
    conversations), computed on ``config.device`` under its autocast."""
    device = resolve_device(config.device)
    net = place(net, device)
    with config.precision.autocast(device):
        if not scorer:
            return evaluate(task, net, examples, tokenizer, batch_size)
        table = read_table(config.data)
        column = task.text_column
        rows = [conversation(table, i, column, v) for i, v in enumerate(table.column(column, ""))]
        scores = evaluate_generations(net, tokenizer, rows, scorer, batch_size)
    return {k: v for k, v in scores.items() if k != "predictions"}
