"""Per-row adapters in one batch: 8 distinct adapters vs one, adapterkit vs peft, one process.

    .venv/bin/python benchmarks/bench_per_row.py [--rounds 5] [--output benchmarks/results_per_row.md]

bert-base config (random weights), batch 32, seq 128, inference, 2 threads. LoRA r=8 on query and
value (peft's default), 8 adapters with random weights; bottleneck = Pfeiffer (reduction 16).
adapterkit: ``PerRow`` with rows cycling over the 8 adapters vs the same batch through one
adapter. peft 0.21.2: ``model(..., adapter_names=[...])`` with the same 8 adapters vs its one
active adapter. Both libraries wrap copies of one base model, and all configurations run in
turn in every round; the table gives medians over rounds and ratios of those medians. The
script re-runs itself in peft's venv (``bench_peers.py --setup`` makes it), which also holds
torch 2.13 and transformers 5.24, so both libraries run in the same process.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

try:
    import peft  # noqa: F401
except ImportError:  # re-run in the peft venv
    sys.path.insert(0, str(HERE))
    from bench_peers import python_for

    sys.exit(subprocess.run([python_for("peft"), __file__, *sys.argv[1:]]).returncode)

import torch  # noqa: E402
import transformers as T  # noqa: E402

import adapterkit as ak  # noqa: E402

BATCH, SEQ, N = 32, 128, 8


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(attn_implementation="sdpa")).eval()


def randomize(model: torch.nn.Module, marker: str) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def adapterkit_models(base):
    lora, bottleneck = copy.deepcopy(base), copy.deepcopy(base)
    for i in range(N):
        ak.add_adapter(lora, f"a{i}", "lora", r=8, target_modules=["query", "value"])
        ak.add_adapter(bottleneck, f"a{i}", "pfeiffer")
    randomize(lora, ".adapterkit.")
    randomize(bottleneck, ".adapterkit.")
    return lora, bottleneck


def peft_model(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"])
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, N):
        model.add_adapter(f"a{i}", config)
    randomize(model, "lora_")
    return model.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def configurations(base):
    lora, bottleneck = adapterkit_models(base)
    peft = peft_model(base)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    rows = [f"a{i % N}" for i in range(BATCH)]

    def ours(model, setup):
        def fn():
            with ak.use(model, setup):
                model(input_ids=ids, attention_mask=mask)

        return fn

    def peft_run(names):
        return lambda: peft(input_ids=ids, attention_mask=mask, **({"adapter_names": names} if names else {}))

    return {
        "base model": lambda: base(input_ids=ids, attention_mask=mask),
        "adapterkit LoRA, one adapter": ours(lora, "a0"),
        "adapterkit LoRA, 8 adapters (PerRow)": ours(lora, ak.PerRow(rows)),
        "peft LoRA, one adapter": peft_run(None),
        "peft LoRA, 8 adapters (adapter_names)": peft_run(rows),
        "adapterkit Pfeiffer, one adapter": ours(bottleneck, "a0"),
        "adapterkit Pfeiffer, 8 adapters (PerRow)": ours(bottleneck, ak.PerRow(rows)),
    }


def site_times(calls: int = 20) -> dict[str, float]:
    """One LoRA site alone (a query Linear 768 -> 768, input (32, 128, 768)): ms of the adapter's
    own operators per call.

    Wall time of one site swings by +-30% on this machine, more than the adapter costs, so the
    profiler sums the CPU time of every operator except the base layer's ``addmm`` (neither
    library's LoRA path uses ``addmm``).
    """
    from torch.profiler import profile

    torch.manual_seed(0)
    small = T.BertModel(T.BertConfig(num_hidden_layers=1, attn_implementation="sdpa")).eval()
    rows = [f"a{i % N}" for i in range(BATCH)]
    one, eight = adapterkit_models(small)[0], adapterkit_models(small)[0]
    ak.set_active(one, "a0")
    ak.set_active(eight, ak.PerRow(rows))
    peft = peft_model(small)
    site = lambda m: m.encoder.layer[0].attention.self.query  # noqa: E731
    theirs = site(peft.base_model.model)
    x = torch.randn(BATCH, SEQ, 768, generator=torch.Generator().manual_seed(4))
    runs = {
        "adapterkit, one adapter": lambda: site(one)(x),
        "adapterkit, 8 adapters (PerRow)": lambda: site(eight)(x),
        "peft, one adapter": lambda: theirs(x),
        "peft, 8 adapters (adapter_names)": lambda: theirs(x, adapter_names=rows),
    }
    out = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()
            with profile() as prof:
                for _ in range(calls):
                    fn()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            base = sum(e.self_cpu_time_total for e in events if e.key == "aten::addmm")
            out[name] = (total - base) / calls / 1e3
    return out


def check_equal(base) -> tuple[float, float]:
    """Max abs difference of adapterkit's and peft's 8-adapter outputs (same weights), and of
    adapterkit's to the base model's (the adapters do act)."""
    lora, _ = adapterkit_models(base)
    peft = peft_model(base)
    ids = torch.randint(1000, 30000, (4, 16), generator=torch.Generator().manual_seed(3))
    rows = ["a1", "a5", "a1", "a7"]
    params = dict(lora.named_parameters())
    with torch.no_grad():  # copy peft's random weights into adapterkit's adapters
        for name, p in peft.named_parameters():
            if "lora_" in name:
                adapter = name.split(".")[-2]
                host = name.removeprefix("base_model.model.").split(".lora_")[0]
                kind = "lora_A" if "lora_A" in name else "lora_B"
                params[f"{host}.adapterkit.{adapter}.{kind}"].copy_(p)
        with ak.use(lora, ak.PerRow(rows)):
            ours = lora(input_ids=ids).last_hidden_state
        theirs = peft(input_ids=ids, adapter_names=rows).last_hidden_state
        plain = base(input_ids=ids).last_hidden_state
    return float((ours - theirs).abs().max()), float((ours - plain).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(HERE / "results_per_row.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = base_model()
    difference = check_equal(base)
    sites = site_times()
    runs = configurations(base)
    for fn in runs.values():  # warm-up
        timed(fn)
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            times[name].append(timed(runs[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    report(median, times, difference, sites, args)


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of ``a``'s time over ``b``'s in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def report(median, times, difference, sites, args) -> None:
    ratio = lambda a, b: median[a] / median[b]  # noqa: E731
    lines = [
        "# Per-row adapters: one batch, 8 distinct adapters",
        "",
        f"`{' '.join([Path(sys.executable).name, *sys.argv])}` (bert-base config, batch {BATCH}, seq {SEQ}, "
        f"inference, {torch.get_num_threads()} threads, {args.rounds} rounds, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, transformers {T.__version__}, peft {__import__('peft').__version__})",
        "",
        "| configuration | median s | rounds (s) | / base model |",
        "|---|---:|---|---:|",
    ]
    for name in median:
        rounds = ", ".join(f"{t:.2f}" for t in times[name])
        lines.append(f"| {name} | {median[name]:.3f} | {rounds} | {ratio(name, 'base model'):.3f} |")
    ak8, ak1 = "adapterkit LoRA, 8 adapters (PerRow)", "adapterkit LoRA, one adapter"
    p8, p1 = "peft LoRA, 8 adapters (adapter_names)", "peft LoRA, one adapter"
    b8, b1 = "adapterkit Pfeiffer, 8 adapters (PerRow)", "adapterkit Pfeiffer, one adapter"
    lines += [
        "",
        "Ratios: median over rounds of the two times measured in the same round (ratio of medians in brackets).",
        "",
        f"- adapterkit LoRA, 8 adapters / one adapter: **{paired(times, ak8, ak1):.3f}** ({ratio(ak8, ak1):.3f}; "
        "target <= 1.2)",
        f"- peft LoRA, 8 adapters / one adapter: {paired(times, p8, p1):.3f} ({ratio(p8, p1):.3f})",
        f"- adapterkit 8 adapters / peft 8 adapters (same batch, same process): **{paired(times, ak8, p8):.3f}** "
        f"({ratio(ak8, p8):.3f})",
        f"- adapterkit Pfeiffer, 8 adapters / one adapter: **{paired(times, b8, b1):.3f}** ({ratio(b8, b1):.3f})",
        f"- outputs of adapterkit's PerRow and peft's adapter_names with the same LoRA weights: "
        f"max abs difference {difference[0]:.2e} (vs the base model's: {difference[1]:.2e})",
    ]
    lines += [
        "",
        "One LoRA site alone (a query Linear, input (32, 128, 768)): CPU ms of the adapter's operators per call",
        "(all operators but the base layer's addmm, torch.profiler, 20 calls):",
        "",
        "| site | adapter ms per call |",
        "|---|---:|",
    ]
    for name, ms in sites.items():
        lines.append(f"| {name} | {ms:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
