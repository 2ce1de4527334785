"""A frozen base in int8 / int4 weight-only form (torchao, CPU): close to the fp32 model, adapters of every
preset train on it in fp32 while the integer weights stay bit for bit, adapters move between the quantized
and the fp32 twin both ways, merging is refused, deleting restores, and ``adapterkit train --quantize``."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T

import adapterkit as ak
from adapterkit.apps import cli
from adapterkit.core import state as st
from adapterkit.core.backbone import fingerprint
from adapterkit.core.quantize import Int4Linear, base_bytes, dense_weight, is_quantized, quantize_base
from adapterkit.errors import AdapterError, AdapterFileError, ConfigError

from conftest import DECODER
from test_chat import SUMS, WORDS, conversation, tokenizer
from test_removal import anatomy

# Linear inputs of 64 and 128: int4 takes groups of 32/64/128 input weights (DECODER's 37 would stay fp32).
CONFIG = dict(DECODER, hidden_size=64, intermediate_size=128)
PRESETS = ["lora", "dora", "ia3", "pfeiffer", "houlsby", "prefix", "prompt"]
# Measured on this model: logits' relative RMS error 0.8% (int8), 9% (int4: 16 levels, bf16 compute).
TOLERANCE = {"int8": 0.02, "int4": 0.2}


def tiny(seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def int_weights(model) -> dict[str, torch.Tensor]:
    """Every tensor inside the quantized weights (integers, scales, zero points), cloned."""
    parts = {}
    for name, module in model.named_modules():
        if is_quantized(module):
            for part in type(module.weight).tensor_data_names:
                parts[f"{name}.{part}"] = getattr(module.weight, part).clone()
    return parts


@pytest.fixture(scope="module")
def fp32():
    return tiny()


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, fp32):
    model = copy.deepcopy(fp32)
    report = quantize_base(model, request.param)
    return request.param, model, report


def test_quantized_base_is_close_and_smaller(fp32, quantized):
    bits, model, report = quantized
    linears = [n for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(report.quantized) == set(linears) - {"lm_head"} and len(report.quantized) == 14
    assert list(report.skipped) == ["lm_head"]  # the head stays fp32
    assert all(is_quantized(model.get_submodule(n)) for n in report.quantized)
    assert report.bytes_before / report.bytes_after > (3.5 if bits == "int8" else 6.0)  # 8 + 32/64, 4 + 32/32 bits
    assert base_bytes(model) < 0.45 * base_bytes(fp32)  # embeddings and lm_head stay fp32
    with torch.no_grad():
        err = relative_error(model(ids()).logits, fp32(ids()).logits)
    assert 1e-4 < err < TOLERANCE[bits]  # changed (it is quantized) but close
    assert fingerprint(model) == fingerprint(fp32)  # taken before quantizing


def test_int4_linear_passes_exact_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    quantize_base(torch.nn.Sequential(layer), "int4")
    assert isinstance(layer, Int4Linear)
    x = torch.randn(3, 5, 64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    y = x.detach().requires_grad_()
    (F.linear(y.to(torch.bfloat16), dense_weight(layer).to(torch.bfloat16)).float() + layer.bias).pow(
        2
    ).sum().backward()
    assert torch.allclose(x.grad, y.grad, rtol=2e-2, atol=2e-2)  # bf16 compute on both sides
    assert x.grad.abs().max() > 0.1


def train(model, preset: str, steps: int = 8, **overrides) -> list[float]:
    """Train a new adapter ``a`` (head frozen); every one of its parameters must have moved."""
    torch.manual_seed(0)  # the same initial adapter on every base
    ak.add_adapter(model, "a", preset, **overrides)
    ak.train_adapter(model, "a", train_head=False)
    return fit(model, steps)


def fit(model, steps: int = 8) -> list[float]:
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trained.items()}
    torch.manual_seed(0)
    opt = torch.optim.AdamW(trained.values(), lr=5e-2)
    losses = []
    for _ in range(steps):
        loss = model(ids(), labels=ids()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert trained and all(".adapterkit." in n for n in trained)
    assert [n for n, p in trained.items() if torch.equal(p, start[n])] == []  # gradients reached every layer
    return losses


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_the_quantized_base(fp32, quantized, preset):
    bits, base, _ = quantized
    model = copy.deepcopy(base)
    before = int_weights(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not is_quantized_param(model, n)}
    losses, reference = train(model, preset), train(copy.deepcopy(fp32), preset)
    assert losses[-1] < losses[0] - 0.05, losses
    assert abs(losses[-1] - reference[-1]) < {"int8": 0.02, "int4": 0.1}[bits]  # as on the fp32 base
    after = int_weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    for name, p in model.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name  # embeddings, norms, head: frozen
        elif ".adapterkit." in name:
            assert not is_quantized_param(model, name) and p.dtype == torch.float32 and p.requires_grad


def is_quantized_param(model, name: str) -> bool:
    return is_quantized(model.get_submodule(name.rsplit(".", 1)[0])) and name.endswith(".weight")


@pytest.mark.parametrize("direction", ["quantized->fp32", "fp32->quantized"])
def test_adapters_move_between_the_quantized_and_the_fp32_twin(fp32, quantized, direction, tmp_path):
    bits, base, _ = quantized
    source, target = copy.deepcopy(base), copy.deepcopy(fp32)
    if direction == "fp32->quantized":
        source, target = target, source
    train(source, "lora", steps=3)
    ak.save_adapter(source, "a", tmp_path / "a")
    ak.load_adapter(target, tmp_path / "a", activate=True)
    saved = {n: p for n, p in source.named_parameters() if ".adapterkit." in n}
    loaded = {n: p for n, p in target.named_parameters() if ".adapterkit." in n}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    with torch.no_grad():
        out, ref = source(ids()).logits, target(ids()).logits
        plain = copy.deepcopy(fp32)(ids()).logits
    assert relative_error(out, ref) < TOLERANCE[bits]
    assert relative_error(ref, plain) > 2 * relative_error(out, ref)  # the adapter matters more than quantizing
    with pytest.raises(AdapterFileError, match="another base model"):
        ak.load_adapter(tiny(seed=5), tmp_path / "a")  # the fingerprint still tells bases apart


def test_merging_is_refused_and_deleting_restores(quantized):
    bits, base, _ = quantized
    model = copy.deepcopy(base)
    with torch.no_grad():
        before_out = model(ids()).logits
    before_ints, before = int_weights(model), anatomy(model)
    ak.add_adapter(model, "a", "lora", init_weights="gaussian")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapterkit["a"].lora_B.normal_()
    ak.set_active(model, "a")
    with pytest.raises(AdapterError, match="quantized .* could not be undone exactly"):
        ak.merge_adapter(model, "a")
    assert ak.summary(model).adapters[0].merged is False
    ak.delete_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, before_out)
    assert anatomy(model) == before
    after = int_weights(model)
    assert all(torch.equal(before_ints[k], after[k]) for k in before_ints)


def test_quantizing_after_adding_keeps_adapters_in_fp32(fp32):
    model = copy.deepcopy(fp32)
    ak.add_adapter(model, "a", "houlsby", activate=True)
    report = quantize_base(model, "int8")
    assert not any(".adapterkit." in n for n in report.quantized) and len(report.quantized) == 14
    linears = [m for _, a in st.adapter_modules(model, "a") for m in a.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float32 and not is_quantized(m) for m in linears)
    assert fingerprint(model) == fingerprint(fp32)
    ak.train_adapter(model, "a", train_head=False)
    losses = fit(model)
    assert losses[-1] < losses[0] - 0.05, losses


def test_bad_requests_are_refused(fp32):
    model = copy.deepcopy(fp32)
    with pytest.raises(ConfigError, match="choose 'int8' or 'int4'"):
        quantize_base(model, 3)
    ak.add_adapter(model, "a", "lora")
    ak.merge_adapter(model, "a")
    with pytest.raises(AdapterError, match="merged into the weights"):
        quantize_base(model, "int8")
    ak.unmerge_adapter(model, "a")
    with pytest.raises(ConfigError, match="group_size must be one of"):
        quantize_base(model, "int4", group_size=48)
    assert quantize_base(model, 8).bits == "int8"
    with pytest.raises(AdapterError, match="quantized already"):
        quantize_base(model, "int4")


def test_cli_trains_an_adapter_on_an_int8_base(tmp_path):
    torch.manual_seed(0)
    config = T.LlamaConfig(**dict(CONFIG, vocab_size=len(WORDS), pad_token_id=0))
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer().save_pretrained(tmp_path / "llama")
    rows = [{"messages": conversation(a, b)} for a, b in list(SUMS) * 8]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "chat.jsonl"), "--validation",
            str(tmp_path / "chat.jsonl"), "--task", "chat", "--adapter", "lora", "--set", "r=4", "--lr", "2e-2",
            "--epochs", "4", "--batch-size", "8", "--output", str(tmp_path / "out"), "--threads", "1",
            "--quantize", "int8"]  # fmt: skip
    assert cli.main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    evals = [e["perplexity"] for e in metrics["history"]["eval"]]
    assert evals[-1] < 0.6 * evals[0], evals  # measured 2.45 -> 1.26
    fp = T.LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    ak.load_adapter(fp, tmp_path / "out" / "adapter")  # trained on int8, loads on the fp32 base
    assert set(ak.list_adapters(fp)) == {"task"}


def test_int4_keeps_layers_its_groups_cannot_split():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**dict(DECODER, tie_word_embeddings=True)))  # intermediate 37
    report = quantize_base(model, "int4")
    down, up = ({f"model.layers.{i}.mlp.{n}" for i in range(2)} for n in ("down_proj", "up_proj"))
    assert report.skipped == {
        **{k: "in_features 37 is not a multiple of the int4 group size 32" for k in down},
        **{k: "out_features 37 is not a multiple of 16 (the int4 kernel's packing)" for k in up},
        **{k.replace("up", "gate"): "out_features 37 is not a multiple of 16 (the int4 kernel's packing)" for k in up},
        "lm_head": "weight shared with another module (tied to the embeddings): quantizing would add a copy",
    }
    assert len(report.quantized) == 8 and not any(is_quantized(model.get_submodule(k)) for k in down | up)
    with torch.no_grad():
        assert model(ids()).logits.isfinite().all()


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_smollm2_quantized_answers_and_is_smaller(bits):
    from adapterkit.apps.models import smollm2

    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    path = smollm2()
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    fp_bytes = base_bytes(model)
    with torch.no_grad():
        ref = model(**inputs).logits[0, -1]
    report = quantize_base(model, bits)
    assert len(report.quantized) == 210 and list(report.skipped) == ["lm_head"]  # tied to the embeddings
    # measured: Linear weights 4.0x (int8) / 6.4x (int4) smaller, the whole base 2.44x / 2.98x
    assert report.bytes_before / report.bytes_after > (3.9 if bits == "int8" else 6.0)
    assert fp_bytes / base_bytes(model) > (2.3 if bits == "int8" else 2.8)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert relative_error(logits, ref) < 0.04  # measured 0.021 (int8), 0.017 (int4, groups of 32)
    assert (
        tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        == "The capital of France is Paris."
    )
