"""LLM training knobs of ``adapterkit train``: precision (``--dtype``, ``--autocast``, ``--adapter-dtype``),
``--gradient-checkpointing``, ``--grad-accum`` and ``--packing``, each compared in numbers with the run
without it (tiny random Llama, BERT and wav2vec2 configs)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

import adapterkit as ak
from adapterkit.apps import cli
from adapterkit.core.composition import PerRow
from adapterkit.core.methods import PRESETS
from adapterkit.errors import AdapterError
from adapterkit.training import TrainConfig, read_table, train
from adapterkit.training.data import micro_batches
from adapterkit.training.models import checkpoint_layers
from adapterkit.training.precision import Precision
from adapterkit.training.tasks import IGNORE, CausalLM, Chat, pack_batch

from conftest import DECODER, make_inputs, make_model, randomize_adapters, saved_tensors
from test_chat import SUMS, chat_llama, conversation
from test_chat import tokenizer as chat_tokenizer

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
WORDS = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(3, DECODER["vocab_size"])]
SPEECH_ONLY = {"p_adapter", "elp"}  # they extend convolutional features: a speech encoder's


def texts(n: int, seed: int) -> str:
    # rows of unequal length: micro-batches and ranks must be weighted by their share of the tokens
    rng = random.Random(seed)
    return "".join(
        json.dumps({"text": " ".join(rng.choices(WORDS[3:], k=rng.randint(3, 14)))}) + "\n" for _ in range(n)
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny random Llama (untied LM head: a head that trains) with a word-level tokenizer, texts and chats."""
    root = tmp_path_factory.mktemp("llm")
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    for seed in (0, 1):  # two checkpoints of one architecture: adapters of one must not load into the other
        torch.manual_seed(seed)
        model = T.LlamaForCausalLM(T.LlamaConfig(**DECODER, pad_token_id=0, tie_word_embeddings=False))
        model.save_pretrained(root / f"llama{seed}")
        tok.save_pretrained(root / f"llama{seed}")
    (root / "train.jsonl").write_text(texts(32, 0))
    chat_llama().save_pretrained(root / "chat")
    chat_tokenizer().save_pretrained(root / "chat")
    rows = [{"messages": conversation(a, b, system=i % 3 == 0)} for i, (a, b) in enumerate(list(SUMS) * 4)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(work: Path, out: Path, **options) -> dict:
    settings = dict(model=str(work / "llama0"), data=str(work / "train.jsonl"), output=str(out), task="causal-lm")
    settings |= dict(adapter="lora", lr=1e-2, max_steps=2, batch_size=8, save_steps=1000, group_by_length=False)
    torch.set_num_threads(1)
    return train(TrainConfig(**{**settings, **options}))


def saved(out: Path) -> dict[str, torch.Tensor]:
    return saved_tensors(out / "adapter")


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# -- precision ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_trains_fp32_master_weights_close_to_fp32(work, tmp_path):
    fp32 = run(work, tmp_path / "fp32")
    bf16 = run(work, tmp_path / "bf16", autocast="bf16")
    ours, theirs = saved(tmp_path / "bf16"), saved(tmp_path / "fp32")
    assert {v.dtype for v in ours.values()} == {torch.float32}  # master weights, saved as trained
    # bf16 rounding: close, and not equal where the CPU computes in bf16 (on CPUs without AVX512-BF16, as the CI
    # machine's, torch 2.13's CPU autocast gave the fp32 losses to the last bit)
    native = torch.cpu._is_avx512_bf16_supported()
    for (_, a), (_, b) in zip(bf16["history"]["loss"], fp32["history"]["loss"], strict=True):
        assert a == pytest.approx(b, rel=2e-2) and (a != b or not native)
    assert_close(ours, theirs, atol=5e-3)


def test_a_bf16_base_keeps_the_adapter_and_head_in_fp32_and_loads_into_any_dtype(work, tmp_path):
    run(work, tmp_path / "out", dtype="bf16")
    files = saved(tmp_path / "out")
    assert {v.dtype for v in files.values()} == {torch.float32}
    assert any(k.startswith("head") and "lm_head" in k for k in files)  # the untied LM head trained, in fp32
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = T.LlamaForCausalLM.from_pretrained(work / "llama0", dtype=dtype)
        ak.load_adapter(model, tmp_path / "out" / "adapter", activate=True)  # the fingerprint matches
        weights = dict(model.named_parameters())
        lora = next(k for k in weights if k.endswith("lora_B"))
        assert weights[lora].dtype == torch.float32  # adapters train and load in fp32 on a half base
        key = "adapter.safetensors:" + lora.replace("model.", "", 1).replace(".adapterkit.task", "")
        torch.testing.assert_close(weights[lora], files[key])
    other = T.LlamaForCausalLM.from_pretrained(work / "llama1", dtype=torch.bfloat16)
    with pytest.raises(ak.AdapterFileError, match="another base model"):
        ak.load_adapter(other, tmp_path / "out" / "adapter")


def test_adapter_dtype_bf16_saves_bf16(work, tmp_path):
    run(work, tmp_path / "out", dtype="bf16", adapter_dtype="bf16")
    assert {v.dtype for v in saved(tmp_path / "out").values()} == {torch.bfloat16}


def test_fp16_scales_the_loss_and_checkpoints_the_scale(work, tmp_path):
    metrics = run(work, tmp_path / "out", dtype="fp16", autocast="fp16", save_steps=1)
    state = json.loads(next((tmp_path / "out" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["scaler"]["scale"] > 1  # a GradScaler ran (torch's starts at 2**16 and halves on overflow)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in metrics["history"]["loss"])


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (dict(dtype="fp8"), "--dtype 'fp8': choose one of fp32, bf16, fp16"),
        (dict(autocast="fp32"), "--autocast 'fp32': choose bf16 or fp16"),
        (dict(adapter_dtype="fp16"), "fp16 weights cannot train with a loss scaler"),
        (dict(full_finetune=True, dtype="bf16"), "--full-finetune trains the base's own weights"),
        (dict(grad_accum=0), "--grad-accum takes a whole number"),
    ],
)
def test_bad_options_say_what_to_change(options, problem):
    with pytest.raises(AdapterError, match=problem.replace("(", r"\(")):
        TrainConfig(model="m", data="d", output="o", **options)


def test_new_options_enter_the_resume_identity_only_when_set():
    plain = TrainConfig(model="m", data="d", output="o")
    assert "grad_accum" not in plain.identity() and "dtype" not in plain.identity()  # old checkpoints resume
    assert TrainConfig(model="m", data="d", output="o", grad_accum=2, dtype="bf16").identity()["grad_accum"] == 2
    assert Precision("bf16", "bf16").scaler(torch.device("cpu")) is None
    assert isinstance(Precision(compute="fp16").scaler(torch.device("cpu")), torch.amp.GradScaler)


# -- gradient checkpointing --------------------------------------------------------------------------------------


def gradients(arch: str, preset: str, checkpointed: bool, per_row: bool = False) -> tuple[dict, int]:
    """The adapters' gradients of one training forward and backward, and the elements autograd saved."""
    model = make_model(arch)
    names = ["a", "b"] if per_row else ["a"]
    for name in names:
        ak.add_adapter(model, name, preset)
    ak.train_adapter(model, "a")
    if per_row:
        for n, p in model.named_parameters():
            p.requires_grad_(p.requires_grad or ".adapterkit.b." in n)
        ak.set_active(model, PerRow(["a", "b"]))
    randomize_adapters(model)
    if checkpointed:
        checkpoint_layers(model)
    model.train()  # dropout on: the recomputation must replay the same random masks
    saved_elements = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_elements[0] += t.numel()
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**make_inputs(arch, batch=2, seq=6)).logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, saved_elements[0]


CASES = [("wav2vec2" if p in SPEECH_ONLY else arch, p) for p in PRESETS for arch in ("llama", "bert")]


@pytest.mark.parametrize(("arch", "preset"), sorted(set(CASES)))
def test_gradient_checkpointing_gives_the_same_gradients(arch, preset):
    plain, kept = gradients(arch, preset, False)
    checkpointed, kept_checkpointed = gradients(arch, preset, True)
    # the layers' activations were dropped and recomputed; the L-adapter keeps every layer's tap for its
    # final weighted sum, outside the layers, so on a tiny config it saves nothing
    assert kept_checkpointed < (2 * kept if preset == "l_adapter" else 0.7 * kept)
    assert plain.keys() == checkpointed.keys() and all(g is not None for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["lora", "prefix", "prompt", "pfeiffer", "parallel"])
def test_gradient_checkpointing_with_an_adapter_per_row(preset):
    plain, _ = gradients("llama", preset, False, per_row=True)
    checkpointed, _ = gradients("llama", preset, True, per_row=True)
    assert any(".adapterkit.b." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_train_with_gradient_checkpointing_equals_without(work, tmp_path):
    plain = run(work, tmp_path / "plain", adapter="pfeiffer")
    checkpointed = run(work, tmp_path / "ckpt", adapter="pfeiffer", gradient_checkpointing=True)
    assert_close(saved(tmp_path / "ckpt"), saved(tmp_path / "plain"), atol=1e-6)
    assert [v for _, v in checkpointed["history"]["loss"]] == pytest.approx([v for _, v in plain["history"]["loss"]])


# -- gradient accumulation ---------------------------------------------------------------------------------------


def test_micro_batches_cut_a_step_in_order():
    assert micro_batches(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches(list(range(5)), 4, world=2) == [[0, 1], [2, 3, 4]]  # every rank keeps a row
    assert micro_batches([7], 4) == [[7]]


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulating_n_micro_batches_equals_one_batch_n_times_larger(work, tmp_path, accum):
    one = run(work, tmp_path / "one", max_steps=1, batch_size=8)
    acc = run(work, tmp_path / "acc", max_steps=1, batch_size=8 // accum, grad_accum=accum)
    assert acc["history"]["loss"][0][1] == pytest.approx(one["history"]["loss"][0][1], rel=1e-6)
    assert_close(saved(tmp_path / "acc"), saved(tmp_path / "one"), atol=1e-6)
    assert acc["steps"] == one["steps"] == 1


def test_accumulation_weights_micro_batches_by_tokens(work):
    """The micro-batches of one step hold different token counts: a mean of their means would differ."""
    task = CausalLM("text", "label", 128)
    examples = task.encode(read_table(work / "train.jsonl"), T.AutoTokenizer.from_pretrained(work / "llama0"))[:8]
    counts = [task.loss_terms(examples[:4]), task.loss_terms(examples[4:])]
    assert counts[0] != counts[1]


def test_ddp_two_processes_with_accumulation_equal_one_big_batch(work, tmp_path):
    common = ["--model", str(work / "llama0"), "--data", str(work / "train.jsonl"), "--task", "causal-lm"]
    common += ["--adapter", "lora", "--lr", "1e-2", "--max-steps", "2", "--threads", "1", "--save-steps", "1000"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "adapterkit"]
    ddp = [*launch, "train", *common, "--batch-size", "4", "--grad-accum", "2", "--output", str(tmp_path / "ddp")]
    subprocess.run(ddp, env=ENV, check=True, capture_output=True)
    one = [sys.executable, "-m", "adapterkit", "train", *common, "--batch-size", "8", "--output", str(tmp_path / "one")]
    subprocess.run(one, env=ENV, check=True, capture_output=True)
    assert_close(saved(tmp_path / "ddp"), saved(tmp_path / "one"), atol=1e-6)
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["distributed"]["world_size"] == 2


# -- packing -----------------------------------------------------------------------------------------------------


def test_a_packed_row_restarts_positions_and_predicts_no_first_token():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}]
    batch = pack_batch(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]  # 7 does not predict 8 across the boundary


def packed_and_padded(model, task, examples):
    """Loss and gradients of the trainable parameters for the packed batch and the padded one."""
    out = []
    for batch in (task.pack(examples), task.collate(examples, 0)):
        model.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return out


@pytest.mark.parametrize(("arch", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("preset", ["lora", "prefix", "pfeiffer"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_one(arch, attention, preset):
    model = make_model(arch)
    model.set_attn_implementation(attention)
    ak.add_adapter(model, "a", preset)
    ak.train_adapter(model, "a")
    randomize_adapters(model)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 7):
        ids = torch.randint(2, 100, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    (packed, packed_grads), (padded, padded_grads) = packed_and_padded(model, CausalLM("text", "label", 64), examples)
    torch.testing.assert_close(packed, padded, atol=1e-6, rtol=1e-6)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    unmasked = dict(pack_batch(examples), labels=torch.tensor([sum((e["labels"] for e in examples), [])]))
    assert not torch.allclose(CausalLM("text", "label", 64).loss(model, unmasked), packed)  # boundaries matter


def test_chat_packing_trains_as_padding_does_with_no_padding(work, tmp_path):
    chat = dict(model=str(work / "chat"), data=str(work / "chat.jsonl"), task="chat", batch_size=4, max_steps=3)
    padded = run(work, tmp_path / "padded", **chat)
    packed = run(work, tmp_path / "packed", packing=True, **chat)
    assert padded["padding_share"] > 0.05 and packed["padding_share"] == 0
    assert [v for _, v in packed["history"]["loss"]] == pytest.approx([v for _, v in padded["history"]["loss"]])
    assert_close(saved(tmp_path / "packed"), saved(tmp_path / "padded"), atol=1e-6)


def test_chat_packing_of_real_conversations_equals_padding(work):
    task = Chat("text", "label", 64)
    examples = task.encode(read_table(work / "chat.jsonl"), chat_tokenizer())[:6]
    model = T.LlamaForCausalLM.from_pretrained(work / "chat")
    ak.add_adapter(model, "a", "lora")
    ak.train_adapter(model, "a")
    randomize_adapters(model)
    (packed, packed_grads), (padded, padded_grads) = packed_and_padded(model, task, examples)
    torch.testing.assert_close(packed, padded, atol=1e-6, rtol=1e-6)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (dict(adapter="prompt"), "a prompt adapter acts on a row as one example"),
        (dict(adapter="unipelt"), "gated"),
        (dict(task="classification"), "classification cannot pack"),
    ],
)
def test_packing_refuses_what_a_packed_row_would_change(work, tmp_path, options, problem):
    with pytest.raises(AdapterError, match=problem):
        run(work, tmp_path / "out", packing=True, **options)


def test_the_command_line_takes_every_knob_at_once(work, tmp_path):
    out = tmp_path / "out"
    args = ["train", "--model", str(work / "chat"), "--data", str(work / "chat.jsonl"), "--task", "chat"]
    args += ["--adapter", "lora", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--dtype", "bf16"]
    args += ["--autocast", "bf16", "--gradient-checkpointing", "--packing", "--quantize", "int8", "--threads", "1"]
    assert cli.main([*args, "--output", str(out)]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert (config["dtype"], config["autocast"], config["grad_accum"]) == ("bf16", "bf16", 2)
    assert config["packing"] and config["gradient_checkpointing"] and config["quantize"] == "int8"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["padding_share"] == 0 and metrics["steps"] == 2
    assert {v.dtype for v in saved(out).values()} == {torch.float32}


def test_train_runs_adaloras_rank_allocation(work, tmp_path):
    """``adapterkit train`` runs the method's training hook: the saved AdaLoRA keeps target_r triplets a layer."""
    options = dict(init_r=4, target_r=1, tinit=0, tfinal=1, deltaT=1, target_modules=["q_proj", "v_proj"])
    run(work, tmp_path, adapter="adalora", max_steps=4, set=options)
    singular = {k: v for k, v in saved(tmp_path).items() if k.endswith("lora_E")}
    assert singular and sum(int((v != 0).sum()) for v in singular.values()) == len(singular)
