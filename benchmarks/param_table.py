"""Trainable parameters of every preset on a bert-base config (random weights): the README table.

.venv/bin/python benchmarks/param_table.py > benchmarks/param_table.md
"""

from __future__ import annotations

import torch
import transformers as T

import adapterkit as ak

ROWS = [
    ("pfeiffer", {}),
    ("houlsby", {"bottleneck_size": 64}),
    ("houlsby", {}),
    ("parallel", {}),
    ("lora", {}),
    ("dora", {}),
    ("ia3", {}),
    ("ia3_adapterhub", {}),
    ("compacter", {}),
    ("compacter++", {}),
    ("prefix", {}),
    ("prompt", {}),
    ("mam", {}),
    ("unipelt", {}),
]


def bert_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig())


def counts() -> list[tuple[str, int, float]]:
    rows = []
    for preset, overrides in ROWS:
        model = bert_base()
        ak.add_adapter(model, "a", preset, **overrides)
        summary = ak.summary(model)
        label = preset + "".join(f" ({k}={v})" for k, v in overrides.items())
        rows.append((label, summary.adapters[0].params, summary.adapters[0].percent_of_base))
    return rows


def main() -> None:
    base = sum(p.numel() for p in bert_base().parameters())
    print(f"bert-base config (BertModel, {base:,} parameters), defaults unless stated:\n")
    print("| preset | trainable params | % of the model |")
    print("|---|---:|---:|")
    for label, n, percent in counts():
        print(f"| {label} | {n:,} | {percent:.3f}% |")


if __name__ == "__main__":
    main()
