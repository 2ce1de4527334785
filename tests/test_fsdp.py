"""``torchrun --nproc_per_node=2 -m adapterkit train --fsdp``: gloo FSDP2 on CPU equals one process.

The frozen tiny Llama is sharded (each rank keeps about half), the adapter and the LM head stay whole
and only their gradients are all-reduced; evaluation, saving and resume take every rank.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from adapterkit.apps import cli

from conftest import DECODER, saved_tensors

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
WORDS = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(3, DECODER["vocab_size"])]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "adapterkit"]


def texts(n: int, seed: int) -> str:
    # Rows of unequal length: each rank's token mean must be weighted by its share of the tokens, not of the rows.
    rng = random.Random(seed)
    return "".join(
        json.dumps({"text": " ".join(rng.choices(WORDS[3:], k=rng.randint(3, 14)))}) + "\n" for _ in range(n)
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny random Llama (untied LM head) with a word-level tokenizer, and text data."""
    root = tmp_path_factory.mktemp("fsdp")
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**DECODER, pad_token_id=0, tie_word_embeddings=False)).save_pretrained(
        root / "llama"
    )
    tok.save_pretrained(root / "llama")
    (root / "train.jsonl").write_text(texts(32, 0))
    (root / "val.jsonl").write_text(texts(8, 1))
    return root


def args(work: Path, out: Path, adapter: str, steps: int) -> list[str]:
    data = [
        "--model",
        str(work / "llama"),
        "--data",
        str(work / "train.jsonl"),
        "--validation",
        str(work / "val.jsonl"),
    ]
    return ["train", *data, "--task", "causal-lm", "--adapter", adapter, "--max-steps", str(steps), "--batch-size",
            "8", "--save-steps", "4", "--lr", "1e-2", "--threads", "1", "--output", str(out)]  # fmt: skip


def fsdp(work: Path, out: Path, adapter: str, steps: int, *extra: str) -> tuple[dict, str]:
    """metrics.json and the progress output of a 2-rank run (a hang, as of a collective on one rank, fails)."""
    done = subprocess.run([*LAUNCH, *args(work, out, adapter, steps), "--fsdp", *extra], env=ENV, check=True,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return json.loads((out / "metrics.json").read_text()), done.stderr


tensors = saved_tensors


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def single(work: Path, out: Path, adapter: str, steps: int) -> dict:
    assert cli.main(args(work, out, adapter, steps)) == 0
    return json.loads((out / "metrics.json").read_text())


def assert_same_run(two: dict, one: dict, steps: int) -> None:
    """Per-step losses and per-epoch evaluations equal to fp tolerance."""
    assert len(two["history"]["loss"]) == steps and len(two["history"]["eval"]) == steps // 4
    for key, part in (("loss", lambda h: [v for _, v in h]), ("eval", lambda h: [e["loss"] for e in h])):
        np.testing.assert_allclose(part(two["history"][key]), part(one["history"][key]), atol=1e-5, err_msg=key)


def test_fsdp_two_processes_equal_one(work, tmp_path):
    """LoRA: losses, evaluations and the saved adapter and head of 2 FSDP ranks = 1 process; half the base each."""
    (two, _), one = fsdp(work, tmp_path / "fsdp", "lora", 8), single(work, tmp_path / "one", "lora", 8)
    assert_same_run(two, one, 8)
    assert_close(tensors(tmp_path / "fsdp" / "adapter"), tensors(tmp_path / "one" / "adapter"), atol=1e-5)
    assert "head.safetensors" in os.listdir(tmp_path / "fsdp" / "adapter")
    d = two["distributed"]
    assert d["fsdp"] and d["world_size"] == 2 and d["backend"] == "gloo"
    assert d["allreduced_elements_per_step"] == one["trainable_params"]  # adapter and head gradients only
    assert d["base_params"] == one["total_params"] - one["trainable_params"] == sum(d["base_params_per_rank"])
    assert all(abs(share - 0.5) < 0.02 for share in d["base_share_per_rank"]), d
    assert d["whole_params_per_rank"] == one["trainable_params"] and d["sharded_params_with_grad"] == 0


def kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each in a session of its own, out of reach of a group kill), then torchrun."""
    workers = [int(pid) for f in Path(f"/proc/{proc.pid}/task").glob("*/children") for pid in f.read_text().split()]
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def test_fsdp_resume_after_sigkill_equals_one_process(work, tmp_path):
    """Pfeiffer: a 2-rank FSDP run killed after a checkpoint and resumed with --fsdp ends as 1 process does."""
    out = tmp_path / "killed"
    cmd = [*LAUNCH, *args(work, out, "pfeiffer", 24), "--fsdp"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_with_workers(proc)
    assert not (out / "metrics.json").exists()
    step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    resumed, progress = fsdp(work, out, "pfeiffer", 24, "--resume")
    assert 4 <= step < 24 and f" {step}/24 " in progress  # the progress bar starts at the checkpoint's step
    one = single(work, tmp_path / "one", "pfeiffer", 24)
    assert_same_run(resumed, one, 24)
    assert_close(tensors(out / "adapter"), tensors(tmp_path / "one" / "adapter"), atol=1e-5)
    assert resumed["best"] == pytest.approx(one["best"], abs=1e-4)


def test_fsdp_refuses_full_finetuning(work, tmp_path, capsys):
    cmd = [*args(work, tmp_path / "out", "lora", 1), "--fsdp", "--full-finetune"]
    assert cli.main(cmd) == 2
    assert "--full-finetune freezes nothing; drop --fsdp" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
