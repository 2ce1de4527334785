"""LoftQ (Li et al. 2023): a LoRA initialised against the quantization of its host, as peft's
``init_lora_weights="loftq"`` does.

The host weight ``W`` (out, in) is replaced by ``Q``, its quantization (``loftq_bits``: 4 is NF4 over
blocks of 64 with an fp32 absmax each, bitsandbytes' ``nf4`` without double quantization; 8 is int8 with
one absmax per row, bitsandbytes' vector-wise int8), kept in the host's dtype ("fake" quantization: the
values a quantized kernel would compute with). ``B A`` starts as the best rank-``r`` approximation of the
error ``W - Q``, alternating ``loftq_iter`` times: ``Q = quant(W - B A)``, ``B A = svd_r(W - Q)``. The
model starts at ``Q + s B A``, the closest a quantized base plus a rank-``r`` update gets to ``W``.

Unlike peft, the factors carry ``1 / s`` (``sqrt(sigma / s)`` each, as PiSSA's): the start is the rank-``r``
part of ``W - Q`` at any ``alpha``, where peft's is exact only at ``alpha = r``.

Replacing ``W`` is a change to the model outside the adapter's modules: it is recorded
(:func:`adapterkit.core.state.change`, with a copy of ``W``) and undone when the last LoftQ adapter of the
host goes, which restores ``W`` bit for bit. While it lasts, every adapter (and the base, adapters off) sees
``Q``: the quantized base is what LoftQ trains against. With ``loftq_iter=1``, ``Q`` is the quantization
of ``W`` alone, so an adapter saved from it loads onto any copy of the base and finds the same ``Q``.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.arch import out_in
from adapterkit.errors import ConfigError

BITS = (4, 8)
BLOCK = 64  # NF4: values per absmax (bitsandbytes' blocksize for 4-bit)
# NormalFloat4 (Dettmers et al. 2023, Appendix E): the 16 levels bitsandbytes' "nf4" quantizes to
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
ORIGINAL = "_adapterkit_loftq"  # on a host while its weight is Q: (bits, iterations, W)


def nf4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to NF4 (fp32): flattened row-major, in blocks of 64 (the last one padded), each
    block's values over its absmax sent to the nearest of the 16 levels and scaled back."""
    flat = weight.float().reshape(-1)
    blocks = nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(NF4, device=weight.device)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero block stays zero
    nearest = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)  # a value on a midpoint goes down
    return (levels[nearest] * absmax).view(-1)[: flat.numel()].view(weight.shape)


def int8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) rounded to int8 with one absmax per row (fp32)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w * (127 / absmax)) * (absmax / 127)


def loftq_start(weight: torch.Tensor, bits: int, rank: int, iterations: int, scaling: float):
    """``(Q, A, B)`` for ``weight`` (out, in): its quantization and factors with ``s B A = svd_r(W - Q)``."""
    quantize = nf4 if bits == 4 else int8
    w = weight.float()
    residual = w
    for step in range(iterations):
        q = quantize(residual)
        u, sigma, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(sigma[:rank] / scaling)
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root
        if step + 1 < iterations:
            residual = w - scaling * (b @ a)
    return q, a, b


@torch.no_grad()
def start_lora(model: nn.Module, path: str, lora: nn.Module, config) -> None:
    """Quantize the weight of ``lora``'s host at ``path`` (recorded, undone when no LoftQ adapter needs it)
    and start ``lora``'s factors from its quantization error. A second LoftQ adapter of the host starts from
    the same ``W`` and must quantize it alike."""
    host = model.get_submodule(path)
    bits, iterations = config.loftq_bits, config.loftq_iter
    held = getattr(host, ORIGINAL, None)
    if held is not None and held[:2] != (bits, iterations):
        raise ConfigError(
            f"{path} is quantized by a LoftQ adapter with loftq_bits={held[0]}, loftq_iter={held[1]}; "
            f"this one asks {bits}, {iterations}: give LoftQ adapters of one host the same settings"
        )
    original = held[2] if held is not None else host.weight.detach().clone()
    q, a, b = loftq_start(out_in(host, original), bits, config.r, iterations, config.scaling)
    lora.lora_A.copy_(a), lora.lora_B.copy_(b)

    def undo() -> None:
        with torch.no_grad():
            host.weight.copy_(original)
        delattr(host, ORIGINAL)

    def apply():
        with torch.no_grad():
            out_in(host, host.weight).copy_(q)
        setattr(host, ORIGINAL, (bits, iterations, original))
        return undo

    st.change(model, f"loftq:{path}", apply)
