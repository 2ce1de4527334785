"""PyTorch DDP (or FSDP2 with ``--fsdp``) under ``torchrun``: gloo on CPU, NCCL on GPU.

``torchrun --nproc_per_node=N -m adapterkit train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
each rank takes its share of every global batch, DDP averages the gradients of the parameters
that train (adapter and head) and rank 0 alone writes files. Frozen weights are never all-reduced.

With ``fsdp``, ``torch.distributed.fsdp.fully_shard`` also shards the frozen base: each block in the
model's ``_no_split_modules`` (a decoder layer) is one FSDP group and the root holds the rest (embeddings,
final norm), so a rank keeps about 1/N of the base and all-gathers one block at a time for each forward
and backward. The trainable parameters (and whatever else the caller keeps whole: the adapter's and
head's) are FSDP's ``ignored_params``: plain whole tensors on every rank, whose gradients DDP
all-reduces as without ``--fsdp``. That keeps DDP's arithmetic, checkpoints of plain tensors and a
rank-0-only save; the sharded weights are frozen, get no gradient, and FSDP reduce-scatters nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch
import torch.distributed as td
from torch import nn

from adapterkit.core.device import resolve_device

T = TypeVar("T")


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    reduced: list[int] = dataclasses.field(default_factory=list)  # elements all-reduced in each bucket call
    buckets_per_step: int | None = None
    fsdp: bool = False  # shard the frozen base (only when there are several ranks)
    held: dict[str, Any] = dataclasses.field(default_factory=dict)  # the base's elements each rank keeps
    sharded: list[nn.Parameter] = dataclasses.field(default_factory=list)

    @classmethod
    def from_env(cls, fsdp: bool = False, device: str | None = None) -> Distributed:
        """One process, or torchrun's. ``device`` (``--device``; None: CUDA when present): under torchrun
        each process takes the GPU of its ``LOCAL_RANK`` (NCCL), or the CPU (gloo) for ``cpu``."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        chosen = resolve_device(device)
        cuda = chosen.type == "cuda"
        if world == 1:
            return cls(device=chosen)
        backend = "nccl" if cuda else "gloo"
        if cuda:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(chosen)
        td.init_process_group(backend)
        return cls(td.get_rank(), world, chosen, backend, fsdp=fsdp)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, whole: Collection[nn.Parameter] = ()) -> nn.Module:
        """DDP over the trainable parameters only: frozen ones are neither broadcast nor all-reduced.

        With ``fsdp`` the frozen ones not in ``whole`` are sharded in place first (``model`` itself
        becomes the FSDP root); trainable ones always stay whole."""
        if self.world == 1:
            return model
        group = None
        if self.fsdp:
            self._shard(model, {p for p in model.parameters() if p.requires_grad} | set(whole))
            # DDP's bucket all-reduces run asynchronously during backward, while FSDP all-gathers blocks:
            # a group of their own keeps the two streams of collectives from interleaving.
            group = td.new_group(backend=self.backend)
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in model.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=group)
        ddp.register_comm_hook(self, _counting_allreduce)
        return ddp

    def _shard(self, model: nn.Module, whole: set[nn.Parameter]) -> None:
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or ())  # what transformers never splits
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, ignored_params=whole)
        fully_shard(model, ignored_params=whole)
        self.held = self._measure(model)

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        """The sharded base's elements each rank holds (its local shards) against the whole base's."""
        from torch.distributed.tensor import DTensor

        sharded = self.sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        per_rank: list[Any] = [None] * self.world
        td.all_gather_object(per_rank, sum(p.to_local().numel() for p in sharded))
        total = sum(p.numel() for p in sharded)
        whole = sum(p.numel() for p in model.parameters() if not isinstance(p, DTensor))  # on every rank
        return {
            "base_params": total,
            "base_params_per_rank": per_rank,
            "base_share_per_rank": [n / total for n in per_rank],
            "whole_params_per_rank": whole,
        }

    def with_model(self, fn: Callable[[], T]) -> T:
        """``fn()`` that runs the model (evaluation), rank 0's result sent to every rank: under FSDP every
        rank runs it, as each forward all-gathers the shards; otherwise rank 0 alone does."""
        if not self.fsdp:
            return self.from_main(fn)
        box = [fn()]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, rows: list[int]) -> list[int]:
        """This rank's contiguous part of a global batch."""
        return self.parts(rows)[self.rank]

    def parts(self, rows: list[int]) -> list[list[int]]:
        """Every rank's part of a global batch, by rank."""
        n, w = len(rows), self.world
        return [rows[r * n // w : (r + 1) * n // w] for r in range(w)]

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
        out = {"world_size": self.world, "backend": self.backend, "allreduced_elements_per_step": per_step}
        if self.sharded:  # evidence that FSDP reduce-scattered nothing: it would leave a gradient here
            out["sharded_params_with_grad"] = sum(p.grad is not None for p in self.sharded)
        return out | {"fsdp": self.fsdp, **self.held}

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
