"""``adapterkit export``: a model and its adapter for llama.cpp (GGUF), ONNX Runtime, or merged."""

from __future__ import annotations

import argparse

from adapterkit.errors import AdapterError

TARGETS = ("gguf", "onnx", "merged")
TYPES = ("f32", "f16", "q8_0")


def add_parser(sub) -> None:
    """Register ``export`` on the CLI's subparsers."""
    e = sub.add_parser("export", help="write a model and adapter for llama.cpp (GGUF), ONNX Runtime, or merged")
    e.add_argument("out", help="the folder to write: new, empty, or an earlier export's (other files are refused)")
    e.add_argument("--model", required=True, help="the base model: a local folder or a Hugging Face Hub id")
    e.add_argument("--adapter", help="[NAME=]PATH: an adapter folder, an `adapterkit train` output or hub:owner/name")
    e.add_argument("--to", required=True, choices=TARGETS,
                   help="gguf: llama.cpp (base + LoRA adapter file); onnx: ONNX Runtime; merged: a transformers "
                   "checkpoint with the adapter merged")  # fmt: skip
    e.add_argument("--type", choices=TYPES, help="gguf: the weights' type (default f16)")
    e.add_argument("--merged", action="store_true",
                   help="gguf: one GGUF of the model with the adapter merged (not base + adapter files)")  # fmt: skip
    e.add_argument("--quantize", choices=["int8"], help="onnx: int8 weights (onnxruntime's quantization)")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """The ``export`` command's handler: check the options, export, print the folder and its files."""
    check_options(args)
    if args.to == "onnx":
        from adapterkit.export.onnx import export_onnx  # written beside this module; loads onnx only when asked

        path = export_onnx(args.model, args.adapter, args.out, args.quantize)
    elif args.to == "merged":
        from adapterkit.export.merged import export_merged

        path = export_merged(args.model, args.adapter, args.out)
    else:
        from adapterkit.export.gguf import export_gguf

        path = export_gguf(args.model, args.adapter, args.out, args.type or "f16", args.merged)
    print(f"wrote {path}")


def check_options(args: argparse.Namespace) -> None:
    """Options that belong to another target are refused rather than ignored."""
    if args.to != "gguf" and (args.type or args.merged):
        raise AdapterError(f"--type and --merged are options of --to gguf, not --to {args.to}")
    if args.to != "onnx" and args.quantize:
        raise AdapterError("--quantize is an option of --to onnx; for gguf use --type q8_0")
