"""AdaLoRA's rank allocation: the budget schedule's closed form, the orthogonality penalty's, and the same 8
training steps as peft's own ``update_and_allocate`` from the same start: the same triplets pruned and the same
outputs. (Saving, loading and peft's loading of what adapterkit writes: the method table's rows.)"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from fixtures.make_peer_fixtures import base_model, inputs
from safetensors.torch import load_file

import adapterkit as ak

ROOT = Path(__file__).resolve().parents[1]
PEFT = ROOT / "benchmarks" / ".venvs" / "peft" / "bin" / "python"
CONFIG = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, target_modules=["query", "value"])
PEER = """
import json, sys, torch, peft
sys.path.insert(0, {fixtures!r})
from make_peer_fixtures import base_model, inputs
from safetensors.torch import save_file
pm = peft.get_peft_model(base_model("bert"), peft.AdaLoraConfig(**json.loads({config!r})))
start = {{k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}}
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
for step in range(8):
    pm(**inputs()).last_hidden_state.pow(2).mean().backward()  # no loss in the output: no penalty, in peft
    opt.step(); pm.base_model.update_and_allocate(step); opt.zero_grad()
with torch.no_grad():
    end = {{k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}}
    save_file({{**{{"start." + k: v for k, v in start.items()}}, **{{"end." + k: v for k, v in end.items()}},
               "out": pm(**inputs()).last_hidden_state.contiguous()}}, sys.argv[1])
"""


def ours(key: str) -> str:
    """peft's ``base_model.model.<path>.lora_A.default`` as adapterkit's parameter name."""
    path, _, part = key.removeprefix("base_model.model.").removesuffix(".default").rpartition(".")
    return f"{path}.adapterkit.a.{part}"


@pytest.mark.peers
def test_eight_steps_prune_as_peft_prunes(tmp_path):
    if not PEFT.exists():
        pytest.skip("no peft venv: run .venv/bin/python benchmarks/bench_peers.py --setup")
    script = PEER.format(fixtures=str(ROOT / "tests" / "fixtures"), config=json.dumps(CONFIG))
    run = subprocess.run([str(PEFT), "-c", script, str(tmp_path / "peft.safetensors")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(tmp_path / "peft.safetensors")
    model = base_model("bert")
    ak.add_adapter(model, "a", "adalora", **CONFIG, activate=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in theirs.items():
            if key.startswith("start."):
                params[ours(key.removeprefix("start."))].copy_(value)
    ak.train_adapter(model, "a")
    hook = ak.methods.AdaLoRAConfig(**CONFIG).training_hook(model, "a", 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(8):
        model(**inputs()).last_hidden_state.pow(2).mean().backward()
        opt.step(), hook.update(step), opt.zero_grad()
    for key, value in theirs.items():
        if key.startswith("end.") and key.endswith("lora_E.default"):
            mine = params[ours(key.removeprefix("end."))]
            assert torch.equal(mine != 0, value != 0), key  # the same triplets kept
    kept = sum(int((p != 0).sum()) for n, p in params.items() if n.endswith("lora_E"))
    assert kept == CONFIG["target_r"] * 4  # the final budget: target_r for each of the 4 layers
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).last_hidden_state, theirs["out"], atol=1e-5, rtol=1e-4)


def test_budget_falls_cubically_between_the_warmups():
    model = base_model("bert")
    ak.add_adapter(model, "a", "adalora", init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5, total_step=100)
    config = ak.methods.AdaLoRAConfig(init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5, total_step=100)
    allocator = config.training_hook(model, "a", 100)
    init, target = 12 * 4, 4 * 4  # 4 adapted layers (query and value of 2 layers)
    assert allocator.budget(10) == (init, False)
    left = 1 - (40 - 10) / (100 - 20 - 10)
    assert allocator.budget(40) == (int((init - target) * left**3 + target), True)
    assert allocator.budget(41)[1] is False  # between every deltaT steps: no pruning
    assert allocator.budget(81) == (target, True)


def test_orthogonality_penalty_is_its_closed_form():
    model = base_model("bert")
    config = ak.methods.AdaLoRAConfig(init_r=3, target_r=1, total_step=10, orth_reg_weight=0.25)
    ak.add_adapter(model, "a", config)
    modules = [m for n, m in model.named_modules() if n.endswith("adapterkit.a")]
    expected = torch.stack(
        [
            torch.linalg.norm(cov - torch.eye(3))
            for m in modules
            for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B)
        ]
    ).mean()
    torch.testing.assert_close(config.training_hook(model, "a", 10).regularizer(), 0.25 * expected)


def test_a_schedule_needs_its_steps():
    model = base_model("bert")
    ak.add_adapter(model, "a", "adalora", tinit=5, tfinal=5)
    with pytest.raises(ak.ConfigError, match="tinit < total_step - tfinal"):
        ak.methods.AdaLoRAConfig(tinit=5, tfinal=5).training_hook(model, "a", 8)
