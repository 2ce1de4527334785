"""The one training loop: epochs of batches, AdamW with transformers' linear warm-up and decay, gradient
clipping, gradient accumulation and loss scaling, resumable from any position. ``adapterkit train``
(checkpoints, DDP and evaluation hang on its callbacks), the main demo, the multi-task demo and the
speech demo all train through :class:`Loop`.
"""

from __future__ import annotations

import dataclasses
import itertools
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


@dataclasses.dataclass
class Position:
    """Where a loop is: steps taken, and the next batch (``batch``-th of pass ``epoch``) to train on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def method_hooks(model: nn.Module, steps: int) -> list[Any]:
    """The training hooks (``AdapterConfig.training_hook``: AdaLoRA's rank allocation) of the adapters of
    ``model`` that train, for a run of ``steps`` steps."""
    from adapterkit.core import adapters, state

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    hooks = []
    for name, config in adapters.list_adapters(model).items():
        if any(state.is_adapter_param(p, name) for p in trained):
            hooks.append(config.training_hook(model, name, steps))
    return [h for h in hooks if h is not None]


class Loop:
    """Train ``params`` (a list, or AdamW parameter groups with their own ``lr``) on ``schedule``.

    ``position`` (:class:`Position`): where to start, e.g. a resumed run's; the loop advances it. Modules in
    ``modules`` are put in train mode at each epoch's start (evaluation leaves them in eval mode).
    ``scaler`` (a :class:`torch.amp.GradScaler`, for fp16) scales each loss before its backward.
    ``hooks``: what the trained adapters' methods run (``AdapterConfig.training_hook``): each ``regularizer()``
    joins the step's loss, each ``update(step)`` follows the optimiser step, the gradients still there.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Sequence[dict[str, Any]],
        schedule: Schedule,
        modules: Sequence[nn.Module] = (),
        position: Position | None = None,
        scaler: torch.amp.GradScaler | None = None,
        hooks: Sequence[Any] = (),
    ) -> None:
        from transformers import get_linear_schedule_with_warmup

        groups = list(params)
        self.params = [p for g in groups for p in g["params"]] if isinstance(groups[0], dict) else groups
        self.schedule, self.modules, self.scaler, self.hooks = schedule, modules, scaler, list(hooks)
        self.optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
        warmup = max(1, int(schedule.warmup * schedule.steps))
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, schedule.steps)
        self.position = position if position is not None else Position()
        self.last: dict[str, Any] = {}  # the last step's learning rate and gradient norm (a tensor), for logs

    def step(self, loss: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        """One optimisation step on ``loss``, or on the sum of several (micro-batches' losses, each
        backpropagated as it comes, so one micro-batch's graph is held at a time); returns the
        (summed) loss, detached."""
        total = None
        parts = [loss] if isinstance(loss, torch.Tensor) else loss
        for part in itertools.chain(parts, (h.regularizer() for h in self.hooks)):
            (part if self.scaler is None else self.scaler.scale(part)).backward()
            total = part.detach() if total is None else total + part.detach()
        if total is None:
            raise ValueError("a training step needs at least one loss")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.schedule.max_grad_norm:
            norm = nn.utils.clip_grad_norm_(self.params, self.schedule.max_grad_norm)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # the norm before clipping (as transformers' Trainer logs it) and the rate this step uses; kept as
        # a tensor, so that a GPU waits for it only when it is logged
        self.last = {"learning_rate": self.optimizer.param_groups[0]["lr"], "grad_norm": norm}
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the update when a gradient overflowed, and adjusts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        for hook in self.hooks:
            hook.update(self.position.step)
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def run(
        self,
        batches: Callable[[int], Sequence[Any]],
        loss: Callable[[Any], torch.Tensor],
        on_step: Callable[[torch.Tensor, Any, float], None] | None = None,
        on_epoch: Callable[[int], bool] | None = None,
        label: str = "train",
        show: bool = True,
        status: Callable[[], dict[str, str]] | None = None,
    ) -> float:
        """Step through ``batches(epoch)`` until the schedule's last step; returns the seconds spent in steps.

        ``loss(batch)`` returns the batch's loss, or an iterable of its micro-batches' (see :meth:`step`).
        ``on_step(loss, batch, seconds)`` follows each step; ``on_epoch(epoch)`` follows each pass (also one
        the step limit cut short), once the position points at the next epoch, and returns True to stop.
        ``status()`` adds fields to the progress bar after each step (e.g. tokens/s); the bar shows the ETA.
        """
        pos, spent = self.position, 0.0
        bar = tqdm(total=self.schedule.steps, initial=pos.step, desc=label, disable=not show, mininterval=2.0)
        stopped = False
        while pos.step < self.schedule.steps and not stopped:
            for module in self.modules:
                module.train()
            epoch = batches(pos.epoch)
            while pos.batch < len(epoch) and pos.step < self.schedule.steps:
                clock = time.perf_counter()
                value = self.step(loss(epoch[pos.batch]))
                pos.step, pos.batch = pos.step + 1, pos.batch + 1
                if on_step:
                    on_step(value, epoch[pos.batch - 1], time.perf_counter() - clock)
                spent += time.perf_counter() - clock
                shown = {"loss": f"{value.item():.4f}", "s_per_step": f"{spent / max(1, bar.n + 1):.2f}"}
                bar.set_postfix(shown | (status() if status else {}))
                bar.update()
            pos.epoch, pos.batch = pos.epoch + 1, 0
            stopped = bool(on_epoch and on_epoch(pos.epoch - 1))
        bar.close()
        return spent
