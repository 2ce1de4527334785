"""adapterkit: adapter-based parameter-efficient fine-tuning of Hugging Face Transformer models.

>>> import adapterkit as ak
>>> ak.add_adapter(model, "sentiment", "pfeiffer")
>>> ak.train_adapter(model, "sentiment")

The package is layered (``Development`` in the README): ``adapterkit.core`` (adapters on a model,
composition, methods, formats, save and load), ``adapterkit.speech`` (speech heads and metrics),
``adapterkit.training``, ``adapterkit.hub`` (its server needs neither torch nor the core) and
``adapterkit.apps`` (the CLI, demos, data, converters). The names below are the public API; each
loads its module on first use, so ``import adapterkit`` itself imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {  # public name -> the module that defines it
    "adapterkit.core.adapters": (
        "Summary active_adapters active_setup add_adapter bake_adapter delete_adapter disable_adapters "
        "list_adapters merge_adapter set_active summary train_adapter unmerge_adapter use"
    ),
    "adapterkit.core.arch": "ARCHITECTURES ArchSpec WHISPER_SEQ2SEQ register_architecture",
    "adapterkit.core.composition": "Arrow Average BatchSplit Fuse Parallel PerRow Split Stack",
    "adapterkit.core.compose": "ComposeConfig ComposeResult compose",
    "adapterkit.core.fusion": (
        "FusionConfig add_fusion delete_fusion fusion_regularization load_fusion save_fusion train_fusion"
    ),
    "adapterkit.core.generation": "generate",
    "adapterkit.core.images": "ImageEncoder image_token",
    "adapterkit.core.io": "inspect_adapter save_adapter",
    "adapterkit.core.merging": "combine_adapters",
    "adapterkit.core.quantize": "QuantizeReport quantize_base",
    "adapterkit.core.routing": "Router RouterConfig Signature load_signature save_signature signature",
    "adapterkit.core.methods": (
        "PRESETS AdapterConfig BottleneckConfig EAdapterConfig IA3Config ImageConfig LAdapterConfig LoRAConfig "
        "PAdapterConfig PrefixConfig PromptConfig UnionConfig union"
    ),
    "adapterkit.errors": "AdapterError AdapterFileError ArchitectureError ConfigError",
    "adapterkit.hub.client": "load_adapter",  # hub: references resolve here, above the core's loader
}
_MODULES = {  # public submodules
    "composition": "adapterkit.core.composition",
    "formats": "adapterkit.core.formats",
    "methods": "adapterkit.core.methods",  # every method's config (ak.methods.LoHaConfig, ...)
    "routing": "adapterkit.core.routing",
    "callbacks": "adapterkit.training.callbacks",
    "training": "adapterkit.training",
}
_NAMES = {name: module for module, names in _WHERE.items() for name in names.split()}

__all__ = sorted([*_NAMES, *_MODULES])


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *__all__]
