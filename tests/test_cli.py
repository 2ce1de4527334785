"""The command line: --help, info and inspect."""

import json
import subprocess
import sys

import adapterkit as ak
from adapterkit.cli import main

from conftest import make_model


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "adapterkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "info", "inspect"):
        assert command in out.stdout


def test_info_shows_injection_points(tmp_path, capsys):
    make_model("gpt2", head=False).save_pretrained(tmp_path / "gpt2")
    assert main(["info", str(tmp_path / "gpt2")]) == 0
    out = capsys.readouterr().out
    assert "model type:      gpt2 (GPT2Model)" in out
    assert "blocks:          2 (h.0 ... h.1)" in out
    assert "pre-LN" in out and "attn.c_proj" in out
    assert "lora targets:    c_attn (2 modules)" in out


def test_inspect_and_errors(tmp_path, capsys):
    model = make_model("bert")
    ak.add_adapter(model, "sst", "houlsby", bottleneck_size=4)
    ak.save_adapter(model, "sst", tmp_path / "sst")
    assert main(["inspect", str(tmp_path / "sst")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[: out.rindex("}") + 1])
    assert info["name"] == "sst" and info["config"]["bottleneck_size"] == 4
    assert info["params"] == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32)
    assert "encoder.layer.1.output.dense.bottleneck.adapter_up.weight  [32, 4]" in out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "not a saved adapter folder" in capsys.readouterr().err
