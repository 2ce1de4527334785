"""BOFT (Liu et al. 2024): an orthogonal rotation of a linear host's input built as a product of
butterfly-permuted block-diagonal factors, and a learned scale of its output.

``y = s ⊙ (W (R x)) + b`` with ``R = M_(m-1) ... M_0``, ``M_i = P_i diag(Q_i1 .. Q_iD) P_i^T``: ``D`` blocks
(``boft_block_num``, or ``in / boft_block_size``) of Cayley maps ``Q = (I - S)(I + S)^-1`` of
``S = (B - B^T) / 2`` (``boft_R``, init zero: ``R = I``), ``P_i`` peft's block-butterfly permutations,
``m = boft_n_butterfly_factor``, and ``s`` (``boft_s``, out) init one. The rotation is computed as a
dense ``(in, in)`` matrix, as peft does. Mergeable (``W' = diag(s) W R^T``); per row as stacked
rotations and scales. peft without its CUDA extension runs ``boft_n_butterfly_factor=1`` whatever
the config says; adapterkit runs what the config says.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, features, out_in
from adapterkit.core.entries import Entry
from adapterkit.core.hosts import first_input, stack_rows, with_first_input
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, lora_targets, param_dtype
from adapterkit.core.peft_spec import PeftFormat, exact_targets, fan_in_fan_out, targets


def butterfly(n: int, blocks: int, half: int, factor: int) -> torch.Tensor:
    """peft's ``block_butterfly_perm``: indices of ``n`` that regroup, inside each of ``blocks`` chunks, its
    sub-blocks of ``half`` in even-then-odd order (the identity for factor 0)."""
    if factor == 0:
        return torch.arange(n)
    check(blocks * half * 2 <= n, "invalid BOFT block layout for this layer")
    size = n // blocks
    pieces = torch.arange(size // half)
    order = torch.cat([pieces[0::2], pieces[1::2]])
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)  # (size,)
    return (torch.arange(0, n, size)[:, None] + within).reshape(-1)


def solve_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X a = b`` for ``(n, k, k)`` batches, by Gauss-Jordan elimination without pivoting: exact
    enough and safe for ``I + S`` (its symmetric part is ``I``), and made of ops an ONNX export can emit."""
    k = a.shape[-1]
    aug = torch.cat([a.transpose(1, 2), b.transpose(1, 2)], dim=2)  # a^T X^T = b^T
    for i in range(k):
        row = aug[:, i] / aug[:, i, i : i + 1]  # (n, 2k)
        unit = torch.zeros(k, 1, dtype=a.dtype, device=a.device)
        unit[i] = 1
        aug = aug - aug[:, :, i : i + 1] * row[:, None] + unit * row[:, None]
    return aug[:, :, k:].transpose(1, 2)


