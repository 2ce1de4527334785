"""``adapterkit train``, ``eval`` and ``compare``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from adapterkit.apps.cli.common import (
    MODEL_HELP,
    device_option,
)
from adapterkit.errors import AdapterError
from adapterkit.runs import TASK_NAMES


def cmd_train(args: argparse.Namespace) -> None:
    """Merge ``--config run.yaml`` with the options given (options win) and train."""
    import dataclasses
    import shlex

    from adapterkit.training import TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "argv") and v is not None}
    overrides = dict(_assignment(item) for item in given.pop("set", []))
    values = {**_read_yaml(args.config), **given} if args.config else given
    values["set"] = {**values.get("set", {}), **overrides}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise AdapterError(f"unknown training option(s) {unknown} in {args.config}; known: {sorted(fields)}")
    missing = [k for k in ("model", "data", "output") if k not in values]
    if missing:
        raise AdapterError(f"missing {', '.join('--' + k for k in missing)} (on the command line or in --config)")
    config = TrainConfig(**values)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    metrics = train(config, command="adapterkit " + shlex.join(args.argv))
    if metrics["distributed"]["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(f"best validation {metrics['selection_metric']}: {metrics['best']}; wrote {values['output']}")


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AdapterError(f"cannot read the run config {path}: {e}") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _assignment(item: str) -> tuple[str, object]:
    """``key=value`` with a JSON value (``r=16``, ``dropout=0.1``, ``target_modules=["query"]``) or a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise AdapterError(f"--set takes key=value, not {item!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def cmd_eval(args: argparse.Namespace) -> None:
    """Score a train output on a data file; without ``--adapter``, the base model itself (zero-shot)."""
    from adapterkit.training import evaluate_base, evaluate_output

    options = {"device": args.device, "autocast": args.autocast}
    if args.adapter:
        scores = evaluate_output(args.model, args.adapter, args.data, args.batch_size, args.generate, **options)
    elif not args.task:
        raise AdapterError("without --adapter, eval scores the base model zero-shot: pass --task chat or causal-lm")
    else:
        baseline = {"text_column": args.text_column, "max_length": args.max_length}
        scores = evaluate_base(args.model, args.data, args.task, args.batch_size, args.generate, **baseline, **options)
    print(json.dumps(scores))


def cmd_compare(args: argparse.Namespace) -> None:
    from adapterkit.training import compare

    print(compare(args.outputs))


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train an adapter (or --full-finetune) on local data; torchrun for DDP")
    t.add_argument("--config", help="a YAML file of these options (keys as below, '-' or '_'); options win")
    t.add_argument("--model", help=MODEL_HELP)
    t.add_argument("--data", help="training data: CSV, JSONL, Parquet or a save_to_disk folder")
    t.add_argument("--validation", help="validation data, evaluated each epoch; the best adapter is kept")
    t.add_argument("--task", choices=sorted(TASK_NAMES))
    t.add_argument("--text-column",
                   help="input column (text; tokens for token-classification; audio for ctc; image-classification: "
                   "image, its default)")  # fmt: skip
    t.add_argument("--label-column")
    t.add_argument("--adapter", help="a preset: pfeiffer, houlsby, lora, ia3, prefix, ... (default pfeiffer)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="adapter config override, repeatable")
    t.add_argument("--full-finetune", action="store_true", default=None, help="train every weight, no adapter")
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    t.add_argument("--lr", type=float, help="default 1e-3 (adapters), 5e-5 (full fine-tuning)")
    t.add_argument("--batch-size", type=int, help="the global batch (split across torchrun processes)")
    t.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    t.add_argument("--seed", type=int)
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 100) and at each epoch's end")
    t.add_argument("--patience", type=int, help="early stopping: evaluations without improvement")
    t.add_argument("--metric", help="the selection metric (default: the task's first)")
    t.add_argument("--threads", type=int, help="torch threads")
    t.add_argument("--vision-encoder", help="image-chat: the frozen vision model's folder (e.g. DINOv2)")
    t.add_argument("--image-size", type=int, help="image-chat: pixels a side the encoder sees (default 112)")
    t.add_argument("--image-pool", type=int, help="image-chat: patch features pooled N x N (default 2)")
    t.add_argument("--quantize", choices=["int8", "int4"], help="keep the frozen base's Linear weights in int8/int4")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="the frozen base's weights (default fp32)")
    t.add_argument("--autocast", choices=["bf16", "fp16", "none"],
                   help="compute the forward under torch.autocast (default: bf16 on CUDA, none on a CPU)")  # fmt: skip
    t.add_argument("--adapter-dtype", choices=["fp32", "bf16"],
                   help="the adapter's and trained head's weights (default fp32: master weights)")  # fmt: skip
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each layer's activations in the backward: less memory, more time")  # fmt: skip
    t.add_argument("--grad-accum", type=int, help="micro-batches of --batch-size per optimizer step (default 1)")
    t.add_argument("--packing", action="store_true", default=None,
                   help="causal-lm/chat: a micro-batch's examples in one row, unpadded, attending apart")  # fmt: skip
    t.add_argument("--resume", action="store_true", default=None, help="continue the run in --output")
    t.add_argument("--fsdp", action="store_true", default=None, help="torchrun: shard the frozen base (FSDP2)")
    t.add_argument("--output", help="the output folder")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    t.add_argument("--report-to", choices=["none", "tensorboard"],
                   help="tensorboard: loss, lr, grad norm, tokens/s, eval metrics in OUTPUT/tensorboard")  # fmt: skip
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="score an `adapterkit train` output, or the base model alone, on a data file")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--adapter", help="the train output folder (OUT); without it the base model is scored zero-shot")
    e.add_argument("--data", required=True, help="CSV, JSONL, Parquet or a save_to_disk folder")
    e.add_argument("--task", choices=["causal-lm", "chat"], help="without --adapter: the task to score (a run's own)")
    e.add_argument("--text-column", default="text", help="without --adapter: the input column (default text)")
    e.add_argument("--max-length", type=int, default=128, help="without --adapter: tokens per example (default 128)")
    device_option(e)
    e.add_argument("--autocast", choices=["bf16", "fp16", "none"],
                   help="compute under torch.autocast (default: the run's own; else bf16 on CUDA)")  # fmt: skip
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument(
        "--generate",
        choices=["exact", "label", "json"],
        help="chat runs: score greedy answers against each conversation's last message (exact match of a "
        "normalised answer, the first label word, or the fields of a JSON object) instead of perplexity",
    )
    e.set_defaults(func=cmd_eval)
    cp = sub.add_parser("compare", help="metrics, trainable params and sizes of train outputs side by side")
    cp.add_argument("outputs", nargs="+", help="train output folders")
    cp.set_defaults(func=cmd_compare)
