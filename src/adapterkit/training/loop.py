"""``adapterkit train``: one complete, resumable training loop, single process or DDP/FSDP under torchrun.

The run writes to ``output``: ``adapter/`` (the best adapter and head by the validation metric,
or the last when there is no validation set; ``model/`` with ``--full-finetune``),
``train_config.json``, ``metrics.json``, ``training.png``, ``README.md`` (a model card) and
``checkpoints/`` (every ``save_steps`` steps and each epoch's end; see :mod:`.checkpoint`).
Batches are a seeded permutation per epoch, so the data position is (epoch, batch) and a resumed
run repeats an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core import adapters, io, quantize
from adapterkit.core.backbone import head_parameters
from adapterkit.core.state import is_adapter_param
from adapterkit.errors import AdapterError
from adapterkit.files import write_folder
from adapterkit.runs import RUN_CONFIG
from adapterkit.training import checkpoint as ck
from adapterkit.training import report
from adapterkit.training.distributed import Distributed
from adapterkit.training.fit import Loop, Schedule
from adapterkit.training.tables import read_table
from adapterkit.training.tasks import Task, make_task

ADAPTER = "task"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; ``adapterkit train`` options and ``--config run.yaml`` keys."""

    model: str
    data: str
    output: str
    validation: str | None = None
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    adapter: str = "pfeiffer"
    set: dict[str, Any] = dataclasses.field(default_factory=dict)  # adapter config overrides
    full_finetune: bool = False
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None  # default 1e-3 for adapters, 5e-5 for full fine-tuning
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the steps
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 100
    patience: int | None = None  # evaluations without improvement before stopping
    metric: str | None = None  # the selection metric (default: the task's first)
    threads: int | None = None
    resume: bool = False
    fsdp: bool = False  # under torchrun, shard the frozen base with FSDP2 (not part of identity(): same checkpoints)
    group_by_length: bool | None = None  # None: the task's default (on for causal-lm and chat)
    quantize: str | None = None  # "int8" or "int4": the frozen base's Linear weights (core.quantize)

    def __post_init__(self) -> None:
        if self.fsdp and self.full_finetune:
            raise AdapterError("--fsdp shards the frozen base, and --full-finetune freezes nothing; drop --fsdp")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.full_finetune else 1e-3)

    def identity(self) -> dict[str, Any]:
        """The keys a resumed run must share with the run it continues."""
        keep = ("model", "data", "task", "text_column", "label_column", "adapter", "set", "full_finetune")
        order = ("epochs", "max_steps", "lr", "batch_size", "seed", "group_by_length", "quantize")
        return {k: getattr(self, k) for k in (*keep, *order)}


def train(config: TrainConfig, command: str = "") -> dict[str, Any]:
    """Run ``config`` to the end (or resume it); returns what ``metrics.json`` holds.

    ``config.threads`` is applied by the CLI (a process-wide setting); from Python, set torch's
    thread count yourself."""
    dist = Distributed.from_env(fsdp=config.fsdp)
    try:
        return Run(config, dist, command).fit()
    finally:
        dist.close()


