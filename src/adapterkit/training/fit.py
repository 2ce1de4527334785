"""The one training loop: epochs of batches, AdamW with transformers' linear warm-up and decay, gradient
clipping, resumable from any position. ``adapterkit train`` (checkpoints, DDP and evaluation hang on its
callbacks), the main demo, the multi-task demo and the speech demo all train through :class:`Loop`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How to optimise: peak learning rate, total steps, AdamW's weight decay, warm-up share, clipping."""

    lr: float
    steps: int
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the steps
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr < 0 or self.steps < 1 or not 0 <= self.warmup < 1:
            raise ValueError(f"a schedule needs lr >= 0, steps >= 1 and warmup in [0, 1): {self}")


class Loop:
    """Train ``params`` (a list, or AdamW parameter groups with their own ``lr``) on ``schedule``.

    ``position`` (step, epoch, batch) may be shared with a caller that checkpoints it; modules in
    ``modules`` are put in train mode at each epoch's start (evaluation leaves them in eval mode).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Sequence[dict[str, Any]],
        schedule: Schedule,
        modules: Sequence[nn.Module] = (),
        position: dict[str, Any] | None = None,
    ) -> None:
        from transformers import get_linear_schedule_with_warmup

        groups = list(params)
        self.params = [p for g in groups for p in g["params"]] if isinstance(groups[0], dict) else groups
        self.schedule, self.modules = schedule, modules
        self.optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
        warmup = max(1, int(schedule.warmup * schedule.steps))
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, schedule.steps)
        self.position = position if position is not None else {}
        for key in ("step", "epoch", "batch"):
            self.position.setdefault(key, 0)

    def step(self, loss: torch.Tensor) -> None:
        """One optimisation step on ``loss``."""
        loss.backward()
        if self.schedule.max_grad_norm:
            nn.utils.clip_grad_norm_(self.params, self.schedule.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(
        self,
        batches: Callable[[int], Sequence[Any]],
        loss: Callable[[Any], torch.Tensor],
        on_step: Callable[[torch.Tensor, Any, float], None] | None = None,
        on_epoch: Callable[[int], bool] | None = None,
        label: str = "train",
        show: bool = True,
    ) -> float:
        """Step through ``batches(epoch)`` until the schedule's last step; returns the seconds spent in steps.

        ``on_step(loss, batch, seconds)`` follows each step; ``on_epoch(epoch)`` follows each pass (also one
        the step limit cut short), once the position points at the next epoch, and returns True to stop.
        """
        pos, spent = self.position, 0.0
        bar = tqdm(total=self.schedule.steps, initial=pos["step"], desc=label, disable=not show, mininterval=2.0)
        stopped = False
        while pos["step"] < self.schedule.steps and not stopped:
            for module in self.modules:
                module.train()
            epoch = batches(pos["epoch"])
            while pos["batch"] < len(epoch) and pos["step"] < self.schedule.steps:
                clock = time.perf_counter()
                value = loss(epoch[pos["batch"]])
                self.step(value)
                pos["step"], pos["batch"] = pos["step"] + 1, pos["batch"] + 1
                if on_step:
                    on_step(value.detach(), epoch[pos["batch"] - 1], time.perf_counter() - clock)
                spent += time.perf_counter() - clock
                bar.set_postfix(loss=f"{value.item():.4f}", s_per_step=f"{spent / max(1, bar.n + 1):.2f}")
                bar.update()
            pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
            stopped = bool(on_epoch and on_epoch(pos["epoch"] - 1))
        bar.close()
        return spent
