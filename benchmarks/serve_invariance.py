"""Batch invariance and throughput of the serving engine on SmolLM2-135M-Instruct (fp32, sdpa, CPU).

    .venv/bin/python benchmarks/serve_invariance.py [--threads 1] [--output benchmarks/results_serve_invariance.md]

Invariance: short chat prompts, each with its own adapter (8 LoRA, IA3, Pfeiffer, Houlsby, prefix, prompt,
or none; random weights), max 16 greedy tokens. Each request served alone by the engine, then all of them at
once (submitted in two waves, so some join a running batch): the share whose tokens differ, and whose
log-probabilities differ in any bit. The same prompts through ``ak.generate`` (transformers' left-padded
``generate`` with a ``PerRow`` adapter per prompt, and without adapters) batched vs one at a time; and the
engine alone vs ``ak.generate`` of the single prompt. Throughput: the engine with 8 distinct LoRA adapters
vs the bare model, 1/8/16 concurrent requests of 16 tokens (max_batch 16). The CPU is shared with other
work, so times are indicative.

Then the loads that reach the engine's other paths, on a model without the prefix adapter (whose attention
function makes the engine prefill one prompt a forward): a burst (every request at once: prompts packed
into shared prefill forwards), and long prompts (~200 tokens, ``prefill_chunk`` 64: each prefilled in
chunks while the first wave decodes), in fp32 and on a bf16 base; each request against itself alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import transformers as T  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.apps.models import smollm2  # noqa: E402
from adapterkit.serve.engine import Engine, Sampling  # noqa: E402

sys.path.insert(0, str(HERE))
from serve_load import quiet_line  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "List two planets of the solar system.",
    "Say something kind.",
    "What does a bee make?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
]
ADAPTERS = [*(f"lora{i}" for i in range(8)), "ia3", "pfeiffer", "houlsby", "prefix", "prompt", None]
TOKENS = 16


def load():
    path = smollm2()
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tok


def add_adapters(model, prefix: bool = True) -> None:
    for i in range(8):
        ak.add_adapter(model, f"lora{i}", "lora", r=8)
    ak.add_adapter(model, "ia3", "ia3")
    ak.add_adapter(model, "pfeiffer", "pfeiffer")
    ak.add_adapter(model, "houlsby", "houlsby")
    if prefix:
        ak.add_adapter(model, "prefix", "prefix", prefix_length=4, flat=True)
    ak.add_adapter(model, "prompt", "prompt", prompt_length=4, init="vocab")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # changes the answers without wrecking them
        for name, p in model.named_parameters():
            if ".adapterkit." in name and "prompt" not in name:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.1 * noise if "ia3" in name else p * 0.5 if "prefix" in name else 0.02 * noise)


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def engine_runs(engine: Engine, work: list, waves: int = 2) -> tuple[list, list]:
    """Each request alone, then all at once (in two waves, or one: a burst): (tokens, logprobs) per request,
    each way."""
    alone = []
    for ids, adapter in work:
        s = engine.submit(ids, adapter, Sampling(max_tokens=TOKENS))
        s.result()
        alone.append((s.tokens, s.logprobs))
    half = len(work) // 2 if waves == 2 else len(work)
    streams = [engine.submit(ids, a, Sampling(max_tokens=TOKENS)) for ids, a in work[:half]]
    next(iter(streams[0]))
    streams += [engine.submit(ids, a, Sampling(max_tokens=TOKENS)) for ids, a in work[half:]]
    for s in streams:
        s.result()
    return alone, [(s.tokens, s.logprobs) for s in streams]


def hf_runs(model, tok, work_questions: list, adapters: list | None) -> tuple[list, list]:
    """ak.generate (left-padded transformers generate), batched vs one prompt at a time."""
    one = [ak.generate(model, tok, [q], max_tokens=TOKENS, per_prompt=[a] if adapters else None)[0]
           for q, a in zip(work_questions, adapters or [None] * len(work_questions), strict=True)]  # fmt: skip
    batched = ak.generate(model, tok, work_questions, max_tokens=TOKENS, per_prompt=adapters)
    return one, batched


def padded_logits(model, tok, questions: list) -> tuple[list, list]:
    """The next-token logits of each prompt: in one left-padded batch, and alone (transformers' forward)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]  # fmt: skip
    tok.padding_side = "left"
    with torch.no_grad():
        batched = model(**tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)).logits[:, -1]
        alone = [model(**tok([t], return_tensors="pt", add_special_tokens=False)).logits[0, -1] for t in texts]
    return [row.tolist() for row in batched], [row.tolist() for row in alone]


def share(left: list, right: list) -> str:
    """How many of the paired results differ."""
    differ = sum(a != b for a, b in zip(left, right, strict=True))
    return f"{differ}/{len(left)} ({100 * differ / len(left):.0f}%)"


