"""The folder an ``adapterkit train`` run writes (torch-free, so the hub and the CLI can read it):
``train_config.json`` marks it, ``adapter/`` (or ``model/``) holds the result, ``metrics.json`` the scores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError

RUN_CONFIG = "train_config.json"  # marks an `adapterkit train` output folder
# The tasks `adapterkit train` knows, named here so that the CLI's parser needs no torch
# (training.tasks.TASKS holds the classes; a test keeps the two equal).
TASK_NAMES = ("classification", "regression", "token-classification", "ctc", "causal-lm", "chat")
TASK_NAMES += ("image-classification", "image-chat")


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ``adapterkit train`` output folder."""
    return (Path(path) / RUN_CONFIG).is_file()


def adapter_folder(path: str | os.PathLike) -> Path:
    """The ``adapter/`` inside an ``adapterkit train`` output; any other path as it is."""
    return Path(path) / "adapter" if is_run(path) else Path(path)


def run_config(output: str | os.PathLike) -> dict[str, Any]:
    """The ``train_config.json`` of a finished (or running) ``adapterkit train`` output folder."""
    if not is_run(output):
        raise AdapterError(f"{output} has no {RUN_CONFIG}: not an `adapterkit train` output folder")
    return json.loads((Path(output) / RUN_CONFIG).read_text())
