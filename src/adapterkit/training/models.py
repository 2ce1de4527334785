"""A run's model: the task's transformers model with the adapter training (or every weight, full
fine-tuning), gradient checkpointing, and its evaluation."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from adapterkit.core import adapters, quantize
from adapterkit.core.backbone import head_parameters
from adapterkit.core.device import to_device
from adapterkit.core.methods import resolve_config
from adapterkit.core.pretrained import from_pretrained
from adapterkit.core.state import is_adapter_param
from adapterkit.errors import AdapterError
from adapterkit.training.config import TrainConfig
from adapterkit.training.tasks import Task

ADAPTER = "task"  # the adapter's name in a run's model


def saved_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``io.save_adapter`` writes: every adapter's and the task head's."""
    return [p for n, p in model.named_parameters() if is_adapter_param(n)] + list(head_parameters(model).values())


def task_model(path: str, task: Task, dtype: torch.dtype | None = None) -> nn.Module:
    """The task's transformers model from folder ``path`` (in ``dtype``, default the checkpoint's); a head of
    another size is created anew."""
    import transformers

    cls = getattr(transformers, task.auto_class)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    # a local folder or a Hub id (core.pretrained: offline and not cached, an error naming HF_HUB_OFFLINE)
    return from_pretrained(cls, path, ignore_mismatched_sizes=True, **kwargs, **task.model_kwargs())


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
