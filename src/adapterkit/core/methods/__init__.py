"""Method registry: config classes by ``method`` name, and named presets.

Adding a method = its own file here, one line in ``METHODS`` and its presets in ``PRESETS``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterkit.core.methods.adalora import AdaLoRAConfig
from adapterkit.core.methods.base import AdapterConfig, AdapterModule
from adapterkit.core.methods.boft import BOFTConfig
from adapterkit.core.methods.bottleneck import BottleneckConfig
from adapterkit.core.methods.e_adapter import EAdapterConfig
from adapterkit.core.methods.fourierft import FourierFTConfig
from adapterkit.core.methods.ia3 import IA3Config
from adapterkit.core.methods.image import ImageConfig
from adapterkit.core.methods.l_adapter import LAdapterConfig
from adapterkit.core.methods.ln_tuning import LNTuningConfig
from adapterkit.core.methods.loha import LoHaConfig
from adapterkit.core.methods.lokr import LoKrConfig
from adapterkit.core.methods.lora import LoRAConfig
from adapterkit.core.methods.oft import OFTConfig
from adapterkit.core.methods.p_adapter import PAdapterConfig
from adapterkit.core.methods.p_tuning import PTuningConfig
from adapterkit.core.methods.prefix import PrefixConfig
from adapterkit.core.methods.prompt import PromptConfig
from adapterkit.core.methods.reft import LoReftConfig
from adapterkit.core.methods.trainable_tokens import TrainableTokensConfig
from adapterkit.core.methods.union import UnionConfig, union
from adapterkit.core.methods.vera import VeRAConfig
from adapterkit.errors import ConfigError

METHODS: dict[str, type[AdapterConfig]] = {
    cls.method: cls
    for cls in (
        BottleneckConfig,
        LoRAConfig,
        IA3Config,
        PrefixConfig,
        PromptConfig,
        UnionConfig,
        EAdapterConfig,
        LAdapterConfig,
        PAdapterConfig,
        ImageConfig,
        LoHaConfig,
        LoKrConfig,
        VeRAConfig,
        LNTuningConfig,
        FourierFTConfig,
        OFTConfig,
        BOFTConfig,
        PTuningConfig,
        TrainableTokensConfig,
        AdaLoRAConfig,
        LoReftConfig,
    )
}

_PFEIFFER = BottleneckConfig()
_HOULSBY = BottleneckConfig(mh_adapter=True, original_ln_before=False, non_linearity="swish")
_PARALLEL = BottleneckConfig(
    reduction_factor=2, original_ln_before=False, is_parallel=True, scaling=4.0, init_weights="mam_adapter"
)
PRESETS: dict[str, AdapterConfig] = {
    "pfeiffer": _PFEIFFER,
    "seq_bn": _PFEIFFER,
    "houlsby": _HOULSBY,
    "double_seq_bn": _HOULSBY,
    "parallel": _PARALLEL,
    "par_bn": _PARALLEL,
    "lora": LoRAConfig(),
    "dora": LoRAConfig(use_dora=True),
    "pissa": LoRAConfig(init_weights="pissa"),
    "olora": LoRAConfig(init_weights="olora"),
    "loftq": LoRAConfig(init_weights="loftq"),
    "loha": LoHaConfig(),
    "lokr": LoKrConfig(),
    "vera": VeRAConfig(),
    "ln_tuning": LNTuningConfig(),
    "fourierft": FourierFTConfig(),
    "oft": OFTConfig(),
    "boft": BOFTConfig(),
    "p_tuning": PTuningConfig(),
    "adalora": AdaLoRAConfig(),
    "loreft": LoReftConfig(),
    "noreft": LoReftConfig(orthogonality=False),
    "direft": LoReftConfig(orthogonality=False, subtract_projection=False),
    "trainable_tokens": TrainableTokensConfig(),  # the config's special tokens, or token_indices=[...]
    "ia3": IA3Config(),
    "ia3_adapterhub": IA3Config(convention="adapterhub"),
    "compacter": dataclasses.replace(_HOULSBY, reduction_factor=32, non_linearity="gelu", phm_layer=True),
    "compacter++": dataclasses.replace(_PFEIFFER, reduction_factor=32, non_linearity="gelu", phm_layer=True),
    "prefix": PrefixConfig(),
    "prefix_tuning": PrefixConfig(),
    "prompt": PromptConfig(),
    "prompt_tuning": PromptConfig(),
    "e_adapter": EAdapterConfig(),
    "l_adapter": LAdapterConfig(),
    "p_adapter": PAdapterConfig(),
    "el": UnionConfig([EAdapterConfig(), LAdapterConfig()]),
    "elp": UnionConfig([EAdapterConfig(), LAdapterConfig(), PAdapterConfig()]),
    "mam": UnionConfig([PrefixConfig(bottleneck_size=800), _PARALLEL]),
    "unipelt": UnionConfig(
        [
            LoRAConfig(r=8, alpha=2, use_gating=True),
            PrefixConfig(prefix_length=10, use_gating=True),
            dataclasses.replace(_PFEIFFER, use_gating=True),
        ]
    ),
}


def resolve_config(config: str | AdapterConfig, **overrides: Any) -> AdapterConfig:
    """A preset name or config object, with keyword overrides of its fields, validated."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown preset {config!r}; available presets: {', '.join(PRESETS)}")
        config = PRESETS[config]
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"expected a preset name or an adapter config, got {type(config).__name__}")
    return config.replace(**overrides)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Inverse of ``AdapterConfig.to_dict``."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"unknown adapter method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method].from_dict(data)  # validated when built


__all__ = [
    "AdaLoRAConfig",
    "AdapterConfig",
    "AdapterModule",
    "BOFTConfig",
    "BottleneckConfig",
    "EAdapterConfig",
    "LAdapterConfig",
    "OFTConfig",
    "PAdapterConfig",
    "PTuningConfig",
    "FourierFTConfig",
    "IA3Config",
    "ImageConfig",
    "LNTuningConfig",
    "LoHaConfig",
    "LoReftConfig",
    "LoKrConfig",
    "LoRAConfig",
    "PrefixConfig",
    "PromptConfig",
    "TrainableTokensConfig",
    "UnionConfig",
    "VeRAConfig",
    "union",
    "PRESETS",
    "METHODS",
]
