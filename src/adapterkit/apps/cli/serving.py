"""``adapterkit serve``: one model and its adapters behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse

from adapterkit.apps.cli.common import (
    MODEL_HELP,
)
from adapterkit.errors import AdapterError
from adapterkit.serve import defaults


def cmd_serve(args: argparse.Namespace) -> None:
    """An OpenAI-compatible server of one model and its adapters (``adapterkit.serve``)."""
    from adapterkit.serve.launch import Options, serve
    from adapterkit.serve.plumbing import Limits

    adapters = dict(map(_served, args.adapter))
    limits = Limits(args.max_tokens_limit, args.max_prompt_tokens, args.request_timeout)
    options = Options(adapters, args.hub, args.allow_hub_refs, args.api_key_file, args.max_batch, args.max_queue,
                      args.max_context, args.max_adapters, int(args.max_adapter_mb * 2**20), limits,
                      public_metrics=args.public_metrics, dtype=args.dtype, quantize=args.quantize,
                      prefill_chunk=args.prefill_chunk, device=args.device, router=args.router,
                      router_threshold=args.router_threshold)  # fmt: skip
    print(f"adapterkit serve on http://{args.host}:{args.port}/v1 ({args.model}, {len(adapters)} adapters)")
    serve(args.model, options, args.host, args.port)


def _served(value: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``NAME=hub:owner/name@tag``: a served adapter needs a name."""
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        raise AdapterError(f"--adapter {value!r}: give NAME=PATH or NAME=hub:owner/name@tag")
    return name, source


def add_parsers(sub) -> None:
    v = sub.add_parser("serve", help="serve a model and its adapters over an OpenAI-compatible HTTP API")
    v.add_argument("--model", required=True, help=MODEL_HELP + "; a causal LM or an encoder")
    v.add_argument("--device", help="a causal LM's: cpu, cuda or cuda:N (default: cuda when present); encoders: cpu")
    v.add_argument("--adapter", action="append", default=[], help="NAME=PATH or NAME=hub:owner/name@tag, repeatable")
    v.add_argument("--hub", help="the hub for hub: references (default: $ADAPTERKIT_HUB)")
    v.add_argument("--router", help="NAME=DIR or NAME=PATH,PATH: model NAME picks each request's adapter from "
                   "its text by the adapters' routing signatures (e.g. auto=out/)")  # fmt: skip
    v.add_argument("--router-threshold", type=float, help="the router's score above which the base model answers")
    v.add_argument("--allow-hub-refs", action="store_true", help="a request's model may be hub:owner/name@tag")
    v.add_argument("--host", default=defaults.HOST)
    v.add_argument("--port", type=int, default=defaults.PORT)
    v.add_argument("--api-key-file", help="API keys, one a line (kept hashed); without it no key is needed")
    v.add_argument("--public-metrics", action="store_true", help="/metrics and /openapi.json need no API key")
    v.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="the base model's weights")
    v.add_argument("--quantize", choices=["int8", "int4"], help="the base's Linear weights in int8/int4 (torchao)")
    v.add_argument("--max-batch", type=int, default=defaults.MAX_BATCH, help="sequences decoded together")
    v.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE, help="requests waiting; past it 429")
    v.add_argument(
        "--max-context", type=int, default=defaults.MAX_CONTEXT, help="prompt + completion tokens of one sequence"
    )
    v.add_argument("--prefill-chunk", type=int, default=defaults.PREFILL_CHUNK,
                   help="prompt tokens per prefill forward, and per step while others decode")  # fmt: skip
    v.add_argument(
        "--max-tokens-limit", type=int, default=defaults.MAX_TOKENS, help="largest max_tokens a request may ask"
    )
    v.add_argument(
        "--max-prompt-tokens", type=int, default=defaults.MAX_PROMPT_TOKENS, help="longest prompt accepted (tokens)"
    )
    v.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.REQUEST_TIMEOUT,
        help="seconds; then the generation is cancelled",
    )
    v.add_argument("--max-adapters", type=int, default=defaults.MAX_ADAPTERS, help="adapters kept loaded while idle")
    v.add_argument("--max-adapter-mb", type=float, default=defaults.MAX_ADAPTER_BYTES / 2**20,
                   help="adapter weights kept loaded while idle; also the largest hub download")  # fmt: skip
    v.set_defaults(func=cmd_serve)
