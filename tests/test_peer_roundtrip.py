"""peft 0.21.2 and AdapterHub adapters 1.3.0 load the folders adapterkit writes and compute the same
outputs, to 1e-5. They run in their own venvs (``benchmarks/bench_peers.py --setup``, which
``.ci/run`` calls); without those venvs these tests are skipped."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from fixtures.make_peer_fixtures import inputs
from safetensors.torch import load_file, save_file
from test_formats import WRITABLE, output, trained

import adapterkit as ak

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "benchmarks" / ".venvs"
SCRIPT = ROOT / "tests" / "fixtures" / "make_peer_fixtures.py"
LIBS = {"peft": "peft", "adapterhub": "adapters"}
CASES = WRITABLE
pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def peer_outputs(tmp_path_factory):
    """Save every WRITABLE case, let each peer load them all in one process, return (ours, theirs)."""
    root = tmp_path_factory.mktemp("peers")
    manifests, ours = {lib: [] for lib in LIBS.values()}, {}
    for i, (kind, preset, overrides, fmt) in enumerate(CASES):
        model = trained(kind, preset, overrides)
        ours[i] = output(model)
        base = {k: v for k, v in model.state_dict().items() if ".adapterkit." not in k}
        save_file({k: v.clone() for k, v in base.items()}, root / f"{i}-base.safetensors")
        ak.save_adapter(model, "task", root / f"{i}-adapter", format=fmt)
        case = {"model": kind, "base": str(root / f"{i}-base.safetensors"), "adapter": str(root / f"{i}-adapter")}
        manifests[LIBS[fmt]].append({**case, "out": str(root / f"{i}-out.safetensors")})
    for lib, cases in manifests.items():
        python = VENVS / lib / "bin" / "python"
        if not python.exists():
            pytest.skip(f"no {lib} venv: run .venv/bin/python benchmarks/bench_peers.py --setup")
        (root / f"{lib}.json").write_text(json.dumps(cases))
        run = subprocess.run(
            [str(python), str(SCRIPT), "check", lib, str(root / f"{lib}.json")], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-3000:]
    return ours, {i: load_file(root / f"{i}-out.safetensors") for i in ours}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[3]}-{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_peer_loads_what_adapterkit_wrote(peer_outputs, index):
    ours, theirs = peer_outputs
    out = theirs[index]
    expected = out.get("logits", out.get("last_hidden_state"))
    mask = inputs()["attention_mask"].bool()
    real = mask if expected.shape[:2] == mask.shape else slice(None)  # sequence outputs: real tokens only
    torch.testing.assert_close(expected[real], ours[index][real], atol=1e-5, rtol=1e-5)
