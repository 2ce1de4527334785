"""``adapterkit predict``: classify texts with loaded adapters and a composition."""

from __future__ import annotations

import argparse
import json

from adapterkit.apps.cli.common import (
    MODEL_HELP,
    computing,
    device_option,
    named,
    num_labels,
    place,
    read_texts,
    resolved,
)
from adapterkit.errors import AdapterError


def cmd_predict(args: argparse.Namespace) -> None:
    """Load adapters and fusions into a classifier, activate a composition, classify texts."""
    from adapterkit.core import adapters, fusion
    from adapterkit.core.backbone import head_parameters
    from adapterkit.core.composition import parse_expression, walk
    from adapterkit.core.io import inspect_adapter, load_adapter
    from adapterkit.runs import adapter_folder, is_run, run_config

    folders = [named(value) for value in args.adapter]
    folders = [(name, resolved(path)) for name, path in folders]
    runs = {i: run_config(path) for i, (_, path) in enumerate(folders) if is_run(path)}
    folders = [(name, str(adapter_folder(path))) for name, path in folders]
    heads = [info["head"] for info in map(inspect_adapter, [path for _, path in folders]) if info["head"]]
    model, tokenizer = _classifier(args.model, num_labels(heads[-1]) if heads else None)
    if runs:  # an `adapterkit train` output names its labels
        model.config.id2label = dict(enumerate(runs[max(runs)]["labels"]))
    names, heads = [], {}  # each adapter's head as it loaded it (the model keeps the last): --route swaps them
    for name, path in folders:
        names.append(load_adapter(model, path, name))
        heads[names[-1]] = {k: p.detach().clone() for k, p in head_parameters(model).items()}
    labels = {
        n: dict(enumerate(runs[i]["labels"])) if i in runs else model.config.id2label for i, n in enumerate(names)
    }
    fusions = [fusion.load_fusion(model, path) for path in args.fusion]
    place(model, args.device)
    if args.setup:
        setup = parse_expression(args.setup)
    else:  # the last fusion loaded, else the last adapter
        setup = adapters.st.get_state(model).fusions[fusions[-1]][0] if fusions else names[-1]
    adapters.set_active(model, setup)
    if args.list:
        print(adapters.summary(model))
        return
    texts = list(args.text) + (read_texts(args.input) if args.input else [])
    if not texts:
        raise AdapterError("nothing to classify: pass --text TEXT (repeatable) or --input FILE")
    if args.route:
        sources = dict(zip(names, [p for _, p in folders], strict=True))
        for row in _routed(model, tokenizer, sources, heads, labels, texts, args.route_threshold):
            print(json.dumps(row))
        return
    whole = any(b.kind in ("per_row", "batch_split") for b in walk(adapters.active_setup(model)))
    size = len(texts) if whole else 64  # a per-row setup names every row of one batch
    labels = model.config.id2label
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        scores = _scores(model, tokenizer, chunk)
        for text, row in zip(chunk, scores.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            print(json.dumps({"text": text, "label": labels.get(best, best), "scores": [round(v, 5) for v in row]}))


def _routed(
    model, tokenizer, folders: dict[str, str], heads: dict, labels: dict, texts: list[str], threshold: float | None
) -> list[dict]:
    """Each text through the adapter its routing signature picks, with that adapter's head and labels, in
    batches of one adapter; a text of no adapter's task (every score above the threshold) gets no label."""
    import torch

    from adapterkit.core import adapters
    from adapterkit.core.backbone import head_parameters
    from adapterkit.core.routing import Router, RouterConfig, has_signature, load_signature

    for name, folder in folders.items():
        if not has_signature(folder):
            raise AdapterError(
                f"--route: adapter {name!r} has no routing signature in {folder}; `adapterkit train` writes one "
                "(routing.json), or make one with ak.signature(model, tokenizer, examples) and ak.save_signature"
            )
    config = RouterConfig() if threshold is None else RouterConfig(threshold=threshold)
    chosen = Router(model, tokenizer, {n: load_signature(f) for n, f in folders.items()}, config).route(texts)
    rows = [{"text": t, "adapter": None, "label": None, "scores": []} for t in texts]
    for name in {c for c in chosen if c is not None}:
        adapters.set_active(model, name)
        with torch.no_grad():
            for key, p in head_parameters(model).items():
                p.copy_(heads[name][key])
        mine = [i for i, c in enumerate(chosen) if c == name]
        for start in range(0, len(mine), 64):
            part = mine[start : start + 64]
            for i, row in zip(part, _scores(model, tokenizer, [texts[i] for i in part]).tolist(), strict=True):
                best = max(range(len(row)), key=row.__getitem__)
                rows[i] |= {
                    "adapter": name,
                    "label": labels[name].get(best, best),
                    "scores": [round(v, 5) for v in row],
                }
    return rows


def _classifier(model_dir: str, num_labels: int | None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterkit.core.pretrained import from_pretrained

    kwargs = {"num_labels": num_labels} if num_labels else {}
    model = from_pretrained(AutoModelForSequenceClassification, model_dir, **kwargs).eval()
    return model, from_pretrained(AutoTokenizer, model_dir)


def _scores(model, tokenizer, texts: list[str]):
    import torch

    from adapterkit.core.device import to_device

    inputs = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad(), computing(model):
        return model(**to_device(dict(inputs), next(model.parameters()).device)).logits.float().softmax(-1)


def add_parsers(sub) -> None:
    r = sub.add_parser("predict", help="classify texts with loaded adapters and an active composition")
    r.add_argument("--model", required=True, help=MODEL_HELP)
    device_option(r)
    r.add_argument(
        "--adapter", action="append", default=[], required=True, help="[NAME=]PATH or hub:owner/name, repeatable"
    )
    r.add_argument("--fusion", action="append", default=[], help="a save_fusion folder, repeatable")
    r.add_argument("--setup", help="e.g. 'movie', 'a, b' (stack), 'Fuse(a, b)', 'Average(a, b, weights=[1, 3])'")
    r.add_argument("--text", action="append", default=[], help="a text to classify, repeatable")
    r.add_argument("--input", help="a file of texts: one per line, or .jsonl objects with 'text'")
    r.add_argument("--list", action="store_true", help="list adapters, fusions and the active setup; no prediction")
    r.add_argument("--route", action="store_true", help="each text through the adapter its routing signature "
                   "picks (with that adapter's head); a text of no adapter's task gets no label")  # fmt: skip
    r.add_argument("--route-threshold", type=float, help="--route's score above which a text gets no adapter "
                   "(default: RouterConfig's; choose one on validation data with ak.Router.calibrate)")  # fmt: skip
    r.set_defaults(func=cmd_predict)
