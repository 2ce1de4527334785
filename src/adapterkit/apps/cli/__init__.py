"""``adapterkit`` command line: one module per command group, each parser beside its handler (``add_parsers``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from adapterkit.apps.cli import demos, generation, hub, predict, serving, tools, training
from adapterkit.errors import AdapterError, shown
from adapterkit.export import command as export_command

GROUPS = (demos, predict, training, generation, hub, serving, tools)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit", description="Adapters for Transformer models.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    export_command.add_parser(sub)
    return p


# their models and data are local: no hub lookups
OFFLINE = {"demo", "llm-demo", "multitask", "speech-demo", "vision-demo", "image-chat-demo", "predict"}


def quiet_libraries() -> None:
    """transformers logs errors only: through its environment variable, read when it is first imported
    (so that a command which never needs it, e.g. ``hub serve``, never imports it), or at once if it was.
    torchao (imported by transformers) warns that its CUDA kernels do not load on a CPU: errors only too."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``adapterkit`` command; process-wide settings are made here, never in the library."""
    args = parser().parse_args(argv)
    if args.command in OFFLINE:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()  # a new task head's "newly initialized" weights are expected here
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the model card's "exact command"
    try:
        args.func(args)
    except (AdapterError, OSError) as e:
        print(f"adapterkit: error: {shown(str(e))}", file=sys.stderr)  # a hub's or a file's text: no terminal codes
        return 2
    return 0
