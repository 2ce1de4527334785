"""``adapterkit train``: one complete, resumable training loop, single process or DDP/FSDP under torchrun.

The run writes to ``output``: ``adapter/`` (the best adapter and head by the validation metric,
or the last when there is no validation set; ``model/`` with ``--full-finetune``),
``train_config.json``, ``metrics.json``, ``training.png``, ``README.md`` (a model card) and
``checkpoints/`` (every ``save_steps`` steps and each epoch's end; see :mod:`.checkpoint`).
Batches are a seeded permutation per epoch, so the data position is (epoch, batch) and a resumed
run repeats an uninterrupted one bit for bit on CPU.

LLM knobs: precision (:mod:`.precision`: ``--dtype``, ``--autocast``, ``--adapter-dtype``),
``--gradient-checkpointing`` (each layer's activations recomputed in the backward), ``--grad-accum N``
(a step of N micro-batches, its loss weighted by loss terms over all of them and all ranks: the
update of one batch N times larger) and ``--packing`` (causal-lm and chat: a micro-batch's examples
end to end in one row, :func:`.tasks.pack_batch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core import io, routing
from adapterkit.core.device import place, to_device
from adapterkit.errors import AdapterError
from adapterkit.files import write_folder
from adapterkit.runs import RUN_CONFIG
from adapterkit.training import checkpoint as ck
from adapterkit.training import logs, report
from adapterkit.training.config import TrainConfig
from adapterkit.training.data import epoch_batches, load_data, micro_batches
from adapterkit.training.distributed import Distributed
from adapterkit.training.fit import Loop, Position, Schedule, method_hooks
from adapterkit.training.models import ADAPTER, build_model, evaluate, saved_parameters
from adapterkit.training.tables import read_table


def train(config: TrainConfig, command: str = "") -> dict[str, Any]:
    """Run ``config`` to the end (or resume it); returns what ``metrics.json`` holds.

    ``config.threads`` is applied by the CLI (a process-wide setting); from Python, set torch's
    thread count yourself."""
    dist = Distributed.from_env(fsdp=config.fsdp, device=config.device)
    try:
        return Run(config, dist, command).fit()
    finally:
        dist.close()


@dataclasses.dataclass
class Progress:
    """What a run keeps besides the loop's :class:`~adapterkit.training.fit.Position`: the best validation
    score and early stopping, and throughput over the whole run, resumes included (``slots``: token slots,
    padding included)."""

    best: float | None = None
    bad_evals: int = 0
    stopped: bool = False
    examples: int = 0
    tokens: int = 0
    slots: int = 0
    seconds: float = 0.0


def restored(kind: type, state: dict[str, Any]):
    """A checkpoint's :class:`Position` or :class:`Progress` (checkpoints before both were split kept one
    ``position`` dict of all their fields)."""
    saved = {**state["position"], **state.get("progress", {})}
    return kind(**{f.name: saved[f.name] for f in dataclasses.fields(kind) if f.name in saved})


class Run:
    """One training run: its data, model, optimizer (in :attr:`loop`, with the position) and progress."""

    def __init__(self, config: TrainConfig, dist: Distributed, command: str) -> None:
        self.config, self.dist, self.command = config, dist, command
        self.out = Path(config.output)
        self.ckpt_root = self.out / "checkpoints"
        self._check_output()
        self.task, self.train_set, self.val_set, self.tokenizer = load_data(config)
        self.precision = config.precision
        dist.on_main(lambda: report.write_json(self.out / RUN_CONFIG, self._description()))
        torch.manual_seed(config.seed)  # the new head's and adapter's initial values
        self.model = place(build_model(config, self.task), dist.device)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        # FSDP keeps what save_adapter reads (the adapter and head) whole on every rank: rank 0 saves alone.
        self.wrapped = dist.wrap(self.model, whole=saved_parameters(self.model))
        self.steps_per_epoch = math.ceil(len(self.train_set) / (config.batch_size * config.grad_accum))
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        schedule = Schedule(
            config.learning_rate, self.total_steps, config.weight_decay, config.warmup, config.max_grad_norm
        )
        self.progress = Progress()
        params = [p for p in self.model.parameters() if p.requires_grad]
        scaler = self.precision.scaler(dist.device)
        hooks = method_hooks(self.model, self.total_steps)  # what the method runs besides the loss (AdaLoRA)
        self.loop = Loop(params, schedule, [self.wrapped], scaler=scaler, hooks=hooks)
        self.metric = config.metric or self.task.metrics[0]
        if self.metric not in self.task.metrics:
            raise AdapterError(f"task {self.task.name} reports {self.task.metrics}, not {self.metric!r}")
        self.history: dict[str, list] = {"loss": [], "eval": []}
        self.logs = logs.reporter(config.report_to, self.out, dist.main)
        if config.resume:
            self._resume()

    def _check_output(self) -> None:
        held = (self.out / "checkpoints" / ck.POINTER).exists()
        if held and not self.config.resume:
            raise AdapterError(
                f"{self.out} already holds a run; pass --resume to continue it or choose another --output"
            )
        if self.dist.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.out).close()
            except OSError as e:
                raise AdapterError(f"cannot write to the output folder {self.out}: {e.strerror or e}") from e

    def _description(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.config), "labels": self.task.labels, "command": self.command}

    # -- the loop (training.fit.Loop) --------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        try:
            if not self.progress.stopped:
                steps = (self._batches, self._loss, self._after_step, self._end_of_epoch)
                self.loop.run(*steps, show=self.dist.main, status=self._status)
            return self._finish(self._throughput())
        finally:
            self.logs.close()

    def _status(self) -> dict[str, str]:
        """The progress bar's training tokens per second, over the run so far (beside tqdm's ETA)."""
        return {"tok/s": f"{self.progress.tokens / max(self.progress.seconds, 1e-9):.0f}"}

    def _throughput(self) -> float:
        """Training examples per second: steps and their checkpoints, not evaluation."""
        return self.progress.examples / max(self.progress.seconds, 1e-9)

    def _batches(self, epoch: int) -> list[list[int]]:
        """Each step's rows: ``batch_size * grad_accum`` of them."""
        grouped = self.config.group_by_length
        # grouping by length saves padding; packed rows have none
        grouped = self.task.group_by_length and not self.config.packing if grouped is None else grouped
        lengths = [len(e["input_ids"]) for e in self.train_set] if grouped else None
        size = self.config.batch_size * self.config.grad_accum
        return epoch_batches(len(self.train_set), size, self.config.seed, epoch, lengths)

    def _micro_batches(self, rows: list[int]) -> list[list[int]]:
        return micro_batches(rows, self.config.grad_accum, self.dist.world)

    def _loss(self, rows: list[int]) -> Iterator[torch.Tensor]:
        """The step's loss, one micro-batch at a time (the loop backpropagates each before the next)."""
        total = self.task.loss_terms([self.train_set[i] for i in rows])
        parts = self._micro_batches(rows)
        ddp = isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        for k, part in enumerate(parts):
            # DDP all-reduces the gradients once a step, in the last micro-batch's backward (run in this block)
            last = k == len(parts) - 1
            with contextlib.nullcontext() if last or not ddp else self.wrapped.no_sync():
                yield self._micro_loss(self.dist.share(part), total)

    def _micro_loss(self, mine: list[int], total: int) -> torch.Tensor:
        """This rank's loss on its rows of one micro-batch, weighted by their share of the step's ``total`` loss
        terms (rows, or labelled tokens): the sum over micro-batches, and DDP's mean over ranks, is the mean
        over the whole step."""
        examples = [self.train_set[i] for i in mine]
        batch = self._collate(examples)
        with self.precision.autocast(self.dist.device):
            loss = self.task.loss(self.wrapped, to_device(batch, self.dist.device))
        return loss * (self.task.loss_terms(examples) * self.dist.world / total)

    def _collate(self, examples: list) -> dict[str, torch.Tensor]:
        return (
            self.task.pack(examples)
            if self.config.packing
            else self.task.collate(examples, self.tokenizer.pad_token_id)
        )

    def _length(self, row: int) -> int:
        example = self.train_set[row]
        return len(example.get("input_ids", example.get("input_values", ())))

    def _after_step(self, loss: torch.Tensor, rows: list[int], seconds: float) -> None:
        clock = time.perf_counter()
        self.progress.examples += len(rows)
        tokens = sum(self._length(i) for i in rows)
        self.progress.tokens += tokens
        self.progress.slots += sum(
            self._slots(part) for micro in self._micro_batches(rows) for part in self.dist.parts(micro)
        )
        self.history["loss"].append([self.loop.position.step, self.dist.mean(loss)])
        self._log_step(tokens, seconds)
        if self.loop.position.step % self.config.save_steps == 0:
            self._checkpoint()
        self.progress.seconds += seconds + time.perf_counter() - clock

    def _log_step(self, tokens: int, seconds: float) -> None:
        """The step's scalars for ``--report-to`` (the loss as logged in ``metrics.json``)."""
        last = self.loop.last
        values = {"loss": self.history["loss"][-1][1], "learning_rate": last["learning_rate"]}
        values |= {"grad_norm": float(last["grad_norm"]), "tokens_per_s": tokens / max(seconds, 1e-9)}
        self.logs.add("train", self.loop.position.step, values)

    def _slots(self, rows: list[int]) -> int:
        """The token slots one rank's rows of a micro-batch fill: padded to the longest, or packed (none padded)."""
        lengths = [self._length(i) for i in rows]
        return sum(lengths) if self.config.packing else len(lengths) * max(lengths, default=0)

    def _end_of_epoch(self, epoch: int) -> bool:
        if self.val_set:

            def scores_now() -> dict[str, float]:
                with self.precision.autocast(self.dist.device):
                    return evaluate(self.task, self.model, self.val_set, self.tokenizer)

            scores = self.dist.with_model(scores_now)
            self.history["eval"].append({"step": self.loop.position.step, "epoch": epoch, **scores})
            self.logs.add("eval", self.loop.position.step, scores)
            self.logs.flush()  # each evaluation is on disk, also if the run is killed later
            self._keep_best(scores[self.metric])
        self._checkpoint()
        return self.progress.stopped

    def _keep_best(self, value: float) -> None:
        best = self.progress.best
        lower = self.metric in self.task.lower_is_better
        if best is None or (value < best if lower else value > best):
            self.progress.best, self.progress.bad_evals = value, 0
            self.dist.on_main(self._save_result)
        else:
            self.progress.bad_evals += 1
            patience = self.config.patience
            self.progress.stopped = patience is not None and self.progress.bad_evals >= patience

    def _save_result(self) -> None:
        if not self.config.full_finetune:
            io.save_adapter(self.model, ADAPTER, self.out / "adapter")
            return

        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        write_folder(self.out / "model", fill)

    def _sign(self) -> None:
        """The saved adapter's routing signature from the training inputs (``ak.Router`` reads it)."""
        inputs = read_table(self.config.data).column(self.task.text_column, "--text-column")
        routing.sign_training_output(self.model, self.tokenizer, inputs, self.out / "adapter")

    def _finish(self, examples_per_s: float) -> dict[str, Any]:
        if not self.val_set:
            self.dist.on_main(self._save_result)
        if not self.config.fsdp:  # the adapter's routing signature (FSDP shards the base: rank 0 alone would hang)
            self.dist.on_main(self._sign)
        metrics = {
            "task": self.task.name,
            "method": "full fine-tuning" if self.config.full_finetune else self.config.adapter,
            "base_model": self.config.model,
            "trainable_params": self.trainable,
            "total_params": self.total_params,
            "selection_metric": self.metric,
            "best": self.progress.best,
            "steps": self.loop.position.step,
            "early_stopped": self.progress.stopped,
            "train_examples_per_s": examples_per_s,
            "train_tokens_per_s": self.progress.tokens / max(self.progress.seconds, 1e-9),
            "padding_share": 1 - self.progress.tokens / max(self.progress.slots, 1),
            "distributed": self.dist.describe(),
            "history": self.history,
        }
        self.dist.on_main(lambda: report.write_all(self.out, metrics, self._description()))
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        def write() -> None:
            opt_tensors, groups = ck.optimizer_state(self.loop.optimizer)
            rng_tensors, rng_json = ck.rng_state()
            tensors = {"trainable.safetensors": ck.trainable_state(self.model), "optimizer.safetensors": opt_tensors}
            state = {
                "position": dataclasses.asdict(self.loop.position),
                "progress": dataclasses.asdict(self.progress),
                "history": self.history,
                "param_groups": groups,
                "scheduler": self.loop.scheduler.state_dict(),
                "scaler": self.loop.scaler.state_dict() if self.loop.scaler else None,  # fp16's loss scale
                "rng": rng_json,
                "config": self.config.identity(),
            }
            ck.save_checkpoint(
                self.ckpt_root, self.loop.position.step, tensors | {"rng.safetensors": rng_tensors}, state
            )

        self.dist.on_main(write)

    def _resume(self) -> None:
        folder = ck.latest(self.ckpt_root)
        if folder is None:
            return  # killed before the first checkpoint: start from the beginning
        tensors, state = ck.load_checkpoint(folder)
        if state["config"] != json.loads(json.dumps(self.config.identity())):
            raise AdapterError(
                f"{folder} was written by a run with other settings ({state['config']}); use another --output"
            )
        ck.load_trainable(self.model, tensors["trainable.safetensors"], folder)
        ck.load_optimizer_state(self.loop.optimizer, tensors["optimizer.safetensors"], state["param_groups"])
        self.loop.scheduler.load_state_dict(state["scheduler"])
        if self.loop.scaler and state.get("scaler"):
            self.loop.scaler.load_state_dict(state["scaler"])
        ck.set_rng_state(tensors["rng.safetensors"], state["rng"]["python"])
        self.loop.position, self.progress = restored(Position, state), restored(Progress, state)
        self.history = state["history"]
