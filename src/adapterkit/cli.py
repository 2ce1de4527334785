"""``adapterkit`` command line: ``demo``, ``info`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import AdapterError


def cmd_demo(args: argparse.Namespace) -> None:
    from . import demo

    demo.main(quick=args.quick, output=args.output, threads=args.threads, methods=args.methods)


def cmd_info(args: argparse.Namespace) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from .arch import find_layers, model_type, spec_for
    from .methods.lora import find_targets

    model = AutoModel.from_pretrained(args.model_dir)
    spec = spec_for(model)
    layers = [name for name, _ in find_layers(model, spec)]
    print(f"model type:      {model_type(model)} ({type(model).__name__})")
    print(f"parameters:      {sum(p.numel() for p in model.parameters()):,}")
    print(f"blocks:          {len(layers)} ({layers[0]} ... {layers[-1]})")
    print(f"layout:          {'post-LN' if spec.post_ln else 'pre-LN'}")
    for field in ("attn_in", "attn_out", "ffn_in", "ffn_out", "attn_norm", "ffn_norm"):
        print(f"{field + ':':<16} {getattr(spec, field)}")
    targets = find_targets(model, list(spec.lora_targets))
    print(f"lora targets:    {', '.join(spec.lora_targets)} ({len(targets)} modules)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .io import inspect_adapter

    info = inspect_adapter(args.path)
    tensors = info.pop("tensors")
    fingerprint = info["base_model"].pop("fingerprint", {})
    info["base_model"]["fingerprint_params"] = len(fingerprint)
    info["params"] = sum(_numel(shape) for shape in tensors.values())
    print(json.dumps(info, indent=2))
    for name, shape in tensors.items():
        print(f"{name}  {shape}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit", description="Adapters for Transformer models.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train adapters vs full fine-tuning on real data and print a table")
    d.add_argument("--quick", action="store_true", help="a subset of the data: about 3 minutes on 2 cores")
    d.add_argument("--output", help="also write the table (Markdown) to this file")
    d.add_argument("--threads", type=int, help="torch threads (default: 2)")
    d.add_argument("--methods", default="core", help="core (default), all, more, or presets: pfeiffer,ia3,...")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="show a model's architecture, injection points and parameter count")
    i.add_argument("model_dir", help="a local model folder (from save_pretrained)")
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("inspect", help="show a saved adapter's config and tensors")
    s.add_argument("path")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (AdapterError, OSError) as e:
        print(f"adapterkit: error: {e}", file=sys.stderr)
        return 2
    return 0
