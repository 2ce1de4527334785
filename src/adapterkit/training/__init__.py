"""Training and evaluation without writing a loop: ``adapterkit train`` / ``eval`` / ``compare``.

>>> from adapterkit.training import TrainConfig, train
>>> train(TrainConfig(model="MODEL_DIR", data="train.jsonl", validation="val.jsonl", output="out"))
"""

from __future__ import annotations

from pathlib import Path

from adapterkit.errors import AdapterError
from adapterkit.runs import RUN_CONFIG, adapter_folder, is_run, run_config
from adapterkit.training.answers import SCORERS, evaluate_generations
from adapterkit.training.loop import TrainConfig, evaluate, load_data, task_model, train
from adapterkit.training.report import compare
from adapterkit.training.tables import DataError, read_table
from adapterkit.training.tasks import TASKS, conversation

__all__ = [
    "RUN_CONFIG",
    "SCORERS",
    "TASKS",
    "DataError",
    "TrainConfig",
    "adapter_folder",
    "compare",
    "is_run",
    "evaluate_output",
    "read_table",
    "run_config",
    "train",
]


def evaluate_output(
    model: str, output: str | Path, data: str, batch_size: int = 64, scorer: str | None = None
) -> dict[str, float]:
    """Score the run in ``output`` (its adapter on base ``model``, or its full model) on ``data``.

    ``scorer`` (``"exact"``, ``"label"`` or ``"json"``, :data:`.answers.SCORERS`): a chat run is
    scored on its generations instead: each conversation's last, assistant message is the gold
    answer to the greedy completion of the messages before it.
    """
    from adapterkit.core import io

    saved = run_config(output)
    config = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    config.model, config.data, config.validation = model, data, None
    task, examples, _, tokenizer = load_data(config, labels=saved["labels"])
    if scorer and task.name != "chat":
        raise AdapterError(f"--generate scores the answers of a chat run; {output} trained task {task.name!r}")
    if config.full_finetune:
        net = task_model(str(Path(output) / "model"), task)
    else:
        net = task_model(model, task)
        io.load_adapter(net, adapter_folder(output), activate=True)
    if not scorer:
        return evaluate(task, net, examples, tokenizer, batch_size)
    table = read_table(data)
    rows = [conversation(table, i, task.text_column, v) for i, v in enumerate(table.column(task.text_column, ""))]
    scores = evaluate_generations(net, tokenizer, rows, scorer, batch_size)
    return {k: v for k, v in scores.items() if k != "predictions"}
