"""OFT (Qiu et al. 2023; peft 0.21's formulation): rotate a linear host's input by a learned block-diagonal
orthogonal matrix.

``y = W (R x) + b`` per token, ``R = diag(R_1 .. R_r)`` of ``r`` blocks of ``k = in / r`` (peft's ``r`` /
``oft_block_size``, adjusted to a divisor of ``in`` as peft adjusts them). Each block is the Cayley map of
a skew-symmetric ``Q`` (upper triangle trained, ``k (k - 1) / 2`` entries, init zero: ``R = I``), by its
Neumann series ``I + 2Q + ... + 2Q^(n-2) + Q^(n-1)`` (``num_cayley_neumann_terms``) or exactly, ``(I + Q)^-1 (I -
Q)``; ``block_share`` uses one block everywhere. Mergeable (``W' = W R^T``); per row as stacked blocks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, features, out_in
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.hosts import first_input, with_first_input
from adapterkit.core.methods.base import AdapterConfig, AdapterModule, check, lora_targets, param_dtype
from adapterkit.core.peft_spec import PeftFormat, exact_targets, fan_in_fan_out, targets


def nearest_divisor(n: int, wanted: int) -> int:
    """The divisor of ``n`` nearest ``wanted`` (the lower on a tie): peft's ``adjust_oft_parameters``."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def cayley(q: torch.Tensor, k: int, neumann: bool, terms: int) -> torch.Tensor:
    """``(b, k (k - 1) / 2) -> (b, k, k)``: the orthogonal blocks of the skew-symmetric matrices ``q`` fills."""
    rows, cols = torch.triu_indices(k, k, 1, device=q.device)
    skew = torch.zeros(q.shape[0], k, k, device=q.device, dtype=q.dtype)
    skew[:, rows, cols] = q
    skew = skew - skew.transpose(-2, -1)
    eye = torch.eye(k, device=q.device, dtype=q.dtype).expand_as(skew)
    if not neumann:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    out = eye + 2 * skew if terms > 1 else eye.clone()
    if terms <= 2:
        return out
    power = skew  # peft's truncation: I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1), three terms summed as four
    for _ in range(2, max(terms - 1, 3)):
        power = torch.bmm(power, skew)
        out = out + 2 * power
    return out + torch.bmm(power, skew)
    return out


class OFT(AdapterModule):
    """On a linear host: its input ``(..., in)`` rotated block by block."""

    edits_inputs = True

    def __init__(self, host: nn.Module, config: OFTConfig) -> None:
        super().__init__()
        fan_in = features(host)[0]
        if config.r:
            r = nearest_divisor(fan_in, config.r)
            k = fan_in // r
        else:
            k = nearest_divisor(fan_in, config.oft_block_size)
            r = fan_in // k
        kw = dict(dtype=param_dtype(host), device=host.weight.device)
        self.oft_R = nn.Parameter(torch.zeros(1 if config.block_share else r, k * (k - 1) // 2, **kw))
        self.blocks_, self.k, self.config = r, k, config
        self.merged_weight: torch.Tensor | None = None

    def rotation(self) -> torch.Tensor:
        """``(r, k, k)``: the blocks (one repeated, with ``block_share``)."""
        blocks = cayley(self.oft_R, self.k, self.config.use_cayley_neumann, self.config.num_cayley_neumann_terms)
        return blocks.expand(self.blocks_, -1, -1) if self.config.block_share else blocks

    def adapt_inputs(self, host, args, kwargs):
        x = first_input(args, kwargs)
        r = self.rotation()
        blocks = x.to(r.dtype).reshape(*x.shape[:-1], self.blocks_, self.k)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, r).reshape(x.shape)
        return with_first_input(args, kwargs, rotated.to(x.dtype))

    def row_key(self):
        return (OFT, self.blocks_, self.k, self.oft_R.dtype)

    @staticmethod
    def row_tables(modules: list[OFT]) -> list[torch.Tensor]:
        rotations = [m.rotation() for m in modules]
        eye = torch.eye(modules[0].k, dtype=rotations[0].dtype, device=rotations[0].device)
        return [torch.stack([*rotations, eye.expand_as(rotations[0])])]  # (n + 1, r, k, k): the last, no rotation

    @staticmethod
    def adapt_inputs_tables(host, args, kwargs, rows, modules):
        (r,) = rows  # (B, r, k, k)
        x, m = first_input(args, kwargs), modules[0]
        blocks = x.to(r.dtype).reshape(x.shape[0], -1, m.blocks_, m.k)  # (B, T, r, k)
        rotated = torch.einsum("btrk,brkc->btrc", blocks, r).reshape(x.shape)
        return with_first_input(args, kwargs, rotated.to(x.dtype))

    def dense(self) -> torch.Tensor:
        """The rotation as one ``(in, in)`` matrix, ``x -> x R``."""
        return torch.block_diag(*self.rotation())

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        weight = out_in(host, host.weight)  # (out, in): W (x R)^T = (W R^T) x^T
        self.merged_weight = weight.detach().clone()
        weight.copy_((weight.to(self.oft_R.dtype) @ self.dense().T).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        out_in(host, host.weight).copy_(self.merged_weight)  # the weights as they were: no inverse to round
        self.merged_weight = None


_FIELDS = ("r", "oft_block_size", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms")


def _from_peft(data: dict, model: nn.Module) -> OFTConfig:
    for option in ("coft", "module_dropout"):
        if data.get(option):
            raise unsupported(CONFIG_FILE, option, data[option])
    return OFTConfig(**{k: data[k] for k in _FIELDS if k in data}, target_modules=targets(data["target_modules"]))


def _peft_fields(config: OFTConfig, model: nn.Module, found: list[Entry]) -> dict:
    fields = {k: getattr(config, k) for k in _FIELDS}
    return {
        **fields,
        "target_modules": exact_targets(found),
        "fan_in_fan_out": fan_in_fan_out(model, found),
        "module_dropout": 0.0,
        "coft": False,
        "bias": "none",
        "init_weights": True,
    }


@dataclasses.dataclass(frozen=True)
class OFTConfig(AdapterConfig):
    """OFT config, peft's field names and defaults (``r`` 0: blocks of ``oft_block_size``; else ``r`` blocks).
    ``target_modules`` None = the architecture's LoRA targets."""

    method = "oft"
    peft = PeftFormat("OFT", _from_peft, _peft_fields, keys={"oft_R": "oft_R.weight"})
    r: int = 0
    oft_block_size: int = 32
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    target_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        check((self.r == 0) != (self.oft_block_size == 0), "set exactly one of r and oft_block_size (the other 0)")
        check(self.r >= 0 and self.oft_block_size >= 0, "r and oft_block_size must be >= 0")
        check(self.num_cayley_neumann_terms >= 1, "num_cayley_neumann_terms must be >= 1")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, OFT]]:
        names = lora_targets(model, arch, self.target_modules)
        return [(n, OFT(model.get_submodule(n), self)) for n in names]
