"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024): low-rank updates of a frozen weight.

LoRA: ``y = W x + b + s * B A dropout(x)`` with ``s = alpha / r`` (``use_rslora``: ``alpha /
sqrt(r)``). ``A`` (r, in) is Kaiming-uniform (a=sqrt(5)), ``B`` (out, r) zero, so the model is
unchanged at init: peft's and AdapterHub's formula and init. Works on ``nn.Linear``, GPT-2's
``Conv1D`` (weight stored (in, out), peft's ``fan_in_fan_out``), ``nn.Embedding`` (peft's
``lora_embedding_A/B``: A zero, B normal) and ``nn.Conv1d``/``nn.Conv2d`` (A a conv with the host's
kernel, B a 1x1 conv). Mergeable: ``W += s * B A`` in the host's layout.

DoRA (``use_dora``, peft's formula): with ``n = ||W + s B A||`` row-wise (detached) and magnitude
``m`` (init ``||W||``), ``y = W x + b + (m / n - 1) * W x + (m / n) * s * B A x`` (bias excluded
from the rescaling). Merged: ``W' = (m / n) * (W + s B A)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.arch import features, out_in
from adapterkit.core.hosts import stack_rows
from adapterkit.core.methods.base import AdapterModule, check, is_linear, param_dtype
from adapterkit.core.methods.delta import WeightDelta
from adapterkit.core.quantize import dense_weight
from adapterkit.core.state import FIXED
from adapterkit.errors import AdapterError, ConfigError

LoRAConfig = Any  # a methods.lora.LoRAConfig (imported there, not here: lora imports this module)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d))


RESIDUAL = ("pissa", "olora")  # inits that start from the host's weight (and take that start off the update)


class LoRA(WeightDelta):
    """Low-rank update of one linear host: ``(..., in) -> (..., out)`` added to its output."""

    blocks = AdapterModule.blocks | {"arrow"}

    def __init__(self, host: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        dtype, device = param_dtype(host), host.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, fan_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling
        if config.init_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / config.r)
        elif config.init_weights in RESIDUAL:
            self.start_from_weight(host, config)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate = nn.Linear(fan_in, 1, dtype=dtype, device=device) if config.use_gating else None
        if self.gate is not None or self.residual:  # Arrow mixes plain updates: a gate or a start is part of one
            self.blocks = AdapterModule.blocks

    @torch.no_grad()
    def start_from_weight(self, host: nn.Module, config: LoRAConfig) -> None:
        """PiSSA / OLoRA: ``B A`` starts as the host weight's principal part (SVD) or its first ``r`` QR
        columns, and that start ``s B0 A0`` is taken off the update (kept, frozen, under ``fixed``): the model
        is unchanged at init and the base weights are never touched, as peft's residual base computes."""
        weight, r = out_in(host, dense_weight(host)).float(), config.r
        if config.init_weights == "pissa":
            v, sigma, uh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.diag(torch.sqrt(sigma[:r] / config.scaling))
            a, b = root @ uh[:r], v[:, :r] @ root
        else:
            q, rr = torch.linalg.qr(weight)
            a, b = rr[:r], q[:, :r]
        self.lora_A.copy_(a), self.lora_B.copy_(b)
        start = {"lora_A0": self.lora_A.detach().clone(), "lora_B0": self.lora_B.detach().clone()}
        setattr(self, FIXED, nn.ParameterDict(start).requires_grad_(False))

    @property
    def residual(self) -> bool:
        return FIXED in self._modules

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x``, unscaled: ``(..., in) -> (..., out)``."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """``B0 A0 x``, the update PiSSA / OLoRA start from (zero for other inits)."""
        fixed = getattr(self, FIXED)
        return F.linear(F.linear(x, fixed["lora_A0"]), fixed["lora_B0"])

    def adapt(self, host, x, out):
        x = x.to(self.lora_A.dtype)
        dropped = self.dropout(x)
        delta = self.lora(dropped) * self.scaling
        if self.gate is not None:  # UniPELT: a per-example gate, sigmoid averaged over the sequence
            delta = delta * torch.sigmoid(self.gate(dropped)).mean(dim=-2, keepdim=True)
        if self.residual:  # the residual base W - s B0 A0 sees the input without dropout, as in peft
            delta = delta - self.start(x) * self.scaling
        return out + delta.to(out.dtype)

    def row_key(self):
        if not self._batchable():
            return id(self)
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        # the rank too: zero-padding to another adapter's rank would change the reduction order of a row's
        # update, so its result would depend on which adapters share the batch (the serving engine's invariance)
        return (LoRA, *self.lora_A.shape, *self.lora_B.shape[:1], self.lora_A.dtype, p, self.residual)

    def _batchable(self) -> bool:
        # a residual LoRA's start sees the undropped input, so one batched product holds only without dropout
        plain = not (self.residual and isinstance(self.dropout, nn.Dropout))
        return type(self) is LoRA and self.gate is None and plain

    @staticmethod
    def row_tables(modules: list[LoRA]) -> list[torch.Tensor] | None:
        """A and s*B per adapter, a zero adapter for "none" (one rank in a group: ``row_key``). DoRA and gated
        LoRA (None) run each on its own rows."""
        if not modules[0]._batchable():
            return None
        # s B per adapter is the same product (bit for bit) as each adapter's own s * B, made once per table
        # rather than as a scaled copy of every B at every call
        scale = stack_rows([m.scaling for m in modules], device=modules[0].lora_B.device)
        b = stack_rows([m.factors()[1] for m in modules]) * scale.to(modules[0].lora_B.dtype)[:, None, None]
        return [stack_rows([m.factors()[0] for m in modules]), b]  # (n + 1, rank, in), (n + 1, out, rank)

    @staticmethod
    def adapt_tables(host, x, out, rows, modules: list[LoRA]):
        a, b = rows  # (B, rank, in), (B, out, rank)
        x = modules[0].dropout(x.to(a.dtype))
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, out)
        return out + delta.reshape(*x.shape[:-1], -1).to(out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the whole update: a residual LoRA's ``[A; A0]`` and ``[B, -B0]`` (rank 2r)."""
        if not self.residual:
            return self.lora_A, self.lora_B
        fixed = getattr(self, FIXED)
        return torch.cat([self.lora_A, fixed["lora_A0"]]), torch.cat([self.lora_B, -fixed["lora_B0"]], dim=1)

    def delta(self) -> torch.Tensor:
        """``s B A`` (a residual LoRA's ``s (B A - B0 A0)``), shape (out, in)."""
        a, b = self.factors()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def prototype(self) -> torch.Tensor:
        """Arrow's prototype: the top right-singular vector of ``B A`` (in,), float32, of arbitrary sign;
        cached until A or B change. From ``A^T = Q R``, ``B A = (B R^T) Q^T``: the SVD of an (out, r) matrix."""
        key = (self.lora_A._version, self.lora_B._version, self.lora_A.data_ptr(), self.lora_B.data_ptr())
        cached = self.__dict__.get("arrow_cache")
        if cached is None or cached[0] != key:
            q, r = torch.linalg.qr(self.lora_A.float().T)
            _, _, wh = torch.linalg.svd(self.lora_B.float() @ r.T, full_matrices=False)
            self.__dict__["arrow_cache"] = cached = (key, q @ wh[0])
        return cached[1]

    @staticmethod
    def arrow(host, x, out, modules: list[LoRA], top_k: int, temperature: float):
        """peft's Arrow at one site: per token, ``|<x, prototype_e>|`` for each adapter ``e``; the ``top_k``
        largest softmaxed over ``temperature`` (the rest weigh 0); ``out + sum_e w_e s_e B_e A_e x``."""
        x = x.to(modules[0].lora_A.dtype)
        prototypes = torch.stack([m.prototype() for m in modules]).to(x.dtype)  # (E, in)
        similarity = (x @ prototypes.T).abs()  # (..., E)
        top, index = similarity.topk(top_k, dim=-1)
        weights = torch.full_like(similarity, float("-inf")).scatter(-1, index, top / temperature).softmax(dim=-1)
        delta = sum(weights[..., e, None] * m.lora(m.dropout(x)) * m.scaling for e, m in enumerate(modules))
        return out + delta.to(out.dtype)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """``s B A`` in the host's layout (transposed for ``Conv1D``)."""
        return out_in(host, self.delta())

    def merge(self, host: nn.Module) -> None:
        if self.gate is not None:
            raise AdapterError("a gated LoRA depends on its input and cannot be merged")
        super().merge(host)


class DoRA(LoRA):
    """LoRA with a learned per-row magnitude ``lora_magnitude`` (out,)."""

    blocks = AdapterModule.blocks  # its update is not B A alone: Arrow mixes plain LoRAs

    def __init__(self, host: nn.Module, config: LoRAConfig) -> None:
        super().__init__(host, config)
        with torch.no_grad():
            norm = out_in(host, dense_weight(host)).to(self.lora_A.dtype).norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm)
        self.register_buffer("merged_norm", None, persistent=False)

    def scale(self, host: nn.Module) -> torch.Tensor:
        """``m / ||W + s B A||`` per output row, the norm detached as in the DoRA paper."""
        weight = out_in(host, dense_weight(host)).to(self.lora_A.dtype) + self.delta().detach()
        return self.lora_magnitude / weight.norm(dim=1).detach()

    def adapt(self, host, x, out):
        x = self.dropout(x.to(self.lora_A.dtype))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = out.to(x.dtype) - (host.bias if host.bias is not None else 0)
        else:  # the base output of the dropped-out input, as peft
            base = F.linear(x, out_in(host, dense_weight(host)).to(x.dtype))
        scale = self.scale(host)
        return out + ((scale - 1) * base + scale * self.lora(x) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        weight = out_in(host, host.weight)
        self.merged_norm = (weight.to(self.lora_A.dtype) + self.delta()).norm(dim=1)
        factor = (self.lora_magnitude / self.merged_norm)[:, None]
        weight.copy_((factor * (weight + self.delta())).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        weight = out_in(host, host.weight)
        factor = (self.lora_magnitude / self.merged_norm)[:, None]
        weight.copy_((weight / factor - self.delta()).to(weight.dtype))
        self.merged_norm = None


class LoRAEmbedding(WeightDelta):
    """LoRA on an ``nn.Embedding``: ``E[x] + s * (A^T[x]) B^T`` with A (r, num), B (dim, r)."""

    def __init__(self, host: nn.Embedding, config: LoRAConfig) -> None:
        super().__init__()
        dtype, device = param_dtype(host), host.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(config.r, host.num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(host.embedding_dim, config.r, dtype=dtype, device=device))
        nn.init.normal_(self.lora_embedding_B)
        self.scaling = config.scaling

    def adapt(self, host, x, out):
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=host.padding_idx)
        return out + (after_a @ self.lora_embedding_B.T * self.scaling).to(out.dtype)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling  # (num, dim)


class LoRAConv(WeightDelta):
    """LoRA on ``nn.Conv1d``/``nn.Conv2d``: A is a conv like the host's (to r channels), B 1x1."""

    def __init__(self, host: nn.Conv1d | nn.Conv2d, config: LoRAConfig) -> None:
        super().__init__()
        check(host.groups == 1, "LoRA supports convolutions with groups=1 only")
        conv, kw = type(host), dict(bias=False, dtype=param_dtype(host), device=host.weight.device)
        self.lora_A = conv(host.in_channels, config.r, host.kernel_size, host.stride, host.padding, host.dilation, **kw)
        self.lora_B = conv(config.r, host.out_channels, 1, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling

    def adapt(self, host, x, out):
        return out + (self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling).to(
            out.dtype
        )

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """``s * sum_r B[o, r] A[r, i, ...]``, the host's weight shape (out, in, *kernel)."""
        b = self.lora_B.weight.flatten(1)  # (out, r)
        return torch.einsum("or,r...->o...", b, self.lora_A.weight) * self.scaling


def make_lora(host: nn.Module, config: LoRAConfig) -> AdapterModule:
    """The LoRA variant that fits ``host``'s type."""
    if is_linear(host):
        return (DoRA if config.use_dora else LoRA)(host, config)
    if config.use_dora:
        raise ConfigError(f"DoRA supports Linear and Conv1D targets, not {type(host).__name__}")
    return LoRAEmbedding(host, config) if isinstance(host, nn.Embedding) else LoRAConv(host, config)
