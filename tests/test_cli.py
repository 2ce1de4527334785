"""The command line: --help, info and inspect."""

import json
import subprocess
import sys

import torch

import adapterkit as ak
from adapterkit.cli import main

from conftest import make_inputs, make_model, randomize_adapters


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "adapterkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "info", "inspect", "convert"):
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


def test_convert_between_all_three_formats(tmp_path, capsys):
    model = make_model("bert")  # BertForSequenceClassification, 2 labels
    model.save_pretrained(tmp_path / "base")
    ak.add_adapter(model, "sst", "lora", r=2, activate=True)
    randomize_adapters(model)
    ak.save_adapter(model, "sst", tmp_path / "ours")
    x = make_inputs("bert")
    with torch.no_grad():
        expected = model(**x).logits
    src = tmp_path / "ours"
    for fmt in ("peft", "adapterhub", "adapterkit"):
        argv = ["convert", str(src), str(tmp_path / fmt), "--to", fmt, "--base", str(tmp_path / "base")]
        assert main(argv) == 0, capsys.readouterr().err
        assert f"-> {fmt}:" in capsys.readouterr().out
        src = tmp_path / fmt
    fresh = make_model("bert")
    ak.load_adapter(fresh, src, activate=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, expected)
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert '"format": "peft"' in out and "classifier.weight  [2, 32]" in out
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "x"), "--to", "adapterhub"]) == 0  # base from config
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "y"), "--to", "peft"]) == 2
    assert "pass --base MODEL_DIR" in capsys.readouterr().err
