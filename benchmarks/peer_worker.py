"""One measurement in a fresh process: ``python peer_worker.py LIB METHOD`` prints one JSON line.

LIB is ``adapterkit``, ``peft`` or ``adapters`` (run with that library's venv); METHOD is
``none`` (full fine-tuning), ``pfeiffer``, ``houlsby``, ``lora``, ``dora``, ``ia3``, ``prefix`` or
``prompt``; each library with its own defaults for the method (peft's prefix is flat, AdapterHub's
and adapterkit's use the MLP). The model is a bert-base config
with random weights and a 2-label head (trainable in every run), batch 16, sequence 128.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

BATCH, SEQ, THREADS = 16, 128, 2
STEPS, INFER = 2, 3


def bert_base() -> torch.nn.Module:
    torch.manual_seed(0)
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config = T.BertConfig(num_labels=2, **(tiny if os.environ.get("BENCH_TINY") else {}))  # tiny: a smoke test
    return T.BertForSequenceClassification(config).eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def infer_time(model) -> float:
    model.eval()
    x = inputs()
    return median_time(lambda: model(**x), INFER)


@torch.no_grad()
def infer_ratio(base, model) -> float:
    """Median over alternating runs of time(model) / time(base): robust to drifting machine load."""
    base.eval()
    model.eval()
    x = inputs()
    ratios = []
    for i in range(INFER + 1):
        times = []
        for m in (base, model) if i % 2 else (model, base):
            start = time.perf_counter()
            m(**x)
            times.append(time.perf_counter() - start)
        if i:  # the first pair warms up
            ratios.append(times[1] / times[0] if i % 2 else times[0] / times[1])
    return statistics.median(ratios)


def step_time(model) -> float:
    model.train()
    x, y = inputs(), torch.randint(0, 2, (BATCH,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        torch.nn.functional.cross_entropy(model(**x).logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_time(step, STEPS)


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# Each library: add(model, method) -> model; merge(model); save(model, dir).
def ak_add(model, method):
    import adapterkit as ak

    ak.add_adapter(model, "a", method)
    ak.train_adapter(model, "a")
    return model


def ak_merge(model):
    import adapterkit as ak

    ak.merge_adapter(model, "a")


def ak_save(model, path):
    import adapterkit as ak

    ak.save_adapter(model, "a", path)


def peft_add(model, method):
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
        "dora": lambda: peft.LoraConfig(
            r=8, lora_alpha=8, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"
        ),
        "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
        "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=30, task_type="SEQ_CLS"),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=10, task_type="SEQ_CLS"),
    }
    if method not in configs:
        print(json.dumps({"skip": f"peft has no {method} adapter"}))
        raise SystemExit(0)
    return peft.get_peft_model(model, configs[method]())


def peft_merge(model):
    model.merge_adapter()


def peft_save(model, path):
    model.save_pretrained(path)


def ah_add(model, method):
    import adapters

    adapters.init(model)
    config = {
        "pfeiffer": "seq_bn",
        "houlsby": "double_seq_bn",
        "lora": "lora",
        "dora": adapters.LoRAConfig(use_dora=True) if method == "dora" else None,
        "ia3": "ia3",
        "prefix": "prefix_tuning",
        "prompt": "prompt_tuning",
    }[method]
    model.add_adapter("a", config=config)
    model.train_adapter("a")
    for p in model.classifier.parameters():  # same trainable set as the others: adapter + head
        p.requires_grad_(True)
    return model


def ah_merge(model):
    model.merge_adapter("a")


def ah_save(model, path):
    model.save_adapter(path, "a")
    torch.save({k: v for k, v in model.classifier.state_dict().items()}, Path(path) / "head.pt")


LIBS = {
    "adapterkit": (ak_add, ak_merge, ak_save),
    "peft": (peft_add, peft_merge, peft_save),
    "adapters": (ah_add, ah_merge, ah_save),
}


def main(lib: str, method: str) -> dict:
    torch.set_num_threads(THREADS)
    add, merge, save = LIBS[lib]
    model = bert_base()
    result = {"lib": lib, "method": method}
    if method == "none":
        result["base_infer_s"] = infer_time(model)
    else:
        model = add(model, method)
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["step_s"] = step_time(model)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "none":
        return result
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tmp)
        result["saved_bytes"] = folder_bytes(tmp)
    base = bert_base()  # the same seed: the same frozen weights, no adapter
    result["infer_ratio"] = infer_ratio(base, model)
    if method in ("lora", "dora", "ia3"):
        try:
            merge(model)
        except Exception as e:  # noqa: BLE001 - a peer that cannot merge this method
            result["merge_error"] = f"{type(e).__name__}: {e}"[:200]
        else:
            result["merged_ratio"] = infer_ratio(base, model)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    T.logging.set_verbosity_error()
    try:
        print(json.dumps(main(sys.argv[1], sys.argv[2])))
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - reported as a skipped row with the reason
        print(json.dumps({"skip": f"{sys.argv[1]} {sys.argv[2]} failed: {type(e).__name__}: {e}"[:300]}))