def cayley(data: torch.Tensor) -> torch.Tensor:
    """``(b, k, k) -> (b, k, k)``: ``(I - S)(I + S)^-1`` of the skew part ``S`` of each matrix."""
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(data.shape[-1], device=data.device).expand_as(data)
    # ONNX has no linear solve for the exporter to emit: there the same solve is written out
    solve = solve_right if torch.onnx.is_in_onnx_export() else lambda a, b: torch.linalg.solve(a, b, left=False)
    return solve(eye + skew, eye - skew).to(data.dtype)


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``(d, h, h) -> (d h, d h)``, ``torch.block_diag`` of the blocks as a product an ONNX export can emit."""
    d, h, _ = blocks.shape
    eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(d * h, d * h)


class BOFT(AdapterModule):
    """On a linear host: its input ``(..., in)`` rotated, its output (bias apart) scaled."""

    edits_inputs = True

    def __init__(self, host: nn.Module, config: BOFTConfig) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        factor = config.boft_n_butterfly_factor - 1
        num = config.boft_block_num or fan_in // config.boft_block_size
        size = config.boft_block_size or fan_in // max(num, 1)
        check(num * size == fan_in, f"BOFT blocks ({num} of {size}) must tile the input features ({fan_in})")
        check(factor == 0 or (num % 2 == 0 and size % 2 == 0), "butterfly factors need even block counts and sizes")
        kw = dict(dtype=param_dtype(host), device=host.weight.device)
        self.boft_R = nn.Parameter(torch.zeros(factor + 1, num, size, size, **kw))
        self.boft_s = nn.Parameter(torch.ones(fan_out, 1, **kw))
        perms = [butterfly(fan_in, num // 2**i, size // 2, factor) for i in range(factor + 1)]
        self.register_buffer("perms", torch.stack(perms).to(host.weight.device), persistent=False)
        self.merged_weight: torch.Tensor | None = None

    def rotation(self) -> torch.Tensor:
        """The dense ``(in, in)`` rotation, ``x -> x R``."""
        n, d, h, _ = self.boft_R.shape
        blocks = cayley(self.boft_R.reshape(n * d, h, h)).reshape(n, d, h, h)
        total = None
        for i in range(n):
            perm = self.perms[i]
            factor = block_diag(blocks[i])[perm][:, perm]  # P B P^T with P[j, perm[j]] = 1
            total = factor if total is None else factor @ total
        return total

    def adapt_inputs(self, host, args, kwargs):
        x = first_input(args, kwargs)
        return with_first_input(args, kwargs, (x @ self.rotation().to(x.dtype)))

    def adapt(self, host, x, out):
        bias = host.bias if host.bias is not None else 0
        return (out - bias) * self.boft_s[:, 0].to(out.dtype) + bias

    def row_key(self):
        return (BOFT, *self.boft_R.shape, self.boft_s.shape[0], self.boft_R.dtype)

    @staticmethod
    def row_tables(modules: list[BOFT]) -> list[torch.Tensor]:
        rotations = [m.rotation() for m in modules]
        eye = torch.eye(rotations[0].shape[0], dtype=rotations[0].dtype, device=rotations[0].device)
        scales = stack_rows([m.boft_s[:, 0] for m in modules], identity=1)
        return [torch.stack([*rotations, eye]), scales]  # (n + 1, in, in), (n + 1, out)

    @staticmethod
    def adapt_inputs_tables(host, args, kwargs, rows, modules):
        x = first_input(args, kwargs)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return with_first_input(args, kwargs, torch.bmm(flat, rows[0].to(x.dtype)).reshape(x.shape))

    @staticmethod
    def adapt_tables(host, x, out, rows, modules):
        bias = host.bias if host.bias is not None else 0
        scale = rows[1].to(out.dtype).view(out.shape[0], *[1] * (out.ndim - 2), -1)
        return (out - bias) * scale + bias

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        weight = out_in(host, host.weight)  # (out, in): s ⊙ W (R^T x)
        self.merged_weight = weight.detach().clone()
        merged = self.boft_s * (weight.to(self.boft_R.dtype) @ self.rotation().T)
        weight.copy_(merged.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        out_in(host, host.weight).copy_(self.merged_weight)
        self.merged_weight = None


_FIELDS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")


def _from_peft(data: dict, model: nn.Module) -> BOFTConfig:
    fields = {k: data[k] for k in _FIELDS if k in data}
    return BOFTConfig(**fields, dropout=data.get("boft_dropout", 0.0), target_modules=targets(data["target_modules"]))


def _peft_fields(config: BOFTConfig, model: nn.Module, found: list[Entry]) -> dict:
    fields = {k: getattr(config, k) for k in _FIELDS}
    return {
        **fields,
        "boft_dropout": config.dropout,
        "target_modules": exact_targets(found),
        "fan_in_fan_out": fan_in_fan_out(model, found),
        "bias": "none",
        "init_weights": True,
    }


@dataclasses.dataclass(frozen=True)
class BOFTConfig(AdapterConfig):
    """BOFT config, peft's field names and defaults (``dropout``: peft's ``boft_dropout``, refused here
    above 0). ``target_modules`` None = the architecture's LoRA targets."""

    method = "boft"
    peft = PeftFormat("BOFT", _from_peft, _peft_fields)
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        check((self.boft_block_size == 0) != (self.boft_block_num == 0), "set one of boft_block_size, boft_block_num")
        check(self.boft_n_butterfly_factor >= 1, "boft_n_butterfly_factor must be >= 1")
        check(self.dropout == 0, "BOFT's multiplicative block dropout is not supported; set dropout=0")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, BOFT]]:
        names = lora_targets(model, arch, self.target_modules)
        return [(n, BOFT(model.get_submodule(n), self)) for n in names]