def throughput(engine: Engine, ids: list[int], adapters: list, concurrency: int) -> float:
    """Generated tokens per second with ``concurrency`` requests at once (fixed length: no stop)."""
    before = engine.stats()["tokens_generated"]
    started = time.perf_counter()
    streams = [engine.submit(ids, adapters[k % len(adapters)], Sampling(max_tokens=TOKENS)) for k in range(concurrency)]
    for s in streams:
        s.result()
    return (engine.stats()["tokens_generated"] - before) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load()
    lines = [f"# Serving engine: batch invariance and throughput (SmolLM2-135M, fp32, CPU, {args.threads} thread)", ""]
    lines += [f"- {quiet_line()}", ""]  # the machine before the timed rows

    # transformers' padding effect, base model only (the issue's measurement)
    base_one, base_batched = hf_runs(model, tok, QUESTIONS, None)
    logits_batched, logits_alone = padded_logits(model, tok, QUESTIONS)
    add_adapters(model)
    work = [(chat_ids(tok, q), a) for q, a in zip(QUESTIONS, ADAPTERS, strict=True)]
    engine = Engine(model, tok, max_batch=16)
    engine.start()
    alone, mixed = engine_runs(engine, work)
    hf_one, hf_batched = hf_runs(model, tok, QUESTIONS, ADAPTERS)
    engine_alone_text = [tok.decode(t, skip_special_tokens=True) for t, _ in alone]
    lines += [
        f"{len(work)} chat prompts, {TOKENS} greedy tokens, adapters: {', '.join(str(a) for a in ADAPTERS)}.",
        "",
        "| comparison | requests that differ |",
        "|---|---|",
        f"| engine under mixed load vs engine alone: tokens | {share([m[0] for m in mixed], [a[0] for a in alone])} |",
        f"| engine under mixed load vs engine alone: log-probs (any bit) | {share(mixed, alone)} |",
        f"| `ak.generate` batched (left-padded, PerRow) vs one prompt at a time | {share(hf_batched, hf_one)} |",
        f"| `ak.generate` batched vs one at a time, base model only | {share(base_batched, base_one)} |",
        f"| transformers forward, left-padded batch vs alone: next-token logits (any bit), base model | "
        f"{share(logits_batched, logits_alone)} |",
        f"| engine alone vs `ak.generate` of the single prompt (text) | {share(engine_alone_text, hf_one)} |",
        "",
    ]
    print("\n".join(lines), flush=True)

    ids = chat_ids(tok, QUESTIONS[0])
    rows = ["| concurrent requests | bare model (tok/s) | 8 distinct LoRA (tok/s) | ratio |", "|---|---|---|---|"]
    for concurrency in (1, 8, 16):
        bare = throughput(engine, ids, [None], concurrency)
        lora = throughput(engine, ids, [f"lora{i}" for i in range(8)], concurrency)
        rows.append(f"| {concurrency} | {bare:.1f} | {lora:.1f} | {lora / bare:.2f} |")
        print(rows[-1], flush=True)
    stats = engine.stats()
    engine.stop()
    lines += [
        f"Throughput: {TOKENS} tokens per request (prefill included), max_batch 16 (every decoding step runs 16 rows).",
        "",
        *rows,
        "",
        f"Engine totals: {stats['steps']:.0f} steps, {stats['tokens_generated']:.0f} tokens, "
        f"{stats['decode_seconds'] / stats['steps'] * 1000:.0f} ms per decoding step, "
        f"{stats['prefill_seconds'] / stats['prefills'] * 1000:.0f} ms per prefill.",
        "",
    ]
    lines += other_paths(tok)
    if args.output:
        args.output.write_text("\n".join(lines))


def other_paths(tok) -> list[str]:
    """Bursts (packed prefill) and long prompts in chunks, fp32 and bf16, on a model without prefix attention."""
    lines = ["| load (no prefix adapter; `prefill_chunk` 64) | tokens differ | log-probs differ (any bit) |"]
    lines.append("|---|---|---|")
    plain = [a for a in ADAPTERS if a != "prefix"]
    questions = QUESTIONS[: len(plain)]
    for dtype in (torch.float32, torch.bfloat16):
        model = load()[0].to(dtype)
        add_adapters(model, prefix=False)
        engine = Engine(model, tok, max_batch=16, prefill_chunk=64)
        engine.start()
        loads = {
            "burst: every request at once": ([(chat_ids(tok, q), a) for q, a in zip(questions, plain, strict=True)], 1),
            "long prompts (~200 tokens) in chunks, arriving while others decode": (
                [(chat_ids(tok, " ".join([q] * 20)), a) for q, a in zip(questions, plain, strict=True)],
                2,
            ),
        }
        for name, (work, waves) in loads.items():
            alone, together = engine_runs(engine, work, waves)
            tokens = share([t for t, _ in together], [t for t, _ in alone])
            lines.append(f"| {str(dtype).removeprefix('torch.')}, {name} | {tokens} | {share(together, alone)} |")
            print(lines[-1], flush=True)
        engine.stop()
    return ["", *lines, ""]


if __name__ == "__main__":
    main()
