"""A signature's files beside an adapter's own: ``routing.safetensors`` (``mean``, ``scale`` (D,), ``components``
(r, D), ``spread`` (r,), ``residual`` (1,), ``calibration`` (n,)) and ``routing.json`` (layer, depth, sample
size, the base model's type and fingerprint). Both are read as hostile: sizes, header, keys, dtypes,
shapes and values are checked before use, and a problem raises :class:`~adapterkit.errors.AdapterFileError`
naming it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapterkit.core.routing.signatures import MAX_DIM, MAX_RANK, MAX_SAMPLES, TENSORS, Signature
from adapterkit.errors import AdapterFileError, ConfigError
from adapterkit.files import write_folder

SIGNATURE_FILE = "routing.safetensors"
SIGNATURE_JSON = "routing.json"
SIGNATURE_FORMAT = "adapterkit-routing"
SIGNATURE_VERSION = 1
# Caps on what a file may declare: far above any real signature, far below what could exhaust memory.
MAX_FILE_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 64 * 2**10
MAX_JSON_BYTES = 32 * 2**20
DTYPES = {"F32", "F16", "BF16"}


def save_signature(folder: str | os.PathLike, sig: Signature) -> Path:
    """Write ``sig`` as ``routing.safetensors`` + ``routing.json`` into ``folder`` (an adapter's folder:
    its other files stay; ``adapterkit hub push`` sends both along)."""
    meta = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "layer": sig.layer,
        "depth": sig.depth,
        "samples": sig.calibration.shape[0],
        "base_model": sig.base_model,
    }
    tensors = {key: getattr(sig, key).contiguous() for key in TENSORS}

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / SIGNATURE_FILE, metadata={"format": "pt"})
        (tmp / SIGNATURE_JSON).write_text(json.dumps(meta) + "\n")

    return write_folder(Path(folder), fill, last=SIGNATURE_JSON)


def has_signature(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a routing signature (not whether it is valid: :func:`load_signature` checks)."""
    return (Path(folder) / SIGNATURE_JSON).is_file()


def load_signature(folder: str | os.PathLike) -> Signature:
    """The routing signature saved in ``folder``, every field checked (:class:`AdapterFileError` if not)."""
    folder = Path(folder)
    if not has_signature(folder):
        raise AdapterFileError(
            f"{folder} holds no routing signature ({SIGNATURE_JSON}); compute one from a few of the adapter's "
            "inputs: ak.save_signature(folder, ak.signature(model, tokenizer, inputs))"
        )
    meta, tensors = _read_meta(folder / SIGNATURE_JSON), _read_tensors(folder / SIGNATURE_FILE)
    if tensors["calibration"].shape[0] != meta["samples"]:
        raise AdapterFileError(f"{folder / SIGNATURE_FILE}: calibration length differs from {SIGNATURE_JSON}'s samples")
    try:
        return Signature(**tensors, layer=meta["layer"], depth=meta["depth"], base_model=meta["base_model"])
    except ConfigError as e:
        raise AdapterFileError(f"{folder}: {e}; compute the signature again (ak.signature)") from None


def _refuse(file: Path, problem: str) -> AdapterFileError:
    return AdapterFileError(f"{file}: {problem}; not a routing signature adapterkit wrote, compute it again")


def _read_meta(file: Path) -> dict[str, Any]:
    if file.stat().st_size > MAX_JSON_BYTES:
        raise _refuse(file, f"{file.stat().st_size} bytes, over the {MAX_JSON_BYTES} a signature's JSON may have")
    try:
        meta = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise _refuse(file, f"not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIGNATURE_FORMAT:
        raise _refuse(file, f'no "format": "{SIGNATURE_FORMAT}"')
    if meta.get("version") != SIGNATURE_VERSION:
        raise _refuse(file, f"version {meta.get('version')!r}, this adapterkit reads version {SIGNATURE_VERSION}")
    for key in ("layer", "depth", "samples"):
        if type(meta.get(key)) is not int:
            raise _refuse(file, f"{key} must be an integer, not {meta.get(key)!r}")
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The three tensors, the header checked before the library reads the file (sizes, keys, dtypes, shapes)."""
    if not file.is_file():
        raise _refuse(file, "missing (the JSON is there)")
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _refuse(file, f"{size} bytes, over the {MAX_FILE_BYTES} a signature may have")
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise _refuse(file, f"header length {length} out of range (file of {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise _refuse(file, f"corrupt header ({e})") from None
    _check_header(file, header)
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise _refuse(file, f"corrupt or truncated ({e})") from None
    return {key: tensors[key].float() for key in TENSORS}


def _check_header(file: Path, header: Any) -> None:
    keys = set(header) - {"__metadata__"} if isinstance(header, dict) else set()
    if keys != set(TENSORS):
        raise _refuse(file, f"tensors {sorted(keys)}, expected {sorted(TENSORS)}")
    caps = {
        "mean": (MAX_DIM,),
        "scale": (MAX_DIM,),
        "components": (MAX_RANK, MAX_DIM),
        "spread": (MAX_RANK,),
        "residual": (1,),
        "calibration": (MAX_SAMPLES,),
    }
    for key, cap in caps.items():  # every key is there: checked above
        entry = header[key]
        dtype, shape = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
        if dtype not in DTYPES:
            raise _refuse(file, f"{key} has dtype {dtype!r}, expected one of {sorted(DTYPES)}")
        fits = isinstance(shape, list) and len(shape) == len(cap)
        if not fits or not all(type(d) is int and 1 <= d <= c for d, c in zip(shape, cap, strict=True)):
            raise _refuse(file, f"{key} has shape {shape!r}, expected {len(cap)} dimensions of at most {list(cap)}")
