"""A frozen base model in int8 or int4 weight-only form (QLoRA-style, on CPU), adapters training in fp32.

:func:`quantize_base` turns the backbone's ``nn.Linear`` weights into torchao tensors; the layers stay
``nn.Linear`` (same ``in_features``/``out_features``), so adapters attach to them before or after.

* ``"int8"``: torchao's ``Int8WeightOnlyConfig``, one fp32 scale per output row; fp32 activations.
  :class:`Int8Linear` computes torchao's forward, and a backward that dequantizes one weight at a time
  (torchao's autograd keeps every layer's weight dequantized from forward to backward: the fp32 base again).
* ``"int4"``: groups of 32 (or 64, 128) input weights share a scale and zero point, in torchao's CPU format
  (``PrototypeInt4WeightOnlyConfig``: the stable ``Int4WeightOnlyConfig`` formats need CUDA/XPU kernels
  or ``mslk`` in torchao 0.18). The CPU kernel is ~100x slower on fp32 activations than on bf16, so
  these layers compute in bf16; torch has no backward for it, so :class:`Int4Linear` adds one
  (the input's gradient through the dequantized weight, as QLoRA does).

What stays full precision, and why: the task head and ``lm_head`` (a head may train; SmolLM2's
``lm_head`` is the embedding matrix, tied: quantizing it would add a copy, not save one), embeddings
and norms (not Linear), adapter modules (they train), and weights shared by two modules. A layer whose
input size int4's groups cannot split stays fp32 too (the report names it).

Layer by layer: transformers maps a safetensors checkpoint into memory lazily (nothing is read until
touched). Each Linear weight is then read from the file on its own (pread), quantized and dropped, and the
tensors that stay full precision are read into memory of their own too, so the mapping's pages (the whole
fp32 checkpoint) are never brought in, nor kept resident by the fp32 embedding's view of them. A model
already in memory (another dtype, another device, built in Python) is quantized where it is, as before.

The base model's fingerprint is taken before quantizing and kept on the model, so adapters trained on
the quantized twin load into the fp32 model and back. Merging into quantized weights is refused
(requantizing could not be undone exactly); deleting an adapter leaves the integer weights untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.backbone import BASE_FINGERPRINT, base_prefix, fingerprint
from adapterkit.core.pretrained import clean_mappings, file_place, read_tensor
from adapterkit.errors import AdapterError, ConfigError

BITS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # what torchao's CPU int4 kernel takes


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_base` did: the layers quantized, those kept fp32 (with why), weight bytes."""

    bits: str
    quantized: tuple[str, ...]
    skipped: dict[str, str]
    bytes_before: int  # the quantized layers' weights before
    bytes_after: int  # and after (integers, scales, zero points)

    def __str__(self) -> str:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        return (
            f"{self.bits}: {len(self.quantized)} Linear layers quantized, {len(self.skipped)} kept full precision; "
            f"their weights {self.bytes_before:,} -> {self.bytes_after:,} bytes ({ratio:.1f}x smaller)"
        )


