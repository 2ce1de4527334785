"""Training and evaluation without writing a loop: ``adapterkit train`` / ``eval`` / ``compare``.

>>> from adapterkit.training import TrainConfig, train
>>> train(TrainConfig(model="MODEL_DIR", data="train.jsonl", validation="val.jsonl", output="out"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from .loop import TrainConfig, evaluate, load_data, task_model, train
from .report import RUN_CONFIG, adapter_folder, compare, is_run
from .tables import DataError, read_table
from .tasks import TASKS

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


def run_config(output: str | Path) -> dict[str, Any]:
    """The ``train_config.json`` of a finished (or running) ``adapterkit train`` output folder."""
    if not is_run(output):
        raise AdapterError(f"{output} has no {RUN_CONFIG}: not an `adapterkit train` output folder")
    return json.loads((Path(output) / RUN_CONFIG).read_text())


def evaluate_output(model: str, output: str | Path, data: str, batch_size: int = 64) -> dict[str, float]:
    """Score the run in ``output`` (its adapter on base ``model``, or its full model) on ``data``."""
    from .. import io

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
