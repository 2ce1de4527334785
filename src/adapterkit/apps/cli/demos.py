"""``adapterkit demo``, ``llm-demo``, ``multitask``, ``vision-demo``, ``image-chat-demo``, ``speech-demo``."""

from __future__ import annotations

import argparse

from adapterkit.apps.cli.common import (
    run_options,
)


def cmd_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import demo

    demo.main(quick=args.quick, output=args.output, threads=args.threads, methods=args.methods)


def cmd_llm_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import llm_demo

    llm_demo.main(
        quick=args.quick, output=args.output, threads=args.threads, methods=args.methods, quantize=args.quantize
    )


def cmd_multitask(args: argparse.Namespace) -> None:
    from adapterkit.apps import multitask

    multitask.main(quick=args.quick, output=args.output, threads=args.threads)


def cmd_vision_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import vision_demo

    vision_demo.main(quick=args.quick, output=args.output, threads=args.threads, methods=args.methods)


def cmd_image_chat_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import image_chat_demo

    image_chat_demo.main(quick=args.quick, output=args.output, threads=args.threads, work=args.work)


def cmd_speech_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import speech_demo

    speech_demo.main(quick=args.quick, output=args.output, threads=args.threads, model=args.model)


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="train adapters vs full fine-tuning on real data and print a table")
    run_options(d, "a subset of the data: about 3 minutes on 2 cores")
    d.add_argument("--methods", default="core", help="core (default), all, more, or presets: pfeiffer,ia3,...")
    d.set_defaults(func=cmd_demo)
    ld = sub.add_parser("llm-demo", help="adapters vs full fine-tuning of SmolLM2-135M-Instruct on 3 generation tasks")
    run_options(ld, "zero-shot, LoRA and full fine-tuning on small splits: under 4 minutes on 2 cores")
    ld.add_argument("--methods", help="all rows (default; --quick: zero-shot,lora,full) or presets: lora,ia3,...")
    ld.add_argument("--quantize", choices=["int8", "int4"], help="adapter rows on an int8/int4 base (torchao)")
    ld.set_defaults(func=cmd_llm_demo)
    m = sub.add_parser("multitask", help="5 tasks on one model: no forgetting, fusion, merging, storage")
    run_options(m, "small subsets: about 6 minutes on 2 cores")
    m.set_defaults(func=cmd_multitask)
    vd = sub.add_parser("vision-demo", help="image adapters vs full fine-tuning of DINOv2-S on handwritten digits")
    run_options(vd, "a slice of the digits, 2 passes: under 4 minutes on 2 cores")
    vd.add_argument("--methods", default="all", help="all (default) or presets: lora,ia3,... (or row labels)")
    vd.set_defaults(func=cmd_vision_demo)
    ic = sub.add_parser("image-chat-demo", help="SmolLM2 answers questions about images through a DINOv2 projector")
    run_options(ic, "200 training questions a type: about 6 minutes on 2 cores")
    ic.add_argument("--work", help="a folder for the rendered images and the training run (default: a new temp folder)")
    ic.set_defaults(func=cmd_image_chat_demo)
    sp = sub.add_parser("speech-demo", help="speech adapters vs full fine-tuning: ASR, speaker verification, emotion")
    run_options(sp, "small subsets: about 4 minutes on 2 cores")
    sp.add_argument("--model", default="tiny.en", help="the Whisper to adapt: tiny.en (default) or base")
    sp.set_defaults(func=cmd_speech_demo)
