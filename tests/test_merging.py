"""combine_adapters: each rule against its closed form on small tensors, and merged adapters in a model."""

import math

import pytest
import torch

import adapterkit as ak
from adapterkit.core.merging import combine, magnitude_prune, majority_sign

from conftest import make_inputs, make_model, randomize_adapters

A = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
B = torch.tensor([[-2.0, 2.0], [1.0, 1.0]])


def test_linear_is_the_weighted_sum():
    torch.testing.assert_close(combine([A, B], [0.25, 0.5], "linear"), 0.25 * A + 0.5 * B)


def test_magnitude_prune_keeps_the_largest_share():
    torch.testing.assert_close(magnitude_prune(A, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    merged = combine([A, B], [1.0, 1.0], "magnitude_prune", density=0.5)
    # B's largest two: -2 and 2 (ties broken by topk order) -> [[3 - 2, 2], [0, -4]]
    torch.testing.assert_close(merged, torch.tensor([[1.0, 2.0], [0.0, -4.0]]))


def test_ties_elects_signs_and_averages_the_agreeing():
    # density 1: no pruning. Total sign per entry: [[+, +], [+, -]]; frequency: [[0 -> +, 0 -> +], [+, 0 -> +]]
    assert majority_sign(torch.stack([A, B])).tolist() == [
        [[True, False], [True, True]],
        [[False, True], [True, False]],
    ]
    merged = combine([A, B], [1.0, 0.5], "ties", density=1.0)
    expected = torch.tensor([[3.0, 1.0], [(0.5 + 0.5) / 2, -4.0]])
    torch.testing.assert_close(merged, expected)
    by_count = combine([A, B], [1.0, 0.5], "ties", density=1.0, sign_rule="frequency")
    torch.testing.assert_close(by_count, torch.tensor([[3.0, 1.0], [0.5, 0.5]]))


def test_dare_rescales_what_it_keeps():
    big = torch.ones(200, 200)
    kept = combine([big, big], [0.5, 0.5], "dare_linear", density=0.25)
    values = set(kept.unique().tolist())
    assert values <= {0.0, 2.0, 4.0}  # each kept 1 becomes 1 / 0.25 = 4, weighted 0.5
    assert kept.mean().item() == pytest.approx(1.0, abs=0.05)  # unbiased in expectation
    same = combine([big, big], [0.5, 0.5], "dare_linear", density=0.25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept, same)  # seeded: reproducible
    signs = combine([big, -big], [1.0, 1.0], "dare_ties", density=1.0)
    torch.testing.assert_close(signs, big)  # a tie elects +: the agreeing entries' mean


def lora_model():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "lora", r=2, alpha=4)
    ak.add_adapter(model, "b", "lora", r=3, alpha=3)
    randomize_adapters(model)
    return model


def output(model, names):
    ak.set_active(model, names)
    with torch.no_grad():
        return model(**make_inputs("bert")).last_hidden_state


def test_svd_merge_of_full_rank_is_exactly_the_weighted_updates():
    model = lora_model()
    query = model.encoder.layer[0].attention.self.query.adapterkit
    expected = 0.3 * query["a"].delta() + 0.7 * query["b"].delta()
    config = ak.combine_adapters(model, ["a", "b"], "ab", weights=[0.3, 0.7], method="svd")
    assert config.r == 5 and config.alpha == 5
    torch.testing.assert_close(query["ab"].delta(), expected, atol=1e-6, rtol=1e-5)
    # weights 1, 1: the merged adapter computes what both adapters active together compute
    ak.combine_adapters(model, ["a", "b"], "sum", weights=[1.0, 1.0], method="svd")
    torch.testing.assert_close(output(model, "sum"), output(model, ["a", "b"]), atol=1e-5, rtol=1e-5)


def test_svd_to_lower_rank_is_the_best_approximation():
    model = lora_model()
    ak.combine_adapters(model, ["a", "b"], "low", weights=[1.0, 1.0], method="svd", rank=2)
    query = model.encoder.layer[0].attention.self.query.adapterkit
    delta = query["a"].delta() + query["b"].delta()
    s = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(query["low"].delta() - delta)
    assert error.item() == pytest.approx(s[2:].norm().item(), rel=1e-4)  # Eckart-Young


def test_linear_lora_merge_combines_factors_like_peft():
    model = make_model("bert", head=False)
    ak.add_adapter(model, "a", "lora", r=2, alpha=4)
    ak.add_adapter(model, "b", "lora", r=2, alpha=8)
    randomize_adapters(model)
    ak.combine_adapters(model, ["a", "b"], "ab", weights=[0.5, 0.25])
    value = model.encoder.layer[1].attention.self.value.adapterkit
    wa, wb = math.sqrt(0.5 * 2), math.sqrt(0.25 * 4)  # sqrt(w * alpha / r)
    torch.testing.assert_close(value["ab"].lora_A, wa * value["a"].lora_A + wb * value["b"].lora_A)
    torch.testing.assert_close(value["ab"].lora_B, wa * value["a"].lora_B + wb * value["b"].lora_B)
    assert value["ab"].scaling == 1


def test_bottleneck_average_is_the_parameter_average():
    model = make_model("bert", head=False)
    for name in ("x", "y", "z"):
        ak.add_adapter(model, name, "pfeiffer")
    randomize_adapters(model)
    ak.combine_adapters(model, ["x", "y", "z"], "avg")
    host = model.encoder.layer[0].output.LayerNorm.adapterkit
    parts = [host[n].bottleneck.adapter_up.weight for n in ("x", "y", "z")]
    torch.testing.assert_close(host["avg"].bottleneck.adapter_up.weight, sum(parts) / 3)


@pytest.mark.parametrize(
    ("setup", "kwargs", "message"),
    [
        (("lora", "pfeiffer"), {}, "different methods"),
        (("lora", "lora"), {"method": "fisher"}, "unknown merge method"),
        (("pfeiffer", "pfeiffer"), {"method": "svd"}, "svd re-factors LoRA"),
        (("dora", "dora"), {}, "DoRA"),
        (("lora", "lora"), {"weights": [1.0]}, "one weight each"),
        (("lora", "lora"), {"density": 0.0}, "density"),
    ],
)
def test_merge_errors_are_clear(setup, kwargs, message):
    model = make_model("bert", head=False)
    for i, preset in enumerate(setup):
        ak.add_adapter(model, f"m{i}", preset)
    with pytest.raises(ak.ConfigError, match=message):
        ak.combine_adapters(model, ["m0", "m1"], "merged", **kwargs)
    assert "merged" not in ak.list_adapters(model)


def test_lora_of_other_ranks_needs_svd():
    with pytest.raises(ak.ConfigError, match="use svd"):
        ak.combine_adapters(lora_model(), ["a", "b"], "ab", method="ties")
