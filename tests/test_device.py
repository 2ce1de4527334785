"""``--device`` and what CUDA gets (bf16 autocast, sdpa, pinned batches): the choices on any machine, and
``gpu``-marked tests that train, evaluate and generate on a CUDA GPU against the CPU (skipped without one)."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from adapterkit.apps import cli
from adapterkit.core.device import autocast_context, default_autocast, place, prefer_sdpa, resolve_device, to_device
from adapterkit.errors import AdapterError
from adapterkit.training import TrainConfig, evaluate_output

import conftest
from test_chat import SUMS, chat_llama, conversation, tokenizer

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports a bf16-capable GPU (nothing is put on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_the_default_device_is_cuda_when_present_else_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(AdapterError, match="sees no CUDA GPU here; pass --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == CUDA and resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(AdapterError, match="there are 1 CUDA devices"):
        resolve_device("cuda:1")
    with pytest.raises(AdapterError, match="give cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_cuda_computes_in_bf16_autocast_unless_told_otherwise(fake_cuda):
    assert default_autocast(None, CUDA) == "bf16" and default_autocast(None, torch.device("cpu")) is None
    assert default_autocast("none", CUDA) is None and default_autocast("fp16", CUDA) == "fp16"
    assert TrainConfig(model="m", data="d", output="o").precision.compute == "bf16"  # the default device: cuda
    assert TrainConfig(model="m", data="d", output="o", autocast="none").precision.compute is None
    assert TrainConfig(model="m", data="d", output="o", device="cpu").precision.compute is None
    with pytest.raises(AdapterError, match="--autocast 'fp32': choose bf16 or fp16"):
        default_autocast("fp32", CUDA)


def test_autocast_context_computes_matmuls_in_its_dtype():
    cpu, x = torch.device("cpu"), torch.randn(4, 4)
    with autocast_context(cpu, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    for off in (None, "none"):
        with autocast_context(cpu, off):
            assert (x @ x).dtype == torch.float32


def test_an_eager_model_gets_sdpa_with_the_same_outputs():
    model = chat_llama(attn_implementation="eager")
    ids = torch.tensor([[2, 4, 7, 8, 9, 3, 2, 5]])
    with torch.no_grad():
        eager = model(ids).logits
        prefer_sdpa(model)
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=1e-5)


def test_batches_reach_the_device_unchanged():
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.ones(2, 3)}
    moved = to_device(batch, torch.device("cpu"))
    assert all(torch.equal(moved[k], batch[k]) for k in batch)


class Item:
    """What the collection hook reads and writes of a test item."""

    def __init__(self, gpu: bool) -> None:
        self.gpu, self.added = gpu, []

    def get_closest_marker(self, name: str):
        return pytest.mark.gpu if self.gpu and name == "gpu" else None

    def add_marker(self, marker) -> None:
        self.added.append(marker)


def test_gpu_tests_are_skipped_with_the_reason_where_torch_sees_no_gpu(monkeypatch, request):
    assert any(line.startswith("gpu:") for line in request.config.getini("markers"))  # registered
    items = [Item(gpu=True), Item(gpu=False)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    conftest.pytest_collection_modifyitems(request.config, items)
    [skip] = items[0].added
    assert skip.name == "skip" and "gpu: needs a CUDA GPU" in skip.kwargs["reason"] and not items[1].added
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    again = Item(gpu=True)
    conftest.pytest_collection_modifyitems(request.config, [again])
    assert not again.added


# -- on a CUDA GPU ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("device")
    chat_llama().save_pretrained(root / "llama")
    tokenizer().save_pretrained(root / "llama")
    rows = [{"messages": conversation(a, b)} for a, b in list(SUMS) * 4]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train(work: Path, out: Path, *extra: str) -> list[float]:
    args = ["train", "--model", str(work / "llama"), "--data", str(work / "chat.jsonl"), "--task", "chat",
            "--adapter", "lora", "--lr", "2e-2", "--max-steps", "12", "--batch-size", "8", "--save-steps", "1000",
            "--output", str(out), *extra]  # fmt: skip
    assert cli.main(args) == 0
    return [loss for _, loss in json.loads((out / "metrics.json").read_text())["history"]["loss"]]


@pytest.mark.gpu
def test_training_on_cuda_equals_the_cpu_and_learns(work, tmp_path):
    """fp32 on the GPU (no TF32 for matmuls by default) follows the CPU's losses; the default, bf16 autocast,
    stays close and learns too."""
    cpu = train(work, tmp_path / "cpu", "--device", "cpu")
    gpu = train(work, tmp_path / "gpu", "--device", "cuda", "--autocast", "none")
    assert gpu == pytest.approx(cpu, rel=1e-3, abs=1e-4)
    bf16 = train(work, tmp_path / "bf16")  # the defaults on a GPU machine: cuda, bf16 autocast
    assert bf16 == pytest.approx(cpu, rel=5e-2, abs=5e-2)
    assert max(bf16[-3:]) < min(bf16[:3]) and max(gpu[-3:]) < min(gpu[:3])
    data = str(work / "chat.jsonl")
    on_cpu = evaluate_output(str(work / "llama"), tmp_path / "gpu", data, device="cpu")
    on_gpu = evaluate_output(str(work / "llama"), tmp_path / "gpu", data, device="cuda", autocast="none")
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)


@pytest.mark.gpu
def test_generate_on_cuda_answers_as_on_the_cpu(work, tmp_path, capsys):
    train(work, tmp_path / "run", "--device", "cpu")
    argv = ["generate", "--model", str(work / "llama"), "--adapter", str(tmp_path / "run"), "--max-tokens", "3"]
    prompts = sum([["--prompt", f"what is {a} plus {b} ?"] for a, b in SUMS], [])
    answers = {}
    for device in ("cpu", "cuda"):
        assert cli.main([*argv, *prompts, "--device", device, "--autocast", "none"]) == 0
        answers[device] = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    assert answers["cuda"] == answers["cpu"] and len(answers["cpu"]) == len(SUMS)


@pytest.mark.gpu
def test_a_model_placed_on_cuda_uses_sdpa_and_pinned_batches():
    model = place(chat_llama(attn_implementation="eager"), CUDA)
    assert next(model.parameters()).is_cuda and model.config._attn_implementation == "sdpa"
    batch = to_device({"input_ids": torch.tensor([[2, 4, 7, 8]])}, CUDA)
    assert batch["input_ids"].is_cuda
    with torch.no_grad():
        on_gpu = model(**batch).logits.cpu()
    reference = T.LlamaForCausalLM(model.config).eval()
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(on_gpu, reference(torch.tensor([[2, 4, 7, 8]])).logits, atol=1e-4, rtol=1e-4)
