"""Running ``adapterkit serve``: the model loaded from its folder, the engine (or worker) and registry
built from the CLI's options, and uvicorn started over the app."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import FastAPI

from adapterkit.core.device import place, resolve_device
from adapterkit.core.pretrained import causal_lm, from_pretrained
from adapterkit.core.quantize import quantize_base
from adapterkit.errors import AdapterError
from adapterkit.hub.client import sweep
from adapterkit.serve import defaults
from adapterkit.serve.app import create_app
from adapterkit.serve.guard import Timeouts, run
from adapterkit.serve.plumbing import CAUSAL, ENCODER, Limits, read_keys
from adapterkit.serve.registry import Direct, Registry
from adapterkit.serve.routed import AutoRoute, auto_route, router_folders

DTYPES = ("fp32", "bf16", "fp16")  # the base's weights (adapters keep the dtype they were saved in)


def load(model_dir: str, dtype: str = "fp32", device: str | None = None):
    """The model (a folder or Hub id; eval mode, its weights in ``dtype``), its tokenizer, and its kind: a
    causal LM (on ``device``; None: CUDA when present) or an encoder (on the CPU, where its worker runs)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if dtype not in DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    weights = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]}
    config = from_pretrained(AutoConfig, model_dir)
    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or _decoder_only(config):
        model, tokenizer = causal_lm(model_dir, **weights)
        return place(model, resolve_device(device)), tokenizer, CAUSAL
    tokenizer = from_pretrained(AutoTokenizer, model_dir)
    if device not in (None, "cpu"):
        raise AdapterError(f"--device {device}: an encoder is served on the CPU; leave --device out")
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return from_pretrained(AutoModelForSequenceClassification, model_dir, **weights).eval(), tokenizer, ENCODER
    return from_pretrained(AutoModel, model_dir, **weights).eval(), tokenizer, ENCODER


def _decoder_only(config) -> bool:
    """A config that names no architecture (e.g. one converted from GGUF): a causal LM when its type
    has a causal-LM class and no masked-LM one (Llama yes; BERT, which has both, no)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    return (
        not config.architectures
        and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


@dataclasses.dataclass(frozen=True)
class Options:
    """``adapterkit serve``'s options (the CLI's flags)."""

    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    hub: str | None = None
    allow_hub_refs: bool = False
    api_key_file: str | None = None
    max_batch: int = defaults.MAX_BATCH
    max_queue: int = defaults.MAX_QUEUE
    max_context: int = defaults.MAX_CONTEXT
    max_adapters: int = defaults.MAX_ADAPTERS
    max_adapter_bytes: int = defaults.MAX_ADAPTER_BYTES
    limits: Limits = Limits()
    public_metrics: bool = False
    dtype: str = "fp32"  # the base's weights: fp32, bf16 (AVX512-BF16 CPUs: ~3x faster matmuls) or fp16
    quantize: str | None = None  # "int8" / "int4": the base's Linear weights through torchao (core.quantize)
    timeouts: Timeouts = Timeouts()  # slow clients: a request's head and body (serve.guard)
    prefill_chunk: int = (
        defaults.PREFILL_CHUNK
    )  # prompt positions per prefill forward, and per step while others decode
    device: str | None = None  # a causal LM's: cpu, cuda, cuda:N (None: CUDA when present); encoders: the CPU
    router: str | None = None  # "auto=DIR" or "auto=PATH,PATH": a model that picks the adapter (serve.routed)
    router_threshold: float | None = None  # its "none of them" score (default: RouterConfig's)


def build(model_dir: str, options: Options) -> FastAPI:
    """The app over the model in ``model_dir`` (an engine for a causal LM, a worker thread for an encoder)."""
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.registry import Bounds

    model, tokenizer, kind = load(model_dir, options.dtype, options.device)
    if options.quantize:
        quantize_base(model, options.quantize)
    if options.hub or options.allow_hub_refs:
        sweep()  # what a download killed mid-way left in the hub cache
    if kind == CAUSAL:
        engine = Engine(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
                        max_context=options.max_context, prefill_chunk=options.prefill_chunk)  # fmt: skip
    else:
        engine = Direct(model)
    route, adapters = _auto(model, tokenizer, kind, options)
    registry = Registry(engine, adapters, Bounds(options.max_adapters, options.max_adapter_bytes), options.hub)
    keys = read_keys(options.api_key_file) if options.api_key_file else frozenset()
    name = Path(model_dir).name
    return create_app(engine, tokenizer, registry, name=name, kind=kind, limits=options.limits, keys=keys,
                      allow_hub_refs=options.allow_hub_refs, aliases=[model_dir],
                      public_metrics=options.public_metrics, route=route)  # fmt: skip


def _auto(model, tokenizer, kind: str, options: Options) -> tuple[AutoRoute | None, dict[str, str]]:
    """The ``--router`` model, if any, and the adapters to serve: the given ones and the router's (a name
    given by ``--adapter`` keeps its source)."""
    if options.router is None:
        return None, dict(options.adapters)
    name, sep, value = options.router.partition("=")
    if not sep or not name or not value:
        raise AdapterError(f"--router {options.router!r}: give NAME=DIR or NAME=PATH,PATH,... (e.g. auto=adapters/)")
    if kind != CAUSAL:
        raise AdapterError("--router routes completions: serve a causal LM")
    if name in options.adapters:
        raise AdapterError(f"--router {name}: an adapter is served under that name; pick another (e.g. auto)")
    route, served = auto_route(model, tokenizer, name, router_folders(value), options.router_threshold)
    return route, {**served, **options.adapters}


def serve(model_dir: str, options: Options, host: str = defaults.HOST, port: int = defaults.PORT) -> None:
    """Run the server until SIGINT/SIGTERM (which drain running requests)."""
    # As the hub: idle keep-alive connections close after 5 s; past 512 connections at once, 503s; a
    # request's head and body have their time limits (options.timeouts)
    app = build(model_dir, options)
    run(app, host, port, options.timeouts, log_level="warning", timeout_keep_alive=5, limit_concurrency=512)
