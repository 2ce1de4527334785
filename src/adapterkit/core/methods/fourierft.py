"""FourierFT (Gao et al. 2024): a weight update learned as a few Fourier coefficients.

``delta = s * Re(ifft2(S))`` where the dense spectrum ``S`` (out, in) is zero except at ``n_frequency``
positions (all of a layer's, where it has fewer; peft refuses such layers) drawn once from
``random_loc_seed`` (peft's ``torch.randperm``: the same positions as peft's), which hold the trained
``fourierft_spectrum`` (init zero: the model is unchanged). Linear and GPT-2 ``Conv1D`` hosts;
mergeable, per row as a stacked dense delta.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapterkit.core.arch import ArchSpec, features
from adapterkit.core.entries import CONFIG_FILE, Entry, unsupported
from adapterkit.core.methods.base import AdapterConfig, check, lora_targets, param_dtype
from adapterkit.core.methods.delta import DenseDelta
from adapterkit.core.peft_spec import PEFT, PeftFormat, exact_targets, fan_in_fan_out, targets


def positions(fan_out: int, fan_in: int, n: int, seed: int) -> torch.Tensor:
    """``(2, n)`` row and column of each trained coefficient, drawn as peft draws them."""
    flat = torch.randperm(fan_out * fan_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // fan_in, flat % fan_in])


def dft(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``2 pi j k / n``, ``(n, n)`` each (``j k`` reduced mod ``n`` first, for accuracy)."""
    k = torch.arange(n, device=device)
    angle = (k[:, None] * k[None, :] % n).to(torch.float64) * (2 * torch.pi / n)
    return angle.cos().float(), angle.sin().float()


def real_ifft2(dense: torch.Tensor) -> torch.Tensor:
    """``Re(ifft2(X))`` of a real ``X`` (M, N): ``(C_M X C_N - S_M X S_N) / (M N)``."""
    (cm, sm), (cn, sn) = dft(dense.shape[0], dense.device), dft(dense.shape[1], dense.device)
    return (cm @ dense @ cn - sm @ dense @ sn) / dense.numel()


class FourierFT(DenseDelta):
    """``(..., in) -> (..., out)``: the host's output plus ``delta x``."""

    def __init__(self, host: nn.Module, config: FourierFTConfig) -> None:
        super().__init__()
        fan_in, fan_out = features(host)
        n = min(config.n_frequency, fan_in * fan_out)  # a small layer trains all its coefficients
        self.register_buffer("indices", positions(fan_out, fan_in, n, config.random_loc_seed), False)
        kw = dict(dtype=param_dtype(host), device=host.weight.device)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n, **kw))
        self.shape, self.scaling = (fan_out, fan_in), config.scaling

    def delta(self) -> torch.Tensor:
        spectrum = self.fourierft_spectrum
        dense = torch.zeros(self.shape, device=spectrum.device, dtype=torch.float32)
        dense = dense.index_put((self.indices[0], self.indices[1]), spectrum.float())
        # ONNX has no inverse FFT for the exporter to emit: there the same sum is written as matrix products
        real = real_ifft2(dense) if torch.onnx.is_in_onnx_export() else torch.fft.ifft2(dense).real
        return (real * self.scaling).to(spectrum.dtype)


_FIELDS = ("n_frequency", "scaling", "random_loc_seed")


def _from_peft(data: dict, model: nn.Module) -> FourierFTConfig:
    if data.get("n_frequency_pattern"):
        raise unsupported(CONFIG_FILE, "n_frequency_pattern", data["n_frequency_pattern"])
    return FourierFTConfig(**{k: data[k] for k in _FIELDS if k in data}, target_modules=targets(data["target_modules"]))


def _peft_fields(config: FourierFTConfig, model: nn.Module, found: list[Entry]) -> dict:
    if any(e.param.numel() < config.n_frequency for e in found):
        raise unsupported(PEFT, "n_frequency", config.n_frequency, "peft refuses layers with fewer coefficients")
    fields = {k: getattr(config, k) for k in _FIELDS}
    return {**fields, "target_modules": exact_targets(found), "fan_in_fan_out": fan_in_fan_out(model, found)}


@dataclasses.dataclass(frozen=True)
class FourierFTConfig(AdapterConfig):
    """FourierFT config, peft's field names and defaults. ``target_modules`` None = the architecture's
    LoRA targets."""

    method = "fourierft"
    peft = PeftFormat("FOURIERFT", _from_peft, _peft_fields)
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    target_modules: tuple[str, ...] | str | None = None

    def validate(self) -> None:
        check(isinstance(self.n_frequency, int) and self.n_frequency > 0, "n_frequency must be a positive int")

    def build(self, model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, FourierFT]]:
        names = lora_targets(model, arch, self.target_modules)
        return [(n, FourierFT(model.get_submodule(n), self)) for n in names]