def quantize_base(model: nn.Module, bits: int | str = "int8", *, group_size: int = 32) -> QuantizeReport:
    """Store the frozen base's Linear weights as int8 (``8``/``"int8"``) or int4 (``4``/``"int4"``).

    Adapters (added before or after) keep training in fp32 on top. The model is changed in place and
    stays quantized; adapters trained on it load into the fp32 model and back.

    Args:
        group_size: int4 only: input weights per scale and zero point (32, 64 or 128). On SmolLM2-135M,
            32 kept the logits within 2% of fp32 (relative RMS) and the greedy answers; 64/128 drifted
            to 19% and changed them, for 11% fewer bytes.
    """
    bits = _bits(bits)
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size must be one of {GROUP_SIZES}, not {group_size!r}")
    state = model.__dict__.get(st.STATE)
    if state is not None and state.merged:
        raise AdapterError(f"adapters {sorted(state.merged)} are merged into the weights; unmerge_adapter them first")
    if BASE_FINGERPRINT in model.__dict__:
        raise AdapterError("this model is quantized already; load the full-precision model to quantize it again")
    if bits == "int4" and any(p.device.type != "cpu" for p in model.parameters()):
        raise AdapterError("int4 here is torchao's CPU kernel; quantize a model on the CPU (or use int8)")
    ao = _torchao()
    # Taken from the fp32 weights (or when the first adapter came, before any merge): kept on the model.
    fp = state.fingerprint if state is not None and state.fingerprint is not None else fingerprint(model)
    targets, skipped = _targets(model, 1 if bits == "int8" else group_size)
    before = sum(weight_bytes(m.weight) for m in targets.values())
    places = _file_places(model)
    for module in targets.values():
        _own(places.pop(id(module.weight), None))  # one fp32 weight in memory at a time
        _quantize_int8(module, ao) if bits == "int8" else _quantize_int4(module, ao, group_size)
    for place in places.values():  # what stays full precision: then nothing holds the file mapping
        _own(place)
    _give_back_freed_memory()
    model.__dict__[BASE_FINGERPRINT] = fp
    after = sum(weight_bytes(m.weight) for m in targets.values())
    return QuantizeReport(bits, tuple(targets), skipped, before, after)


def _file_places(model: nn.Module) -> dict[int, tuple[torch.Tensor, str, int]]:
    """The model's tensors that are views of a memory-mapped checkpoint (transformers' lazy loading), by id.

    Quantizing such a weight through the mapping would bring its pages in, and they would stay resident
    with the whole file for as long as any view (the fp32 embedding) is alive: the fp32 checkpoint and its
    int8 copy in memory together. Found all at once, before any tensor is replaced (the ids and addresses
    are those of live tensors)."""
    mappings = clean_mappings()
    if not mappings:
        return {}
    plain = [t for t in [*model.parameters(), *model.buffers()] if type(t) in (torch.Tensor, nn.Parameter)]
    places = {id(t): (t, file_place(t, mappings)) for t in plain}
    return {key: (t, *place) for key, (t, place) in places.items() if place is not None}


@torch.no_grad()
def _own(place: tuple[torch.Tensor, str, int] | None) -> None:
    """Point a mapped tensor at a copy of its bytes read from the file (pread: the mapping stays unread)."""
    if place is not None:
        tensor, path, offset = place
        tensor.data = read_tensor(path, offset, tensor)


