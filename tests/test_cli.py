"""The command line: --help, info and inspect."""

import json
import subprocess
import sys

import torch

import adapterkit as ak
from adapterkit.apps.cli import main

from conftest import make_inputs, make_model, randomize_adapters


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "adapterkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "multitask", "info", "inspect", "convert", "predict"):
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


def save_tiny_classifier(folder):
    """A tiny BERT classifier with a word-level tokenizer, as a local model folder."""
    from transformers import BertTokenizerFast

    model = make_model("bert")
    model.save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return model


def test_predict_activates_compositions(tmp_path, capsys):
    model = save_tiny_classifier(tmp_path / "base")
    for name in ("a", "b"):
        ak.add_adapter(model, name, "pfeiffer")
    ak.add_fusion(model, ak.Fuse("a", "b"))
    randomize_adapters(model)
    for name in ("a", "b"):
        ak.save_adapter(model, name, tmp_path / name)
    ak.save_fusion(model, "a,b", tmp_path / "fusion")
    texts = ["w1 w2 w3", "w7 w8"]
    from transformers import AutoTokenizer

    inputs = AutoTokenizer.from_pretrained(tmp_path / "base")(texts, padding=True, return_tensors="pt")
    base = ["predict", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"), "--adapter"]
    base += [str(tmp_path / "b"), "--fusion", str(tmp_path / "fusion")]
    for setup, expression in [
        (ak.Fuse("a", "b"), None),
        (ak.PerRow(["b", None]), "PerRow([b, None])"),
        (ak.Average("a", "b", weights=[1, 3]), "Average(a, b, weights=[1, 3])"),
        (ak.Stack("a", "b"), "a, b"),
    ]:
        ak.set_active(model, setup)
        with torch.no_grad():
            want = model(**inputs).logits.softmax(-1)
        argv = base + (["--setup", expression] if expression else []) + ["--text", texts[0], "--text", texts[1]]
        assert main(argv) == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        got = torch.tensor([row["scores"] for row in rows])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert rows[0]["label"] in ("LABEL_0", "LABEL_1")
    assert main(base + ["--list"]) == 0
    out = capsys.readouterr().out
    assert "active setup: Fuse('a', 'b')" in out and "a,b" in out and "fusion" in out
    assert main(base + ["--setup", "__import__('os').system('echo hi')", "--text", "w1"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_setup_expressions():
    read = ak.composition.parse_expression
    assert read("a") == ak.Stack("a")
    assert read("a, 'b-2'") == ak.Stack("a", "b-2")
    assert read("Stack(a, Fuse(b, c, name='f'))") == ak.Stack("a", ak.Fuse("b", "c", name="f"))
    assert read('{"block": "average", "children": ["a", "b"], "weights": [0.25, 0.75]}') == ak.Average(
        "a", "b", weights=[1, 3]
    )
