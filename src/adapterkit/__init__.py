"""adapterkit: adapter-based parameter-efficient fine-tuning of Hugging Face Transformer models.

>>> import adapterkit as ak
>>> ak.add_adapter(model, "sentiment", "pfeiffer")
>>> ak.train_adapter(model, "sentiment")
"""

from . import composition, formats
from .arch import ARCHITECTURES, ArchSpec, register_architecture
from .composition import Average, BatchSplit, Fuse, Parallel, PerRow, Split, Stack
from .core import (
    Summary,
    active_adapters,
    active_setup,
    add_adapter,
    bake_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge_adapter,
    set_active,
    summary,
    train_adapter,
    unmerge_adapter,
    use,
)
from .errors import AdapterError, AdapterFileError, ArchitectureError, ConfigError
from .fusion import (
    FusionConfig,
    add_fusion,
    delete_fusion,
    fusion_regularization,
    load_fusion,
    save_fusion,
    train_fusion,
)
from .io import inspect_adapter, load_adapter, save_adapter
from .merging import merge_adapters
from .methods import (
    PRESETS,
    AdapterConfig,
    BottleneckConfig,
    EAdapterConfig,
    IA3Config,
    LAdapterConfig,
    LoRAConfig,
    PAdapterConfig,
    PrefixConfig,
    PromptConfig,
    UnionConfig,
    union,
)

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "Average",
    "BatchSplit",
    "Fuse",
    "FusionConfig",
    "Parallel",
    "PerRow",
    "Split",
    "Stack",
    "active_setup",
    "add_fusion",
    "composition",
    "delete_fusion",
    "fusion_regularization",
    "load_fusion",
    "save_fusion",
    "train_fusion",
    "PRESETS",
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "ArchSpec",
    "ArchitectureError",
    "BottleneckConfig",
    "EAdapterConfig",
    "LAdapterConfig",
    "PAdapterConfig",
    "ConfigError",
    "IA3Config",
    "LoRAConfig",
    "PrefixConfig",
    "PromptConfig",
    "UnionConfig",
    "Summary",
    "active_adapters",
    "add_adapter",
    "bake_adapter",
    "delete_adapter",
    "disable_adapters",
    "formats",
    "inspect_adapter",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "merge_adapters",
    "register_architecture",
    "save_adapter",
    "set_active",
    "summary",
    "train_adapter",
    "union",
    "unmerge_adapter",
    "use",
    "callbacks",
    "training",
]


def __getattr__(name: str):
    """``ak.callbacks`` (Trainer) and ``ak.training`` (the CLI's loop) load on first use."""
    if name in ("callbacks", "training"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