def _give_back_freed_memory() -> None:
    """Return the quantizing temporaries' freed memory (each fp32 weight, torchao's intermediates) to the system.

    glibc keeps it in its heaps, one per thread: on SmolLM2 from 15 to 430 MB, varying from run to run (a
    fresh process measured 1,065 then 648 MB resident after quantizing; 634 and 633 after this)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL(None).malloc_trim(0)


def _bits(bits: int | str) -> str:
    name = f"int{bits}" if isinstance(bits, int) else str(bits).lower()
    if name not in BITS:
        raise ConfigError(f"cannot quantize to {bits!r}; choose 'int8' or 'int4'")
    return name


def _targets(model: nn.Module, group: int) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The backbone's Linear layers to quantize (``in_features`` a multiple of ``group``), and the others
    kept in full precision with the reason."""
    prefix = base_prefix(model)
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    targets, skipped = {}, {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f".{st.SLOT}." in f".{path}.":
            continue
        why = _why_not(module, path, prefix, owners, group)
        if why:
            skipped[path] = why
        else:
            targets[path] = module
    return targets, skipped


def _why_not(module: nn.Linear, path: str, prefix: str, owners: dict[int, int], group: int) -> str | None:
    if owners[id(module.weight)] > 1:
        return "weight shared with another module (tied to the embeddings): quantizing would add a copy"
    if prefix and not path.startswith(prefix):
        return "task head (it may train)"
    if is_quantized(module):
        return "quantized already"
    if module.in_features % group:
        return f"in_features {module.in_features} is not a multiple of the int4 group size {group}"
    if group > 1 and module.out_features % 16:  # the CPU int4 kernel packs 16 output rows together
        return f"out_features {module.out_features} is not a multiple of 16 (the int4 kernel's packing)"
    return None


def _torchao() -> Any:
    """torchao's quantization API, imported on first use (it takes a while and logs about CUDA kernels)."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:  # its CUDA-only extensions cannot load on a CPU build: expected, not worth a warning
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as ao
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except ImportError as e:
        raise AdapterError(f"quantizing the base model needs torchao: pip install torchao==0.18.0 ({e})") from e
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return SimpleNamespace(
        quantize_=ao.quantize_, Int8WeightOnlyConfig=ao.Int8WeightOnlyConfig, Int4Config=PrototypeInt4WeightOnlyConfig
    )


@torch.no_grad()
def _quantize_int8(module: nn.Linear, ao: Any) -> None:
    ao.quantize_(module, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    if type(module) is nn.Linear:  # a subclass keeps its own forward (and torchao's autograd)
        module.__class__ = Int8Linear


class _Int8Matmul(torch.autograd.Function):
    """torchao's int8 ``F.linear``, whose autograd would keep each layer's weight dequantized to fp32 from
    forward to backward (all of them at once: the fp32 base again, on top of the int8 one); here backward
    dequantizes one weight for the moment instead (the same ``dy W``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # frozen: kept by reference, as autograd keeps an fp32 weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        dx = grad @ ctx.weight.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, dbias


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` holding torchao's int8 weight: its forward, and a backward that keeps no fp32 copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Matmul.apply(x, self.weight, self.bias)


@torch.no_grad()
def _quantize_int4(module: nn.Linear, ao: Any, group_size: int) -> None:
    """The weight in bf16 first: the kernel's scales and zero points take the weight's dtype."""
    config = ao.Int4Config(group_size=group_size, set_inductor_config=False)
    module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
    ao.quantize_(module, config)
    module.__class__ = Int4Linear


class _Int4Matmul(torch.autograd.Function):
    """``x W^T`` by the int4 kernel in bf16; backward: ``dy W`` with W dequantized for the moment."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x.to(torch.bfloat16), weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ _dequantize_int4(ctx.weight).to(grad.dtype), None


class Int4Linear(nn.Linear):
    """An ``nn.Linear`` holding torchao's CPU int4 weight: computes in bf16, passes gradients to its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int4Matmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@torch.no_grad()
def _dequantize_int4(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) bf16: torchao has no dequantize for its CPU int4 format, so run the kernel on the identity
    (each output is one dequantized weight times 1, exact)."""
    eye = torch.eye(weight.shape[1], dtype=torch.bfloat16, device=weight.device)
    return F.linear(eye, weight).T


def is_quantized(module: nn.Module) -> bool:
    """True when ``module``'s weight is a torchao quantized tensor."""
    return hasattr(type(getattr(module, "weight", None)), "tensor_data_names")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` in full precision: dequantized (a new tensor) when it is quantized."""
    if not is_quantized(module):
        return module.weight
    if isinstance(module, Int4Linear):
        return _dequantize_int4(module.weight).float()
    return module.weight.dequantize().float()


def weight_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: integers, scales and zero points."""
    names = getattr(type(tensor), "tensor_data_names", None)
    if names is None:
        return tensor.numel() * tensor.element_size()
    names = [*names, *getattr(type(tensor), "optional_tensor_data_names", [])]
    parts = [getattr(tensor, n, None) for n in names]
    return sum(weight_bytes(p) for p in parts if isinstance(p, torch.Tensor))


def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers outside adapters (each shared tensor once)."""
    seen: dict[int, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not st.is_adapter_param(name):
            seen[id(t)] = weight_bytes(t)
    return sum(seen.values())
