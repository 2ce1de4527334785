"""The README's parameter table: every preset on a bert-base config against closed-form counts."""

import torch
import transformers as T

import adapterkit as ak

H, L, FF = 768, 12, 3072  # bert-base


def bottleneck(d, h=H):
    return h * d + d + d * h + h


def phm(fan_in, fan_out, n=4):  # rank-1 factors + bias; the n x n x n rule is counted once
    return n * (fan_in // n) + n * (fan_out // n) + fan_out


def prefix(length, mlp):
    return length * H + (H * mlp + mlp) + (mlp * L * 2 * H + L * 2 * H)


EXPECTED = {
    "pfeiffer": L * bottleneck(H // 16),
    "houlsby64": 2 * L * bottleneck(64),
    "parallel": L * bottleneck(H // 2),
    "lora": L * 2 * 8 * (H + H),
    "dora": L * 2 * (8 * (H + H) + H),
    "ia3": L * (H + H + FF),
    "ia3_adapterhub": L * (H + H + FF),
    "compacter": 2 * L * (phm(H, 24) + phm(24, H)) + 4**3,
    "compacter++": L * (phm(H, 24) + phm(24, H)) + 4**3,
    "prefix": prefix(30, 512),
    "prompt": 10 * H,
    "mam": prefix(30, 800) + L * bottleneck(H // 2),
    "unipelt": L * 2 * (8 * 2 * H + H + 1) + prefix(10, 512) + L * (H * 2 + 2) + L * (bottleneck(H // 16) + H + 1),
}


def test_bert_base_parameter_counts_match_closed_form():
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig())
    base = sum(p.numel() for p in model.parameters())
    assert base == 109_482_240
    for name in EXPECTED:
        preset, overrides = ("houlsby", {"bottleneck_size": 64}) if name == "houlsby64" else (name, {})
        ak.add_adapter(model, name.replace("+", "p"), preset, **overrides)
    rows = {row.name: row for row in ak.summary(model).adapters}
    for name, expected in EXPECTED.items():
        row = rows[name.replace("+", "p")]
        assert row.params == expected, name
        assert abs(row.percent_of_base - 100 * expected / base) < 1e-9
    assert 2.0 < rows["houlsby64"].percent_of_base < 3.0  # the seed article's "2-3% of BERT"
