"""Precision of a training run: the frozen base's weights, the compute, and the weights that train.

``--dtype bf16`` loads the frozen base in bf16 (half its memory); ``--autocast bf16`` runs the forward
under :func:`torch.autocast` (matrix products in bf16, reductions in fp32) whatever the weights' dtype;
``--adapter-dtype`` is the dtype of what trains (the adapter and a trained head): fp32 by default, so
the optimizer updates full-precision master weights even on a bf16 base. fp16 (weights or compute)
gets a :class:`torch.amp.GradScaler`: fp16's narrow range would flush small gradients to zero.

The adapter is saved in the dtype it trained in; it loads into a base of any dtype (the adapter's
values are cast on load, and :func:`adapterkit.core.backbone.same_base` compares fingerprints with a
tolerance wider than bf16's rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from adapterkit.core.backbone import head_parameters
from adapterkit.errors import AdapterError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = ("bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Precision:
    """``weights``: the frozen base's dtype; ``compute``: autocast's dtype (None: no autocast);
    ``trained``: the adapter's and trained head's dtype (fp32 or bf16). Names as in :data:`DTYPES`."""

    weights: str = "fp32"
    compute: str | None = None
    trained: str = "fp32"

    def __post_init__(self) -> None:
        for option, value in (("--dtype", self.weights), ("--adapter-dtype", self.trained)):
            if value not in DTYPES:
                raise AdapterError(f"{option} {value!r}: choose one of {', '.join(DTYPES)}")
        # torch's GradScaler refuses to unscale fp16 gradients, and without one they underflow
        if self.trained == "fp16":
            raise AdapterError("--adapter-dtype fp16: fp16 weights cannot train with a loss scaler; use fp32 or bf16")
        if self.compute is not None and self.compute not in AUTOCAST:
            raise AdapterError(f"--autocast {self.compute!r}: choose bf16 or fp16 (leave it out for no autocast)")

    @property
    def uses_fp16(self) -> bool:
        return "fp16" in (self.weights, self.compute)

    def torch_dtype(self) -> torch.dtype:
        """The dtype to load the base in."""
        return DTYPES[self.weights]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward's context: :func:`torch.autocast` on ``device``'s type, or nothing."""
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=DTYPES[self.compute])

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A loss scaler when fp16 is involved (on CUDA, and on CPU, where torch has one too)."""
        return torch.amp.GradScaler(device.type) if self.uses_fp16 else None

    def cast_trained(self, model: nn.Module, trained: Collection[nn.Parameter]) -> None:
        """Put the ``trained`` parameters in ``self.trained``'s dtype.

        Adapters cast their input to their own dtype; a trained head does not, so a head whose dtype now
        differs from the base's casts its inputs (a forward pre-hook), and its output is in its dtype.
        """
        dtype = DTYPES[self.trained]
        wanted = {id(p) for p in trained}
        for p in model.parameters():
            if id(p) in wanted and p.is_floating_point():
                p.data = p.data.to(dtype)
        heads = {name.split(".")[0] for name, p in head_parameters(model).items() if id(p) in wanted}
        if dtype != DTYPES[self.weights]:
            for name in sorted(heads):
                model.get_submodule(name).register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True)


def _cast_inputs(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict[str, Any]]:
        def cast(v: Any) -> Any:
            return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}

    return hook
