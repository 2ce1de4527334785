"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget is moved, during training, to the layers
that matter.

``y = W x + b + B (E ⊙ A) dropout(x) * alpha / (r0 + 1e-5)``: ``A`` (r, in) and ``B`` (out, r) normal(0,
0.02), the singular values ``E`` (r, 1) zero (the model is unchanged at init), ``r0 = init_r`` (peft keeps it
after pruning). :class:`RankAllocator` is peft's schedule: each step it tracks every entry's sensitivity
``|p * grad|`` (EMA ``beta1``) and its uncertainty (EMA ``beta2``); a triplet's score is its ``E``'s plus the
mean of its ``A`` row's and ``B`` column's; the budget falls cubically from ``init_r`` to ``target_r`` per
layer between step ``tinit`` and ``total_step - tfinal``, and every ``deltaT`` steps the lowest-scoring
triplets' ``E`` are zeroed; after that the final pattern stays. Its ``regularizer()`` is peft's orthogonality
penalty ``mean ||A A^T - I||_F, ||B^T B - I||_F`` times ``orth_reg_weight``. ``adapterkit train`` runs both
(``training.fit.Loop``'s hooks); a loop of one's own calls them the same way. Mergeable, per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.arch import ArchSpec, features, out_in, spec_for
from adapterkit.core.entries import Entry
from adapterkit.core.hosts import stack_rows
from adapterkit.core.methods.base import AdapterConfig, check, lora_targets, param_dtype
from adapterkit.core.methods.delta import WeightDelta
from adapterkit.core.peft_spec import PeftFormat, fan_in_fan_out, targets
from adapterkit.core.state import adapter_modules


class SVDLoRA(WeightDelta):
    """``(..., in) -> (..., out)``: the host's output plus the scaled ``B (E ⊙ A) x``."""

    def __init__(self, host: nn.Module, config: AdaLoRAConfig, rank: int) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        kw = dict(dtype=param_dtype(host), device=host.weight.device)
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(fan_out, rank, **kw) * 0.02)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling = (config.lora_alpha or config.init_r) / (config.init_r + 1e-5)

    def adapt(self, host, x, out):
        x = self.dropout(x.to(self.lora_A.dtype))
        return out + (F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return out_in(host, self.lora_B @ (self.lora_A * self.lora_E) * self.scaling)

    def row_key(self):
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return (SVDLoRA, *self.lora_A.shape, self.lora_B.shape[0], self.lora_A.dtype, p)

    @staticmethod
    def row_tables(modules: list[SVDLoRA]) -> list[torch.Tensor]:
        a = stack_rows([m.lora_A * m.lora_E for m in modules])  # (n + 1, r, in)
        return [a, stack_rows([m.lora_B * m.scaling for m in modules])]  # (n + 1, out, r)

    @staticmethod
    def adapt_tables(host, x, out, rows, modules):
        a, b = rows
        x = modules[0].dropout(x.to(a.dtype))
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return out + delta.reshape(*x.shape[:-1], -1).to(out.dtype)


class RankAllocator:
    """peft's budget schedule and pruning for adapter ``name`` of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, name: str, config: AdaLoRAConfig, total_step: int | None = None) -> None:
        self.config, self.total = config, config.total_step or total_step
        check(bool(self.total), "AdaLoRA needs total_step (the steps of training) for its budget schedule")
        check(config.tinit < self.total - config.tfinal, "AdaLoRA needs tinit < total_step - tfinal")
        self.modules = [m for _, m in adapter_modules(model, name) if isinstance(m, SVDLoRA)]
        self.init_budget = sum(m.lora_E.shape[0] for m in self.modules)
        self.target_budget = config.target_r * len(self.modules)
        self.ipt: dict[nn.Parameter, torch.Tensor] = {}
        self.unc: dict[nn.Parameter, torch.Tensor] = {}
        self.pattern: list[torch.Tensor] | None = None

    def regularizer(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean distance of each ``A A^T`` and ``B^T B`` from the identity."""
        norms = []
        for m in self.modules:
            for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                norms.append(torch.linalg.matrix_norm(cov - eye))
        return self.config.orth_reg_weight * torch.stack(norms).mean()

    def budget(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to prune at this step)``."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > self.total - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (self.total - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After a step's backward (the gradients still there): track scores, prune to the budget."""
        final = self.total - self.config.tfinal
        if step > final and self.pattern is not None:  # the final pattern, kept
            for m, keep in zip(self.modules, self.pattern, strict=True):
                m.lora_E.masked_fill_(~keep, 0.0)
            return
        if step < final:
            self.track()
        budget, prune = self.budget(step)
        if prune or step == final:
            self.pattern = self.prune(budget)
            if step == final:
                self.ipt, self.unc = {}, {}

    def track(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for m in self.modules:
            for p in (m.lora_A, m.lora_E, m.lora_B):
                if p.grad is None:
                    continue
                now = (p * p.grad).abs()
                avg = self.ipt.get(p, torch.zeros_like(p))
                self.ipt[p] = b1 * avg + (1 - b1) * now
                self.unc[p] = b2 * self.unc.get(p, torch.zeros_like(p)) + (1 - b2) * (now - self.ipt[p]).abs()

    def score(self, p: nn.Parameter) -> torch.Tensor:
        return self.ipt.get(p, torch.zeros_like(p)) * self.unc.get(p, torch.zeros_like(p))

    def prune(self, budget: int) -> list[torch.Tensor]:
        """Zero the ``E`` of the lowest-scoring triplets so that ``budget`` stay; the kept masks (r, 1)."""
        scores = [
            self.score(m.lora_E) + self.score(m.lora_A).mean(1, keepdim=True) + self.score(m.lora_B).mean(0)[:, None]
            for m in self.modules
        ]
        cut = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(scores).view(-1), k=cut).values.item() if cut > 0 else -float("inf")
        masks = [s > threshold for s in scores]
        for m, keep in zip(self.modules, masks, strict=True):
            m.lora_E.masked_fill_(~keep, 0.0)
        return masks


_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def _ranks(data: dict) -> tuple[tuple[str, int], ...] | None:
    """peft's ``rank_pattern`` (``<module path>.lora_E`` -> kept mask) as module path -> kept rank."""
    pattern = data.get("rank_pattern")
    if not pattern:
        return None
    out = []
    for key, keep in pattern.items():
        path = key.removeprefix("base_model.model.").removesuffix(".lora_E").removesuffix(".default")
        out.append((path, int(sum(bool(k) for k in keep))))
    return tuple(out)


def _from_peft(data: dict, model: nn.Module) -> AdaLoRAConfig:
    fields = {k: data[k] for k in _FIELDS if data.get(k) is not None}
    return AdaLoRAConfig(
        **fields,
        lora_alpha=data.get("lora_alpha", 8),
        lora_dropout=data.get("lora_dropout", 0.0),
        target_modules=targets(data["target_modules"]),
        ranks=_ranks(data),
    )


def _peft_fields(config: AdaLoRAConfig, model: nn.Module, found: list[Entry]) -> dict[str, Any]:
    # the tensors are written at their full rank init_r, pruned triplets as zeros: peft loads them as they are
    check(config.ranks is None, "an AdaLoRA adapter loaded with a rank pattern cannot be written back to peft")
    return {
        **{k: getattr(config, k) for k in _FIELDS},
        "r": config.init_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules or list(spec_for(model).lora_targets),
        "fan_in_fan_out": fan_in_fan_out(model, found),
        "bias": "none",
        "init_lora_weights": True,
        "rank_pattern": None,
        # peft refuses a config without one, even to load it; training is over, so any consistent value does
        "total_step": config.total_step or config.tinit + config.tfinal + 1,
    }


@dataclasses.dataclass(frozen=True)
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA config, peft's field names and defaults; ``ranks``: the kept rank of each module, for an adapter
    pruned by peft (from its ``rank_pattern``). ``target_modules`` None = the architecture's LoRA targets."""

    method = "adalora"
    peft = PeftFormat("ADALORA", _from_peft, _peft_fields, accepts=frozenset({"rank_pattern"}))
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - peft's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    ranks: tuple[tuple[str, int], ...] | None = None

    def validate(self) -> None:
        check(0 < self.target_r <= self.init_r, f"need 0 < target_r <= init_r, got {self.target_r}, {self.init_r}")
        check(0 < self.beta1 < 1 and 0 < self.beta2 < 1, "beta1 and beta2 must be in (0, 1)")
        check(self.orth_reg_weight >= 0 and self.deltaT >= 1, "orth_reg_weight must be >= 0 and deltaT >= 1")

    def rank(self, name: str) -> int:
        """This module's rank: ``init_r``, or the kept rank of a pruned adapter."""
        for path, rank in self.ranks or ():
            if name == path or name.endswith("." + path) or path.endswith("." + name):
                return rank
        return self.init_r

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, SVDLoRA]]:
        names = lora_targets(model, arch, self.target_modules)
        return [(n, SVDLoRA(model.get_submodule(n), self, self.rank(n))) for n in names]

    def training_hook(self, model: nn.Module, name: str, total_step: int) -> RankAllocator:
        """What a training loop runs for this adapter (``training.fit.Loop``'s ``hooks``)."""
        return RankAllocator(model, name, self, total_step)
