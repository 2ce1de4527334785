"""Where a training run reports its scalars as it goes (``--report-to``): TensorBoard event files in
``OUTPUT/tensorboard/`` (``tensorboard --logdir OUTPUT/tensorboard``), or nowhere but ``metrics.json``.

Per step, under ``train/``: ``loss``, ``learning_rate`` (the rate the step used), ``grad_norm`` (before
clipping, as transformers' Trainer reports it) and ``tokens_per_s``; per evaluation, under ``eval/``,
every metric of the task. Rank 0 alone writes; a resumed run adds a new event file to the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from adapterkit.errors import AdapterError

REPORT_TO = ("none", "tensorboard")
FOLDER = "tensorboard"  # inside the run's output folder


class Reporter(Protocol):
    def add(self, group: str, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NoReport:
    """``--report-to none`` (the default), and every rank but 0."""

    def add(self, group: str, step: int, values: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    """Scalars ``group/name`` in TensorBoard event files under ``folder`` (torch's ``SummaryWriter``)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package for its protobufs
            raise AdapterError(
                "--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                "(or pip install 'adapterkit[logs]')"
            ) from e
        self.writer = SummaryWriter(str(folder))

    def add(self, group: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_report_to(report_to: str | None) -> None:
    if report_to is not None and report_to not in REPORT_TO:
        raise AdapterError(f"--report-to {report_to!r}: choose {' or '.join(REPORT_TO)}")


def reporter(report_to: str | None, output: Path, main: bool = True) -> Reporter:
    """The reporter ``--report-to`` names, writing under ``output``; nothing on ranks other than 0."""
    check_report_to(report_to)
    if report_to == "tensorboard" and main:
        return TensorBoard(output / FOLDER)
    return NoReport()
