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
import inspect
import json
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core import adapters, io, pretrained, quantize, routing
from adapterkit.core.backbone import head_parameters
from adapterkit.core.device import default_autocast, place, resolve_device, to_device
from adapterkit.core.methods import resolve_config
from adapterkit.core.pretrained import from_pretrained
from adapterkit.core.state import is_adapter_param
from adapterkit.errors import AdapterError
from adapterkit.files import write_folder
from adapterkit.runs import RUN_CONFIG
from adapterkit.training import checkpoint as ck
from adapterkit.training import (
    logs,
    report,
)
from adapterkit.training.distributed import Distributed
from adapterkit.training.fit import Loop, Schedule, method_hooks
from adapterkit.training.precision import Precision
from adapterkit.training.tables import read_table
from adapterkit.training.tasks import TASKS, Task, make_task

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
    dtype: str = "fp32"  # the frozen base's weights: fp32, bf16 or fp16 (training.precision)
    autocast: str | None = None  # the forward under torch.autocast: bf16 or fp16
    adapter_dtype: str = "fp32"  # the adapter's and a trained head's weights (fp32: master weights)
    gradient_checkpointing: bool = False  # not part of identity(): the same gradients, recomputed
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    packing: bool = False  # causal-lm and chat: a micro-batch's examples in one row, without padding
    device: str | None = None  # cpu, cuda or cuda:N (None: cuda when present); not part of identity()
    report_to: str | None = None  # "tensorboard": scalars in OUTPUT/tensorboard (training.logs)
    vision_encoder: str | None = None  # image-chat: the frozen vision model's folder (its projector's input)
    image_size: int = 112  # image-chat: pixels a side the encoder sees
    image_pool: int = 2  # image-chat: patch features average-pooled pool x pool

    def __post_init__(self) -> None:
        if self.fsdp and self.full_finetune:
            raise AdapterError("--fsdp shards the frozen base, and --full-finetune freezes nothing; drop --fsdp")
        Precision(self.dtype, self._compute(), self.adapter_dtype)  # validated at construction
        logs.check_report_to(self.report_to)
        if self.full_finetune and (self.dtype, self.adapter_dtype) != ("fp32", "fp32"):
            raise AdapterError(
                "--full-finetune trains the base's own weights, kept in fp32: drop --dtype/--adapter-dtype "
                "and use --autocast bf16 for half-precision compute"
            )
        if self.packing and self.task in TASKS and not TASKS[self.task].packs:
            raise AdapterError(
                f"--packing joins the examples of a causal LM (causal-lm, chat); {self.task} cannot pack"
            )
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise AdapterError(f"--grad-accum takes a whole number of micro-batches >= 1, not {self.grad_accum!r}")

    @property
    def precision(self) -> Precision:
        return Precision(self.dtype, self._compute(), self.adapter_dtype)

    def _compute(self) -> str | None:
        """The autocast dtype: ``--autocast`` as given (``none``: none), else bf16 on CUDA (core.device)."""
        return default_autocast(self.autocast, resolve_device(self.device))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.full_finetune else 1e-3)

    def identity(self) -> dict[str, Any]:
        """The keys a resumed run must share with the run it continues."""
        keep = ("model", "data", "task", "text_column", "label_column", "adapter", "set", "full_finetune")
        order = ("epochs", "max_steps", "lr", "batch_size", "seed", "group_by_length", "quantize")
        # later options count only when set, so that the checkpoints of runs from before them still resume
        later = {"dtype": "fp32", "autocast": None, "adapter_dtype": "fp32", "grad_accum": 1, "packing": False}
        later |= {"vision_encoder": None, "image_size": 112, "image_pool": 2}
        out = {k: getattr(self, k) for k in (*keep, *order)}
        return out | {k: getattr(self, k) for k, default in later.items() if getattr(self, k) != default}


