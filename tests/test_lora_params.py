"""LoRA on bare parameters (``target_parameters``) of a tiny Mixtral's stacked experts: the update is peft's,
it trains, merges, leaves no trace when deleted, and refuses to run per row. (Saving in both formats and
peft's own loading are rows of test_formats.WRITABLE and so of test_peer_roundtrip.)"""

import pytest
import torch
from fixtures.make_peer_fixtures import base_model, inputs

import adapterkit as ak

from conftest import randomize_adapters
from test_removal import anatomy

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def adapted():
    model = base_model("mixtral")
    ak.add_adapter(model, "moe", "lora", r=2, alpha=4, target_parameters=EXPERTS, activate=True)
    randomize_adapters(model)
    return model


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).last_hidden_state


def test_the_update_is_each_experts_low_rank_product():
    model = adapted()
    expected_model = base_model("mixtral")
    with torch.no_grad():
        for path, module in model.named_modules():
            if path.endswith("experts.adapterkit.moe"):
                experts = expected_model.get_submodule(path.removesuffix(".adapterkit.moe"))
                for name in ("gate_up_proj", "down_proj"):
                    a, b = module.lora_A[name], module.lora_B[name]  # (r E, in), (out, r E)
                    e, r = experts.num_experts, 2
                    for k in range(e):  # B's columns interleave experts (r, E), A's rows block them (E, r)
                        delta = b.reshape(b.shape[0], r, e)[:, :, k] @ a.reshape(e, r, -1)[k]
                        getattr(experts, name)[k] += 2.0 * delta  # s = alpha / r
    torch.testing.assert_close(output(model), output(expected_model), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(output(model), output(base_model("mixtral")), atol=1e-3)


def test_only_the_factors_train_and_the_weights_come_back():
    model = adapted()
    ak.train_adapter(model, "moe")
    before = {k: v.clone() for k, v in model.state_dict().items() if "adapterkit" not in k}
    model(**inputs()).last_hidden_state.pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".adapterkit.moe.lora_" in n for n in grads)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the swap was undone after the forward
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_merge_unmerge_and_delete_without_a_trace():
    model, fresh = adapted(), base_model("mixtral")
    expected, clean = output(model), anatomy(fresh)
    ak.merge_adapter(model, "moe")
    torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=1e-5)
    ak.unmerge_adapter(model, "moe")
    ak.delete_adapter(model, "moe")
    assert anatomy(model) == clean
    torch.testing.assert_close(output(model), output(fresh), atol=1e-6, rtol=0)


def test_per_row_is_refused_with_the_reason():
    model = adapted()
    ak.add_adapter(model, "other", "lora", r=2, target_parameters=EXPERTS)
    with pytest.raises(ak.ConfigError, match="changes it for the whole call"):
        ak.set_active(model, ak.PerRow(["moe", "other"]))


def test_a_target_that_matches_nothing_is_named():
    with pytest.raises(ak.ConfigError, match="target_parameters"):
        ak.add_adapter(base_model("mixtral"), "x", "lora", target_parameters=["experts.no_such_weight"])
