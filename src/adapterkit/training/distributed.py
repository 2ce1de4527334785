"""PyTorch DDP under ``torchrun``: gloo on CPU, NCCL on GPU; frozen weights are never communicated.

``torchrun --nproc_per_node=N -m adapterkit train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
each rank takes its share of every global batch, DDP averages the gradients of the parameters
that train (adapter and head) and rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as td
from torch import nn

T = TypeVar("T")


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    reduced: list[int] = dataclasses.field(default_factory=list)  # elements all-reduced in each bucket call
    buckets_per_step: int | None = None

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        backend = "nccl" if cuda else "gloo"
        device = torch.device("cpu")
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        td.init_process_group(backend)
        return cls(td.get_rank(), world, device, backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the trainable parameters only: frozen ones are neither broadcast nor all-reduced."""
        if self.world == 1:
            return model
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in model.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        ddp.register_comm_hook(self, _counting_allreduce)
        return ddp

    def share(self, rows: list[int]) -> list[int]:
        """This rank's contiguous part of a global batch."""
        n = len(rows)
        return rows[self.rank * n // self.world : (self.rank + 1) * n // self.world]

    def mean(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.clone()
            td.all_reduce(value)
            value /= self.world
        return value.item()

    def on_main(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on rank 0 (file writes); the others wait for it."""
        if self.main:
            fn()
        self.barrier()

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed on rank 0 and sent to every rank."""
        box = [fn() if self.main else None]
        if self.world > 1:
            td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()

    def describe(self) -> dict[str, Any]:
        per_step = sum(self.reduced[: self.buckets_per_step]) if self.buckets_per_step else 0
        return {"world_size": self.world, "backend": self.backend, "allreduced_elements_per_step": per_step}

    def close(self) -> None:
        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()


def _counting_allreduce(state, bucket):  # no annotations: DDP checks them, and these would be strings
    """DDP's default all-reduce (mean) of a ``GradBucket``, recording how many elements each bucket sends."""
    if bucket.is_last() and state.buckets_per_step is None:
        state.buckets_per_step = len(state.reduced) + 1
    state.reduced.append(bucket.buffer().numel())
    tensor = bucket.buffer().div_(state.world)
    return td.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])
