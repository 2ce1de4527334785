"""Models by Hugging Face Hub id: ``--model org/name`` through transformers' resolution and huggingface_hub's
cache, offline. The test lays out a cache as huggingface_hub does (``models--org--name/snapshots/<rev>/``
and ``refs/main``) with a tiny random chat Llama, and runs train, eval, generate, chat and serve's loading
by id in a fresh process whose ``HF_HOME``/``HF_HUB_CACHE`` point at it, with ``HF_HUB_OFFLINE=1``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapterkit.apps import cli
from adapterkit.core.pretrained import explain
from adapterkit.hub.client import make_card
from adapterkit.training import evaluate_base

from test_chat import SUMS, chat_llama, conversation, tokenizer

HUB_ID, MISSING = "tiny-org/chat-llama", "tiny-org/not-cached"
REVISION = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "what is two plus three ?"

DRIVER = r"""
import contextlib, io, json, sys
from adapterkit.apps import cli
from adapterkit.errors import ModelSourceError

hub_id, missing, data, out, prompt = sys.argv[1:6]
results = {}

def run(name, argv, stdin=""):
    sys.stdin = io.StringIO(stdin)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = cli.main(argv)
    results[name] = {"code": code, "out": printed.getvalue(), "err": errors.getvalue()[-2000:]}

run("train", ["train", "--model", hub_id, "--task", "chat", "--data", data, "--validation", data, "--adapter", "lora",
              "--lr", "2e-2", "--max-steps", "3", "--batch-size", "8", "--threads", "1", "--output", out])
run("eval", ["eval", "--model", hub_id, "--adapter", out, "--data", data])
run("baseline", ["eval", "--model", hub_id, "--task", "chat", "--data", data])
gen = ["--model", hub_id, "--adapter", out, "--max-tokens", "3", "--stop", "<|im_end|>"]
run("generate", ["generate", *gen, "--prompt", prompt])
run("chat", ["chat", *gen], stdin=prompt + "\n\n")
run("missing", ["generate", "--model", missing, "--prompt", prompt])
from adapterkit.serve.launch import load
model, _, kind = load(hub_id)
results["serve"] = {"kind": kind, "name_or_path": model.config.name_or_path}
from adapterkit.training import evaluate_base
try:
    evaluate_base(missing, data, "chat")
except ModelSourceError as e:
    results["api_error"] = {"type": type(e).__name__, "message": str(e)}
print(json.dumps(results))
"""


def lay_out_cache(cache: Path, model_dir: Path, repo_id: str) -> Path:
    """``cache`` as huggingface_hub lays it out for ``repo_id`` at ``main``; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def by_id(tmp_path_factory) -> dict:
    """Everything run by id in one offline process (one import of torch and transformers)."""
    root = tmp_path_factory.mktemp("hub_ids")
    chat_llama().save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    hf_home = root / "hf"
    snapshot = lay_out_cache(hf_home / "hub", root / "model", HUB_ID)
    rows = [{"messages": conversation(a, b)} for a, b in list(SUMS) * 4]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"), HF_HUB_OFFLINE="1")
    argv = [HUB_ID, MISSING, str(root / "chat.jsonl"), str(root / "out"), PROMPT]
    done = subprocess.run([sys.executable, "-c", DRIVER, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "snapshot": snapshot, "results": json.loads(done.stdout.splitlines()[-1])}


def test_train_eval_generate_chat_and_serve_take_a_hub_id_offline(by_id):
    results = by_id["results"]
    for name in ("train", "eval", "baseline", "generate", "chat"):
        assert results[name]["code"] == 0, (name, results[name]["err"])
    metrics = json.loads((by_id["root"] / "out" / "metrics.json").read_text())
    assert metrics["base_model"] == HUB_ID and metrics["steps"] == 3
    # the adapter evaluated by id scores what the run's own validation scored: the same cached model
    assert json.loads(results["eval"]["out"])["perplexity"] == pytest.approx(metrics["best"], rel=1e-6)
    assert results["serve"] == {"kind": "causal", "name_or_path": HUB_ID}


def test_a_hub_id_resolves_to_the_cached_snapshot(by_id, capsys):
    """By id (in the offline process) and by the snapshot's folder (here): the same numbers and words."""
    results, snapshot, root = by_id["results"], str(by_id["snapshot"]), by_id["root"]
    assert json.loads(results["baseline"]["out"]) == pytest.approx(evaluate_base(snapshot, str(root / "chat.jsonl")))
    argv = ["--model", snapshot, "--adapter", str(root / "out"), "--max-tokens", "3", "--stop", "<|im_end|>"]
    assert cli.main(["generate", *argv, "--prompt", PROMPT]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert json.loads(results["generate"]["out"]) == by_folder
    assert results["chat"]["out"].strip() == by_folder["completion"].strip()


def test_the_model_card_and_hub_card_name_the_base_by_its_id(by_id):
    out, snapshot = by_id["root"] / "out", by_id["snapshot"]
    card = (out / "README.md").read_text()
    assert f"- base model: `{HUB_ID}`" in card and f"on {HUB_ID}" in card.splitlines()[0]
    assert make_card(out / "adapter")["base_model"] == HUB_ID
    for name in ("README.md", "metrics.json", "train_config.json", "adapter/adapter_config.json"):
        text = (out / name).read_text()
        assert str(snapshot) not in text and "snapshots" not in text and "models--" not in text, name


def test_an_uncached_id_offline_names_hf_hub_offline(by_id):
    results = by_id["results"]
    assert results["missing"]["code"] == 2
    message = results["missing"]["err"]
    assert MISSING in message and "HF_HUB_OFFLINE" in message and "not in the local cache" in message
    assert results["api_error"]["type"] == "ModelSourceError" and "HF_HUB_OFFLINE" in results["api_error"]["message"]


def test_errors_for_what_is_neither_a_folder_nor_an_id(tmp_path):
    assert "not a folder, nor a Hugging Face Hub id" in explain("AutoConfig", "/no/such/folder", OSError("x"))
    (tmp_path / "model").mkdir()
    assert explain("AutoConfig", str(tmp_path / "model"), OSError("no config.json")).startswith(
        f"cannot load AutoConfig from the folder {tmp_path / 'model'}: no config.json"
    )
