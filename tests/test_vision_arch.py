"""What the vision and text towers' table rows needed beyond their paths: prompts per row on image models
(patch tokens, hidden by a mask the models take or pass down), prefixes on CLIP's causal text tower, and
DINOv2's encoder (a transformers sub-model) not mistaken for its backbone."""

import pytest
import torch

import adapterkit as ak
from adapterkit.core.backbone import base_prefix
from adapterkit.core.methods.prompt import PatchCount

from conftest import VISION_ARCHS, first_output, make_inputs, make_model, randomize_adapters

ROWS = ["a", None, "b", "a"]


@torch.no_grad()
def run(model, setup, x):
    ak.set_active(model, setup)
    return first_output(model(**x))


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_per_row_prompts_of_different_lengths_on_images(arch):
    """Rows with 3 and 5 patch-token prompts, and none, in one batch: each row as it is alone."""
    model = make_model(arch, head=False)
    ak.add_adapter(model, "a", "prompt", prompt_length=3)
    ak.add_adapter(model, "b", "prompt", prompt_length=5)
    randomize_adapters(model)
    x = make_inputs(arch, batch=4)
    alone = {name: run(model, name, x) for name in ("a", "b", None)}
    assert (alone["a"] - alone[None]).abs().max() > 1e-3
    per_row = run(model, ak.PerRow(ROWS), x)
    torch.testing.assert_close(per_row, torch.stack([alone[n][i] for i, n in enumerate(ROWS)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_patch_count_is_the_embedding_length(arch):
    model = make_model(arch, head=False)
    ak.add_adapter(model, "a", "prompt")
    count = next(m for m in model.modules() if type(m).__name__ == "PromptCall").patches
    pixels = make_inputs(arch)["pixel_values"]
    assert isinstance(count, PatchCount)
    assert count(pixels) == model.embeddings.forward(pixels).shape[1] == 4 + (arch != "siglip_vision_model")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_prefix_keeps_clips_text_tower_causal(attn):
    """Each token attends to the prefix and the tokens up to it: changing a later token leaves earlier positions
    alone, and sdpa (which CLIP runs with is_causal=True and no mask) gives eager's numbers."""
    model = make_model("clip_text_model", head=False)
    model.set_attn_implementation(attn)
    ak.add_adapter(model, "p", "prefix", prefix_length=8, activate=True)
    randomize_adapters(model)
    x = make_inputs("clip_text_model", batch=2, seq=6)
    with torch.no_grad():
        out = model(**x).last_hidden_state
        x["input_ids"][:, -1] = 3
        changed = model(**x).last_hidden_state
        x["input_ids"][:, 0] = 4
        first = model(**x).last_hidden_state
        model.set_attn_implementation("adapterkit_eager")
        eager = model(**x).last_hidden_state
    torch.testing.assert_close(changed[:, :-1], out[:, :-1], atol=1e-6, rtol=1e-6)
    assert (first[:, 1:] - changed[:, 1:]).abs().amax(-1).min() > 1e-4  # every later position sees token 0
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)


def test_dinov2_backbone_prefix():
    assert base_prefix(make_model("dinov2", head=True)) == "dinov2."
    assert base_prefix(make_model("dinov2", head=False)) == ""  # its encoder is a PreTrainedModel in transformers 5
