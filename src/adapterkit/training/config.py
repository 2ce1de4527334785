"""``adapterkit train``'s settings (:class:`TrainConfig`): the CLI's options and a ``--config run.yaml``'s keys,
validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterkit.core.device import default_autocast, resolve_device
from adapterkit.errors import AdapterError
from adapterkit.training import logs
from adapterkit.training.precision import Precision
from adapterkit.training.tasks import TASKS


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
