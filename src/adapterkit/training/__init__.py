"""Training and evaluation without writing a loop: ``adapterkit train`` / ``eval`` / ``compare``.

>>> from adapterkit.training import TrainConfig, train
>>> train(TrainConfig(model="MODEL_DIR", data="train.jsonl", validation="val.jsonl", output="out"))
"""

from __future__ import annotations

from pathlib import Path

from adapterkit.runs import RUN_CONFIG, adapter_folder, is_run, run_config
from adapterkit.training.loop import TrainConfig, evaluate, load_data, task_model, train
from adapterkit.training.report import compare
from adapterkit.training.tables import DataError, read_table
from adapterkit.training.tasks import TASKS

__all__ = [
    "RUN_CONFIG",
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


def evaluate_output(model: str, output: str | Path, data: str, batch_size: int = 64) -> dict[str, float]:
    """Score the run in ``output`` (its adapter on base ``model``, or its full model) on ``data``."""
    from adapterkit.core import io

    saved = run_config(output)
    config = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    config.model, config.data, config.validation = model, data, None
    task, examples, _, tokenizer = load_data(config, labels=saved["labels"])
    if config.full_finetune:
        net = task_model(str(Path(output) / "model"), task)
    else:
        net = task_model(model, task)
        io.load_adapter(net, adapter_folder(output), activate=True)
    return evaluate(task, net, examples, tokenizer, batch_size)