def train(config: TrainConfig, command: str = "") -> dict[str, Any]:
    """Run ``config`` to the end (or resume it); returns what ``metrics.json`` holds.

    ``config.threads`` is applied by the CLI (a process-wide setting); from Python, set torch's
    thread count yourself."""
    dist = Distributed.from_env(fsdp=config.fsdp, device=config.device)
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
        self.position = {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_evals": 0, "stopped": False}
        # training throughput over the whole run, resumes included; slots: tokens with padding
        self.position |= {"examples": 0, "tokens": 0, "slots": 0, "seconds": 0.0}
        params = [p for p in self.model.parameters() if p.requires_grad]
        scaler = self.precision.scaler(dist.device)
        hooks = method_hooks(self.model, self.total_steps)  # what the method runs besides the loss (AdaLoRA)
        self.loop = Loop(params, schedule, [self.wrapped], self.position, scaler, hooks)
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
            if not self.position["stopped"]:
                steps = (self._batches, self._loss, self._after_step, self._end_of_epoch)
                self.loop.run(*steps, show=self.dist.main, status=self._status)
            return self._finish(self._throughput())
        finally:
            self.logs.close()

    def _status(self) -> dict[str, str]:
        """The progress bar's training tokens per second, over the run so far (beside tqdm's ETA)."""
        return {"tok/s": f"{self.position['tokens'] / max(self.position['seconds'], 1e-9):.0f}"}

    def _throughput(self) -> float:
        """Training examples per second: steps and their checkpoints, not evaluation."""
        return self.position["examples"] / max(self.position["seconds"], 1e-9)

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
        self.position["examples"] += len(rows)
        tokens = sum(self._length(i) for i in rows)
        self.position["tokens"] += tokens
        self.position["slots"] += sum(
            self._slots(part) for micro in self._micro_batches(rows) for part in self.dist.parts(micro)
        )
        self.history["loss"].append([self.position["step"], self.dist.mean(loss)])
        self._log_step(tokens, seconds)
        if self.position["step"] % self.config.save_steps == 0:
            self._checkpoint()
        self.position["seconds"] += seconds + time.perf_counter() - clock

    def _log_step(self, tokens: int, seconds: float) -> None:
        """The step's scalars for ``--report-to`` (the loss as logged in ``metrics.json``)."""
        last = self.loop.last
        values = {"loss": self.history["loss"][-1][1], "learning_rate": last["learning_rate"]}
        values |= {"grad_norm": float(last["grad_norm"]), "tokens_per_s": tokens / max(seconds, 1e-9)}
        self.logs.add("train", self.position["step"], values)

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
            self.history["eval"].append({"step": self.position["step"], "epoch": epoch, **scores})
            self.logs.add("eval", self.position["step"], scores)
            self.logs.flush()  # each evaluation is on disk, also if the run is killed later
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
                "scaler": self.loop.scaler.state_dict() if self.loop.scaler else None,  # fp16's loss scale
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
        if self.loop.scaler and state.get("scaler"):
            self.loop.scaler.load_state_dict(state["scaler"])
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


def micro_batches(rows: list[int], n: int, world: int = 1) -> list[list[int]]:
    """``rows`` cut in order into ``n`` micro-batches (a full step: ``n`` batches of ``batch_size``); fewer
    when a short last step would leave a rank without rows."""
    n = max(1, min(n, len(rows) // max(world, 1)))
    return [rows[k * len(rows) // n : (k + 1) * len(rows) // n] for k in range(n)]


def load_data(config: TrainConfig, labels: list | None = None) -> tuple[Task, list, list, Any]:
    """The task, encoded training and validation examples, tokenizer.

    The labels are learned from the training file unless given (evaluating a finished run).
    """

    task = make_task(
        config.task, text_column=config.text_column, label_column=config.label_column, max_length=config.max_length
    )
    train_table = read_table(config.data)
    if labels is None:
        task.fit_labels(train_table)
    task.labels = task.labels if labels is None else labels
    task.prepare(config)
    preprocessor = getattr(task, "load_preprocessor", None)  # image tasks: the model's image processor
    if preprocessor is not None:
        tokenizer = preprocessor(config.model)
    else:
        tokenizer = None if task.name == "ctc" else pretrained.tokenizer(config.model)
    val = task.encode(read_table(config.validation), tokenizer) if config.validation else []
    return task, task.encode(train_table, tokenizer), val, tokenizer or _NoTokenizer()


class _NoTokenizer:
    """Speech input has no tokenizer; padding uses zeros."""

    pad_token_id = 0

    def save_pretrained(self, path: Path) -> None:
        pass


def _load(auto_class, path: str, **kwargs: Any):
    """From a local folder or a Hub id (core.pretrained: offline and not cached, an error naming HF_HUB_OFFLINE)."""
    return from_pretrained(auto_class, path, **kwargs)


def saved_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``io.save_adapter`` writes: every adapter's and the task head's."""
    return [p for n, p in model.named_parameters() if is_adapter_param(n)] + list(head_parameters(model).values())


def task_model(path: str, task: Task, dtype: torch.dtype | None = None) -> nn.Module:
    """The task's transformers model from folder ``path`` (in ``dtype``, default the checkpoint's); a head of
    another size is created anew."""
    import transformers

    cls = getattr(transformers, task.auto_class)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return _load(cls, path, ignore_mismatched_sizes=True, **kwargs, **task.model_kwargs())


def build_model(config: TrainConfig, task: Task) -> nn.Module:
    """The task's model from ``config.model`` with the adapter (or, full fine-tuning, every weight) training."""
    if config.quantize and config.full_finetune:
        raise AdapterError("--quantize keeps the frozen base in int8/int4 and --full-finetune trains it: pick one")
    model = task_model(config.model, task, config.precision.torch_dtype())
    if config.quantize:
        quantize.quantize_base(model, config.quantize)
    if config.full_finetune:
        model.requires_grad_(True)
    else:
        adapters.add_adapter(model, ADAPTER, task.adapter_config(resolve_config(config.adapter, **config.set)))
        adapters.train_adapter(model, ADAPTER)
        if config.packing:
            check_packable(adapters.known(model, ADAPTER).configs[ADAPTER])
        config.precision.cast_trained(model, [p for p in model.parameters() if p.requires_grad])
    if config.packing and "position_ids" not in inspect.signature(model.forward).parameters:
        raise AdapterError(f"{type(model).__name__} takes no position_ids, so it cannot keep packed examples apart")
    if config.gradient_checkpointing:
        checkpoint_layers(model)
    return model


def check_packable(config: Any) -> None:
    """Refuse ``--packing`` for adapters that see a row as one example: a prompt prepended once per row, or a
    gate averaged over the row (UniPELT's): in a packed row the later examples would miss the prompt, and
    the gate would mix the examples."""
    parts = getattr(config, "configs", None) or (config,)
    whole = sorted({c.method if c.method == "prompt" else f"gated {c.method}" for c in parts if _per_row(c)})
    if whole:
        raise AdapterError(
            f"--packing puts several examples in one row, and a {' and a '.join(whole)} adapter acts on a row "
            "as one example; drop --packing (group_by_length keeps padding low) or pick another adapter"
        )


def _per_row(config: Any) -> bool:
    return config.method == "prompt" or bool(getattr(config, "use_gating", False))


def checkpoint_layers(model: nn.Module) -> None:
    """Gradient checkpointing of each transformers layer, non-reentrant: the frozen base needs no input that
    requires grad, and the adapters' hooks inside a layer run again in its recomputation."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise AdapterError(
            f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing"
        )
    model.activation_checkpointing_enable({"use_reentrant": False})


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, examples: list, tokenizer, batch_size: int = 64) -> dict[str, float]:
    """The task's metrics on ``examples`` (in order, eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    predicted = []
    for start in range(0, len(examples), batch_size):
        batch = task.collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        predicted += task.predict(model, to_device(batch, device))
    return task.score(predicted, task.gold(examples))
