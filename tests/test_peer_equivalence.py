"""Equal weights, equal outputs: adapterkit against outputs recorded from peft 0.21.2 and
AdapterHub adapters 1.3.0 (``tests/fixtures/make_peer_fixtures.py``), to 1e-5."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import adapterkit as ak

PEERS = Path(__file__).parent / "fixtures" / "peers"

# fixture -> (adapterkit preset, overrides); peer tensors are mapped by our_key and reshaped to fit
CASES = {
    "adapters-pfeiffer": ("pfeiffer", {}),
    "adapters-houlsby": ("houlsby", {}),
    "adapters-parallel": ("parallel", {}),
    "adapters-lora": ("lora", {"r": 4, "alpha": 8}),
    "adapters-ia3": ("ia3_adapterhub", {}),
    "adapters-prefix": ("prefix", {"prefix_length": 5, "bottleneck_size": 16}),
    "peft-lora": ("lora", {"r": 4, "alpha": 8}),
    "peft-dora": ("dora", {"r": 4, "alpha": 8}),
    "peft-rslora": ("lora", {"r": 4, "alpha": 8, "use_rslora": True}),
    "peft-ia3": ("ia3", {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}),
}


def our_key(case: str, key: str) -> str:
    """The adapterkit parameter that holds the peer's tensor ``key``."""
    key = key.removeprefix("base_model.model.")
    if m := re.fullmatch(r"(.*)\.adapters\.a\.adapter_(down|up)(?:\.0)?\.(\w+)", key):
        host, part, leaf = m.groups()
        site = {
            "adapters-pfeiffer": f"{host}.LayerNorm",
            "adapters-houlsby": f"{host}.dense",
            "adapters-parallel": f"{host}.dense",
        }[case]
        return f"{site}.adapterkit.a.bottleneck.adapter_{part}.{leaf}"
    if m := re.fullmatch(r"(.*)\.loras\.a\.lora_([AB])", key):
        host, which = m.groups()
        return f"{host}.adapterkit.a.ia3_l" if case.endswith("ia3") else f"{host}.adapterkit.a.lora_{which}"
    if m := re.fullmatch(r".*prefix_tunings\.a\.self_prefix\.(.*)", key):
        return f"encoder.layer.0.attention.self.adapterkit.a.generator.{m.group(1)}"
    if m := re.fullmatch(r"(.*)\.lora_([AB])\.weight", key):
        return f"{m.group(1)}.adapterkit.a.lora_{m.group(2)}"
    if m := re.fullmatch(r"(.*)\.lora_magnitude_vector", key):
        return f"{m.group(1)}.adapterkit.a.lora_magnitude"
    if m := re.fullmatch(r"(.*)\.ia3_l", key):
        return f"{m.group(1)}.adapterkit.a.ia3_l"
    raise KeyError(key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_outputs_as_the_peer(case):
    folder = PEERS / case
    meta = json.loads((folder / "meta.json").read_text())
    model = T.BertModel(T.BertConfig(**meta["bert_config"]), add_pooling_layer=False).eval()
    model.load_state_dict(load_file(PEERS / f"{meta['lib']}-base.safetensors"))
    preset, overrides = CASES[case]
    ak.add_adapter(model, "a", preset, activate=True, **overrides)
    params = dict(model.named_parameters())
    ours = {n for n in params if ".adapterkit." in n}
    filled = set()
    with torch.no_grad():
        for key, value in load_file(folder / "adapter.safetensors").items():
            target = params[our_key(case, key)]
            target.copy_(value.reshape(target.shape))
            filled.add(our_key(case, key))
    assert filled == ours, f"unfilled: {sorted(ours - filled)}"
    io = load_file(folder / "io.safetensors")
    with torch.no_grad():
        hidden = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    with ak.disable_adapters(model), torch.no_grad():
        base = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    assert not torch.allclose(base, io["last_hidden_state"], atol=1e-3), "the peer's adapter had no effect"
    real = io["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], io["last_hidden_state"][real], atol=1e-5, rtol=1e-5)
