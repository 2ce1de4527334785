"""adapterkit: adapter-based parameter-efficient fine-tuning of Hugging Face Transformer models.

>>> import adapterkit as ak
>>> ak.add_adapter(model, "sentiment", "pfeiffer")
>>> ak.train_adapter(model, "sentiment")
"""

from . import formats
from .arch import ARCHITECTURES, ArchSpec, register_architecture
from .core import (
    Summary,
    active_adapters,
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
from .io import inspect_adapter, load_adapter, save_adapter
from .merging import merge_adapters
from .methods import (
    PRESETS,
    AdapterConfig,
    BottleneckConfig,
    IA3Config,
    LoRAConfig,
    PrefixConfig,
    PromptConfig,
    UnionConfig,
    union,
)

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "ArchSpec",
    "ArchitectureError",
    "BottleneckConfig",
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
]