class Run:
    """The state of one training run: data, model, optimizer and position."""

    def __init__(self, config: TrainConfig, dist: Distributed, command: str) -> None:
        self.config, self.dist, self.command = config, dist, command
        self.out = Path(config.output)
        self.ckpt_root = self.out / "checkpoints"
        self._check_output()
        self.task, self.train_set, self.val_set, self.tokenizer = load_data(config)
        dist.on_main(lambda: report.write_json(self.out / RUN_CONFIG, self._description()))
        torch.manual_seed(config.seed)  # the new head's and adapter's initial values
        self.model = build_model(config, self.task).to(dist.device)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        # FSDP keeps what save_adapter reads (the adapter and head) whole on every rank: rank 0 saves alone.
        self.wrapped = dist.wrap(self.model, whole=saved_parameters(self.model))
        self.steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        schedule = Schedule(
            config.learning_rate, self.total_steps, config.weight_decay, config.warmup, config.max_grad_norm
        )
        self.position = {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_evals": 0, "stopped": False}
        # training throughput over the whole run, resumes included; slots: tokens with padding
        self.position |= {"examples": 0, "tokens": 0, "slots": 0, "seconds": 0.0}
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.loop = Loop(params, schedule, modules=[self.wrapped], position=self.position)
        self.metric = config.metric or self.task.metrics[0]
        if self.metric not in self.task.metrics:
            raise AdapterError(f"task {self.task.name} reports {self.task.metrics}, not {self.metric!r}")
        self.history: dict[str, list] = {"loss": [], "eval": []}
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
        if not self.position["stopped"]:
            self.loop.run(self._batches, self._loss, self._after_step, self._end_of_epoch, show=self.dist.main)
        return self._finish(self._throughput())

    def _throughput(self) -> float:
        """Training examples per second: steps and their checkpoints, not evaluation."""
        return self.position["examples"] / max(self.position["seconds"], 1e-9)

    def _batches(self, epoch: int) -> list[list[int]]:
        grouped = self.config.group_by_length
        grouped = self.task.group_by_length if grouped is None else grouped
        lengths = [len(e["input_ids"]) for e in self.train_set] if grouped else None
        return epoch_batches(len(self.train_set), self.config.batch_size, self.config.seed, epoch, lengths)

    def _loss(self, rows: list[int]) -> torch.Tensor:
        mine = self.dist.share(rows)
        batch = self.task.collate([self.train_set[i] for i in mine], self.tokenizer.pad_token_id)
        loss = self.task.loss(self.wrapped, {k: v.to(self.dist.device) for k, v in batch.items()})
        # Each rank's mean is weighted by its share of the loss terms (rows, or labelled tokens), so DDP's
        # gradient mean (and the logged mean) is the global one.
        terms = self.task.loss_terms
        return loss * (
            terms([self.train_set[i] for i in mine]) * self.dist.world / terms([self.train_set[i] for i in rows])
        )

    def _length(self, row: int) -> int:
        example = self.train_set[row]
        return len(example.get("input_ids", example.get("input_values", ())))

    def _after_step(self, loss: torch.Tensor, rows: list[int], seconds: float) -> None:
        clock = time.perf_counter()
        self.position["examples"] += len(rows)
        self.position["tokens"] += sum(self._length(i) for i in rows)
        self.position["slots"] += sum(
            len(part) * max(map(self._length, part)) for part in self.dist.parts(rows) if part
        )
        self.history["loss"].append([self.position["step"], self.dist.mean(loss)])
        if self.position["step"] % self.config.save_steps == 0:
            self._checkpoint()
        self.position["seconds"] += seconds + time.perf_counter() - clock

    def _end_of_epoch(self, epoch: int) -> bool:
        if self.val_set:
            scores = self.dist.with_model(lambda: evaluate(self.task, self.model, self.val_set, self.tokenizer))
            self.history["eval"].append({"step": self.position["step"], "epoch": epoch, **scores})
            self._keep_best(scores[self.metric])
        self._checkpoint()
        return self.position["stopped"]

    def _keep_best(self, value: float) -> None:
        best = self.position["best"]
        lower = self.metric in self.task.lower_is_better
        if best is None or (value < best if lower else value > best):
            self.position["best"], self.position["bad_evals"] = value, 0
            self.dist.on_main(self._save_result)
        else:
            self.position["bad_evals"] += 1
            patience = self.config.patience
            self.position["stopped"] = patience is not None and self.position["bad_evals"] >= patience

    def _save_result(self) -> None:
        if not self.config.full_finetune:
            io.save_adapter(self.model, ADAPTER, self.out / "adapter")
            return

        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        write_folder(self.out / "model", fill)

    def _finish(self, examples_per_s: float) -> dict[str, Any]:
        if not self.val_set:
            self.dist.on_main(self._save_result)
        metrics = {
            "task": self.task.name,
            "method": "full fine-tuning" if self.config.full_finetune else self.config.adapter,
            "base_model": self.config.model,
            "trainable_params": self.trainable,
            "total_params": self.total_params,
            "selection_metric": self.metric,
            "best": self.position["best"],
            "steps": self.position["step"],
            "early_stopped": self.position["stopped"],
            "train_examples_per_s": examples_per_s,
            "train_tokens_per_s": self.position["tokens"] / max(self.position["seconds"], 1e-9),
            "padding_share": 1 - self.position["tokens"] / max(self.position["slots"], 1),
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
                "position": self.position,
                "history": self.history,
                "param_groups": groups,
                "scheduler": self.loop.scheduler.state_dict(),
                "rng": rng_json,
                "config": self.config.identity(),
            }
            ck.save_checkpoint(self.ckpt_root, self.position["step"], tensors | {"rng.safetensors": rng_tensors}, state)

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
        ck.set_rng_state(tensors["rng.safetensors"], state["rng"]["python"])
        self.position.update(state["position"])  # the loop shares this dict
        self.history = state["history"]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """The rows of each batch of ``epoch``: a permutation seeded by ``seed + epoch``, cut in order.

    With ``lengths``, rows are grouped by length as transformers' ``group_by_length`` does: each
    run of 50 batches of the permutation is sorted longest first and cut, and the batches are then
    shuffled, so a batch pads to a similar length while every epoch still sees every row once.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    mega = 50 * batch_size
    batches = []
    for start in range(0, n, mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def load_data(config: TrainConfig, labels: list | None = None) -> tuple[Task, list, list, Any]:
    """The task, encoded training and validation examples, tokenizer.

    The labels are learned from the training file unless given (evaluating a finished run).
    """
    from transformers import AutoTokenizer

    task = make_task(
        config.task, text_column=config.text_column, label_column=config.label_column, max_length=config.max_length
    )
    train_table = read_table(config.data)
    if labels is None:
        task.fit_labels(train_table)
    task.labels = task.labels if labels is None else labels
    tokenizer = None if task.name == "ctc" else _load(AutoTokenizer, config.model)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    val = task.encode(read_table(config.validation), tokenizer) if config.validation else []
    return task, task.encode(train_table, tokenizer), val, tokenizer or _NoTokenizer()


class _NoTokenizer:
    """Speech input has no tokenizer; padding uses zeros."""

    pad_token_id = 0

    def save_pretrained(self, path: Path) -> None:
        pass


def _load(auto_class, path: str, **kwargs: Any):
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot load {auto_class.__name__} from {path!r}: {e}") from e


def saved_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``io.save_adapter`` writes: every adapter's and the task head's."""
    return [p for n, p in model.named_parameters() if is_adapter_param(n)] + list(head_parameters(model).values())


def task_model(path: str, task: Task) -> nn.Module:
    """The task's transformers model from folder ``path``; a head of another size is created anew."""
    import transformers

    cls = getattr(transformers, task.auto_class)
    return _load(cls, path, ignore_mismatched_sizes=True, **task.model_kwargs())


def build_model(config: TrainConfig, task: Task) -> nn.Module:
    """The task's model from ``config.model`` with the adapter (or, full fine-tuning, every weight) training."""
    model = task_model(config.model, task)
    if config.quantize and config.full_finetune:
        raise AdapterError("--quantize keeps the frozen base in int8/int4 and --full-finetune trains it: pick one")
    if config.quantize:
        quantize.quantize_base(model, config.quantize)
    if config.full_finetune:
        model.requires_grad_(True)
        return model
    adapters.add_adapter(model, ADAPTER, config.adapter, **config.set)
    adapters.train_adapter(model, ADAPTER)
    return model


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, examples: list, tokenizer, batch_size: int = 64) -> dict[str, float]:
    """The task's metrics on ``examples`` (in order, eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    predicted = []
    for start in range(0, len(examples), batch_size):
        batch = task.collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        predicted += task.predict(model, {k: v.to(device) for k, v in batch.items()})
    return task.score(predicted, task.gold(examples))
