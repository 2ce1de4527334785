"""``adapterkit generate`` and ``chat``: a causal LM and its adapters."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from adapterkit.apps.cli.common import (
    MODEL_HELP,
    computing,
    device_option,
    named,
    place,
    read_rows,
    resolved,
)
from adapterkit.errors import AdapterError, shown


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete prompts with a causal LM and its adapters; one JSON line per prompt (or streamed text)."""
    from adapterkit.core.generation import generate

    model, tokenizer, names = load_with_adapters(args.model, args.adapter, args.device)
    prompts, chosen = _prompts(args)
    per_prompt = [name or (names[-1] if names else None) for name in chosen] if len(names) > 1 else None
    if args.stream:
        if len(prompts) != 1:
            raise AdapterError("--stream prints one completion as it is made: pass a single --prompt")
        with computing(model, args.autocast):
            generate(model, tokenizer, prompts, streamer=printer(tokenizer, args.stop), **_sampling(args, per_prompt))
        return
    with computing(model, args.autocast):
        texts = generate(model, tokenizer, prompts, **_sampling(args, per_prompt))
    for prompt, text in zip(prompts, texts, strict=True):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive conversation: each line read is a user turn, the answer is streamed back."""
    from adapterkit.core.generation import generate

    model, tokenizer, _ = load_with_adapters(args.model, args.adapter, args.device)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("adapterkit chat: type a message; an empty line or Ctrl-D ends", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        with computing(model, args.autocast):
            answer = generate(model, tokenizer, [messages], streamer=printer(tokenizer, args.stop), **_sampling(args))
        messages.append({"role": "assistant", "content": answer[0]})


def load_with_adapters(model_dir: str, given: Sequence[str], device: str | None = None):
    """The base model (a folder or Hub id; or a full fine-tuning run's model) with the adapters ``[NAME=]PATH``
    loaded, on ``device`` (None: CUDA when present)."""

    from adapterkit.core.io import load_adapter
    from adapterkit.core.pretrained import causal_lm
    from adapterkit.runs import adapter_folder, is_run, run_config

    folders = [(name, resolved(path)) for name, path in map(named, given)]
    full = [path for _, path in folders if is_run(path) and run_config(path).get("full_finetune")]
    if full and len(folders) > 1:
        raise AdapterError(f"{full[0]} is a full fine-tuning run: it replaces the model, so pass it alone")
    source = str(Path(full[0]) / "model") if full else model_dir
    model, tokenizer = causal_lm(source)
    names = [] if full else [load_adapter(model, adapter_folder(path), name, activate=True) for name, path in folders]
    return place(model, device), tokenizer, names


def _prompts(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    """The prompts (``--prompt`` and ``--input``) and the adapter each names (JSONL ``"adapter"``)."""
    rows = [{"text": p} for p in args.prompt] + (read_rows(args.input) if args.input else [])
    if not rows:
        raise AdapterError("nothing to complete: pass --prompt TEXT (repeatable) or --input FILE")
    return [r["text"] for r in rows], [r.get("adapter") for r in rows]


def _sampling(args: argparse.Namespace, per_prompt=None) -> dict:
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    return options | {"seed": args.seed, "stop": args.stop, "per_prompt": per_prompt, "chat": not args.raw}


def printer(tokenizer, stop: Sequence[str]):
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


def add_parsers(sub) -> None:
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--model", required=True, help=MODEL_HELP + "; a causal LM")
    device_option(sampling)
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
