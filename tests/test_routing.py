"""Routing (ak.Router, signatures): a tiny random Llama over a word-level vocabulary, two synthetic tasks
drawn from disjoint word ranges (w0-w29, w30-w59) and general inputs from a third (w60-w89)."""

import json
import random
import struct

import pytest
import torch
import transformers as T
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import adapterkit as ak
from adapterkit.core import routing
from adapterkit.errors import AdapterFileError, ConfigError

from conftest import randomize_adapters

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
WORDS = SPECIAL + [f"w{i}" for i in range(90)]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
RANGES = {"a": 0, "b": 30, None: 60}  # task -> its first word


def tokenizer() -> T.PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tok.chat_template = TEMPLATE
    return tok


def llama(seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(WORDS), pad_token_id=0,
    )  # fmt: skip
    return T.LlamaForCausalLM(config).eval()


def texts(task: str | None, n: int, seed: int) -> list[str]:
    """``n`` inputs of 8-16 words from ``task``'s range of 30 words."""
    r, first = random.Random(seed), RANGES[task]
    return [" ".join(f"w{r.randrange(first, first + 30)}" for _ in range(r.randint(8, 16))) for _ in range(n)]


EXAMPLES = {"a": texts("a", 128, 1), "b": texts("b", 128, 2)}


@pytest.fixture(scope="module")
def setup():
    model, tok = llama(), tokenizer()
    ak.add_adapter(model, "a", "lora")
    ak.add_adapter(model, "b", "lora")
    ak.add_adapter(model, "c", "ia3")
    randomize_adapters(model, std=1.0)
    return model, tok, ak.Router.build(model, tok, ["a", "b"], examples=EXAMPLES)


def share(got: list, want) -> float:
    return sum(g == want for g in got) / len(got)


def test_signatures_tell_two_tasks_apart_and_send_general_inputs_to_the_base(setup):
    model, tok, router = setup
    assert share(router.route(texts("a", 100, 3)), "a") >= 0.95
    assert share(router.route(texts("b", 100, 4)), "b") >= 0.95
    assert share(router.route(texts(None, 100, 5)), None) >= 0.95  # the default threshold
    scores = router.scores(texts("a", 50, 6))
    assert scores.shape == (50, 2) and (scores[:, 0] < scores[:, 1]).float().mean() >= 0.95


def test_the_threshold_is_chosen_on_validation_data(setup):
    model, tok, router = setup
    validation = {"a": texts("a", 30, 7), "b": texts("b", 30, 8), None: texts(None, 30, 9)}
    tuned = router.calibrate(validation)
    report = tuned.calibration
    assert tuned.config.threshold == report.threshold and report.inputs == 90
    assert report.kept >= 0.95 and report.correct >= 0.95 and report.to_base >= 0.95
    assert router.calibration is None and router.config.threshold == 1.5  # the original is unchanged
    assert share(tuned.route(texts(None, 100, 10)), None) >= 0.95
    assert tuned.with_config(top_k=2).calibration == report and tuned.with_config(threshold=2.0).calibration is None
    assert share(tuned.route(texts("b", 100, 11)), "b") >= 0.95
    with pytest.raises(ak.AdapterError, match="general inputs under None"):
        router.calibrate({"a": texts("a", 5, 1)})
    with pytest.raises(ak.AdapterError, match="in-task inputs under adapter names"):
        router.calibrate({"zz": texts("a", 5, 1), None: texts(None, 5, 1)})


def test_choose_threshold_separates_at_the_geometric_middle():
    inside, outside = torch.tensor([0.5, 0.8, 1.0]), torch.tensor([4.0, 5.0])
    assert routing.choose_threshold(inside, outside) == pytest.approx(2.0)  # sqrt(1 * 4)
    assert routing.choose_threshold(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == pytest.approx(2**0.5)


def test_weights_mix_the_best_adapters_within_the_threshold(setup):
    model, tok, router = setup
    prompts = texts("a", 4, 12) + texts(None, 2, 13)
    one, two = router.weights(prompts, top_k=1), router.weights(prompts, top_k=2)
    assert [m[0][0] if m else None for m in one] == router.route(prompts)
    for mix in two[:4]:
        assert sum(w for _, w in mix) == pytest.approx(1.0) and [w for _, w in mix] == sorted(w for _, w in mix)[::-1]
    assert one[-1] == two[-1] == []  # general: the base model, mixed or not
    loose = router.with_config(top_k=2, threshold=100.0)  # both adapters within reach of every input
    scores = loose.scores(prompts[:1])[0]
    mix = loose.weights(prompts[:1])[0]
    expected = torch.softmax(-scores.sort().values.double() / 0.1, dim=0)
    assert [w for _, w in mix] == pytest.approx(expected.tolist())
    with pytest.raises(ConfigError, match="top_k"):
        router.weights(prompts, top_k=0)


def test_setups_leave_ia3_out_of_a_mix(setup):
    model, tok, router = setup
    sigs = {"c": router.signatures["a"], "b": router.signatures["b"]}  # c (IA3) scores as a does
    mixing = ak.Router(model, tok, sigs, ak.RouterConfig(threshold=100.0, temperature=1.0, top_k=2))
    prompts = texts("a", 2, 14) + texts("b", 2, 15)
    assert [len(m) for m in mixing.weights(prompts)] == [2, 2, 2, 2]
    assert mixing.setups(prompts) == ["c", "c", "b", "b"]  # IA3 cannot average inside PerRow: it runs alone


def test_generate_with_a_router_equals_generate_with_its_choices(setup):
    model, tok, router = setup
    prompts = [*texts("a", 2, 15), *texts("b", 2, 16), texts(None, 1, 17)[0]]
    chosen = router.route(prompts)
    assert chosen == ["a", "a", "b", "b", None]
    routed = ak.generate(model, tok, prompts, max_tokens=4, route=router)
    assert routed == ak.generate(model, tok, prompts, max_tokens=4, per_prompt=chosen)
    alone = [
        ak.generate(model, tok, [p], max_tokens=4, per_prompt=[c])[0] for p, c in zip(prompts, chosen, strict=True)
    ]
    assert routed == alone
    with pytest.raises(ak.AdapterError, match="not both"):
        ak.generate(model, tok, prompts, route=router, per_prompt=chosen)
    with pytest.raises(ak.AdapterError, match="built on another model"):
        ak.generate(llama(), tok, prompts, route=router)


def test_top_k_mixing_per_row_equals_each_row_with_its_average(setup):
    model, tok, router = setup
    mixing = router.with_config(top_k=2, threshold=100.0, temperature=1.0)  # real mixes on every row
    prompts = [" ".join(t.split()[:8]) for t in texts("a", 2, 18) + texts("b", 1, 19)]  # no padding
    rows = mixing.setups(prompts)
    assert all(isinstance(r, ak.Average) for r in rows)
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), ak.use(model, ak.PerRow(rows)):
        mixed = model(**batch).logits
    for i, block in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        with torch.no_grad(), ak.use(model, block):
            torch.testing.assert_close(mixed[i : i + 1], model(**one).logits, atol=1e-5, rtol=1e-5)
        with torch.no_grad(), ak.use(model, block.children[0]):  # the mix is not just its best adapter
            assert (model(**one).logits - mixed[i : i + 1]).abs().max() > 1e-3
    text = ak.generate(model, tok, prompts, max_tokens=3, route=mixing)
    assert text == ak.generate(model, tok, prompts, max_tokens=3, per_prompt=rows)


def test_a_signature_round_trips_and_routers_build_from_folders(setup, tmp_path):
    model, tok, router = setup
    for name in ("a", "b"):
        ak.save_adapter(model, name, tmp_path / name)
        ak.save_signature(tmp_path / name, router.signatures[name])
        assert ak.load_signature(tmp_path / name) == router.signatures[name]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "head.safetensors", "routing.json", "routing.safetensors",
    ]  # fmt: skip
    ak.save_adapter(model, "a", tmp_path / "a")  # saving the adapter again keeps its signature
    assert ak.load_signature(tmp_path / "a") == router.signatures["a"]
    fresh = llama()
    rebuilt = ak.Router.build(fresh, tok, [tmp_path / "a", str(tmp_path / "b")])
    assert set(ak.list_adapters(fresh)) == {"a", "b"}
    prompts = texts("a", 3, 20) + texts(None, 2, 21)
    torch.testing.assert_close(rebuilt.scores(prompts), router.scores(prompts), atol=1e-5, rtol=1e-5)


def test_build_names_what_is_missing(setup, tmp_path):
    model, tok, router = setup
    with pytest.raises(ak.AdapterError, match=r"'c' has no routing signature; pass examples=\{'c'"):
        ak.Router.build(model, tok, ["a", "c"], examples={"a": EXAMPLES["a"]})
    with pytest.raises(ak.AdapterError, match=r"examples name \['zz'\]"):
        ak.Router.build(model, tok, ["a"], examples={"a": EXAMPLES["a"], "zz": EXAMPLES["b"]})
    with pytest.raises(ak.AdapterError, match="no adapter named 'nope'"):
        ak.Router.build(model, tok, ["nope"])
    with pytest.raises(ak.AdapterError, match="pull hub:me/x first"):
        ak.Router.build(model, tok, ["hub:me/x"])
    with pytest.raises(ak.AdapterError, match="at least 4 example inputs"):
        ak.signature(model, tok, ["w1 w2"] * 3)
    with pytest.raises(ak.AdapterError, match="all give the same features"):
        ak.signature(model, tok, ["w1 w2"] * 8)
    with pytest.raises(ConfigError, match="layer 7 is out of range: the model gives 3 hidden states"):
        ak.signature(model, tok, EXAMPLES["a"][:8], layer=7)
    with pytest.raises(ConfigError, match="threshold"):
        ak.RouterConfig(threshold=float("nan"))
    other = llama(seed=1)  # another base model: its weights differ
    ak.add_adapter(other, "a", "lora")
    with pytest.raises(AdapterFileError, match="computed on another base model"):
        ak.Router(other, tok, {"a": router.signatures["a"]})


def test_the_signature_follows_the_layer_and_reads_conversations(setup):
    model, tok, router = setup
    sig = ak.signature(model, tok, EXAMPLES["a"][:32], layer=-1)
    assert (sig.layer, sig.depth, sig.dim, sig.components.shape[0]) == (2, 3, 128, 8)  # one direction per 4
    assert router.signatures["a"].layer == 1  # the default: the middle hidden state
    chat = [{"role": "system", "content": "w80"}, {"role": "user", "content": EXAMPLES["a"][0]}]
    found, _ = routing.features(model, tok, [chat, EXAMPLES["a"][0]], [1])
    torch.testing.assert_close(found[1][0], found[1][1])  # a conversation is routed by its user turns


def hostile(folder, sig, **tensors) -> None:
    """Write ``sig``'s files with ``tensors`` replacing (or, for new keys, joining) its own."""
    ak.save_signature(folder, sig)
    mine = {k: getattr(sig, k) for k in routing.TENSORS}
    save_file({k: v for k, v in {**mine, **tensors}.items() if v is not None}, folder / routing.SIGNATURE_FILE)


def huge(folder, sig, key: str, shape: list[int]) -> None:
    """A header that declares ``key`` with ``shape`` (the others as they are), over no data at all."""
    header = {
        k: {"dtype": "F32", "shape": list(getattr(sig, k).shape), "data_offsets": [0, 0]} for k in routing.TENSORS
    }
    header[key]["shape"] = shape
    text = json.dumps(header).encode()
    (folder / routing.SIGNATURE_FILE).write_bytes(struct.pack("<Q", len(text)) + text)


@pytest.mark.parametrize(
    "attack,message",
    [
        (lambda f, s: hostile(f, s, scale=torch.ones(7)), r"scale has shape \(7,\), expected \(128,\)"),
        (lambda f, s: hostile(f, s, mean=torch.full((128,), float("nan"))), "mean holds NaN or infinite values"),
        (lambda f, s: hostile(f, s, spread=-s.spread), "spread and residual must be positive"),
        (lambda f, s: hostile(f, s, components=s.components * 2), "orthonormal rows"),
        (lambda f, s: hostile(f, s, calibration=s.calibration.flip(0)), "calibration must be non-negative and sorted"),
        (lambda f, s: hostile(f, s, mean=torch.ones(128, dtype=torch.int64)), "mean has dtype 'I64'"),
        (lambda f, s: hostile(f, s, extra=torch.ones(1)), r"tensors \['calibration', 'components', 'extra'"),
        (lambda f, s: hostile(f, s, calibration=torch.zeros(3)), "calibration length differs"),
        (lambda f, s: huge(f, s, "components", [10**6, 65536]), r"components has shape \[1000000, 65536\]"),
        (lambda f, s: huge(f, s, "mean", [2**40]), r"mean has shape \[1099511627776\], expected 1 dimensions"),
        (lambda f, s: huge(f, s, "residual", [1, 1]), r"residual has shape \[1, 1\]"),
        (lambda f, s: (f / routing.SIGNATURE_FILE).write_bytes(struct.pack("<Q", 2**60)), "header length"),
        (lambda f, s: (f / routing.SIGNATURE_FILE).write_bytes(b"\x00" * 3), "header length -1"),
        (lambda f, s: (f / routing.SIGNATURE_FILE).unlink(), "missing"),
        (lambda f, s: (f / routing.SIGNATURE_JSON).write_text("{not json"), "not JSON"),
        (lambda f, s: (f / routing.SIGNATURE_JSON).write_text(json.dumps({"format": "x"})), 'no "format"'),
        (lambda f, s: edit_json(f, version=99), "version 99, this adapterkit reads version 1"),
        (lambda f, s: edit_json(f, layer="1"), "layer must be an integer"),
        (lambda f, s: edit_json(f, layer=5), "layer 5 must be an integer in 0..depth-1"),
        (lambda f, s: edit_json(f, base_model={"model_type": "llama", "fingerprint": {"x": 1}}), "fingerprint entry"),
    ],
)
def test_hostile_signature_files_are_refused(setup, tmp_path, attack, message):
    sig = setup[2].signatures["a"]
    ak.save_signature(tmp_path, sig)
    attack(tmp_path, sig)
    with pytest.raises(AdapterFileError, match=message):
        ak.load_signature(tmp_path)


def edit_json(folder, **changes) -> None:
    meta = json.loads((folder / routing.SIGNATURE_JSON).read_text())
    (folder / routing.SIGNATURE_JSON).write_text(json.dumps({**meta, **changes}))


def test_a_folder_without_a_signature_says_how_to_make_one(tmp_path):
    with pytest.raises(AdapterFileError, match=r"holds no routing signature.*ak.save_signature"):
        ak.load_signature(tmp_path)


def test_the_training_hook_signs_text_and_skips_speech(setup, tmp_path):
    model, tok, router = setup
    chats = [
        json.dumps([{"role": "user", "content": t}, {"role": "assistant", "content": "w1"}]) for t in EXAMPLES["a"]
    ]
    assert routing.sign_training_output(model, tok, chats[:40], tmp_path / "adapter") is None  # no adapter there
    ak.save_adapter(model, "a", tmp_path / "adapter")
    sig = routing.sign_training_output(model, tok, chats[:40], tmp_path / "adapter")
    assert ak.load_signature(tmp_path / "adapter") == sig
    assert sig == ak.signature(model, tok, EXAMPLES["a"][:40])  # the JSON cells are read as conversations
    assert routing.sign_training_output(model, object(), ["a.wav"] * 8, tmp_path / "adapter") is None  # speech
    assert routing.sign_training_output(model, tok, [{"audio": 1}] * 8, tmp_path / "adapter") is None


@pytest.fixture(scope="module")
def three_loras():
    model = llama()
    for name in ("x", "y", "z"):
        ak.add_adapter(model, name, "lora", r=4)
    ak.add_adapter(model, "s", "ia3")
    randomize_adapters(model, std=0.5)
    return model


def test_arrow_prototypes_are_the_top_right_singular_vectors(three_loras):
    module = three_loras.model.layers[0].self_attn.q_proj.adapterkit["x"]
    top = torch.linalg.svd(module.delta().double())[2][0].float()
    proto = module.prototype()
    assert proto.shape == (128,) and min((proto - top).abs().max(), (proto + top).abs().max()) < 1e-5
    with torch.no_grad():
        module.lora_B.mul_(-1).add_(0.3)  # a changed adapter gets a new prototype
    top = torch.linalg.svd(module.delta().double())[2][0].float()
    assert min((module.prototype() - top).abs().max(), (module.prototype() + top).abs().max()) < 1e-5


def test_arrow_sends_each_token_through_its_best_matching_lora(three_loras):
    host = three_loras.model.layers[1].self_attn.v_proj
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))
    modules = [host.adapterkit[n] for n in ("x", "y", "z")]
    with torch.no_grad():
        base = torch.nn.functional.linear(x, host.weight)
        deltas = torch.stack([torch.nn.functional.linear(x, m.delta()) for m in modules], dim=-1)  # (2, 5, out, 3)
        best = (x @ torch.stack([m.prototype() for m in modules]).T).abs().argmax(dim=-1)  # (2, 5)
        with ak.use(three_loras, ak.Arrow("x", "y", "z", top_k=1)):
            routed = host(x)
    expected = base + deltas.gather(-1, best[..., None, None].expand(-1, -1, deltas.shape[2], 1)).squeeze(-1)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    assert len(best.unique()) > 1  # the tokens do not all pick one adapter


def test_arrow_at_a_high_temperature_is_the_plain_average(three_loras):
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        with ak.use(three_loras, ak.Arrow("x", "y", "z", temperature=1e9)):
            arrow = three_loras(input_ids=ids).logits
        with ak.use(three_loras, ak.Average("x", "y", "z")):
            average = three_loras(input_ids=ids).logits
        with ak.use(three_loras, ak.PerRow([ak.Arrow("x", "y", "z", temperature=1e9), None])):
            rows = three_loras(input_ids=ids.repeat(2, 1)).logits
    torch.testing.assert_close(arrow, average, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[:1], arrow, atol=1e-5, rtol=1e-5)
    block = ak.composition.parse_expression("Arrow(x, y, top_k=1, temperature=0.5)")
    assert block == ak.Arrow("x", "y", top_k=1, temperature=0.5)
    assert ak.composition.from_dict(block.to_dict()) == block
    with pytest.raises(ConfigError, match="Arrow routes tokens among plain LoRA adapters"):
        ak.set_active(three_loras, ak.Arrow("x", "s"))
    with pytest.raises(ConfigError, match="top_k >= 1"):
        ak.Arrow("x", "y", top_k=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_a_middle_layer_stops_the_forward_there_and_equals_the_full_hidden_states(arch):
    from conftest import ARCHS

    config_cls, kwargs, bare, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = bare(config_cls(**dict(kwargs, num_hidden_layers=4))).eval()
    batch = {"input_ids": torch.randint(5, 90, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states
        depth = len(full)
        for index in range(depth - 1):  # the last is normalised by the model: the full forward gives it
            found, got_depth = routing.inputs._states(model, dict(batch), [index])
            assert got_depth == depth
            torch.testing.assert_close(found[index], full[index], rtol=0, atol=0)
    ran = []
    handle = routing.inputs._blocks(model)[-1].register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad():
        routing.inputs._states(model, dict(batch), [1])  # block 0's output
    handle.remove()
    assert depth == 5 and ran == []  # the deepest block never ran


def test_predict_routes_each_text_to_its_adapter_with_its_own_head(tmp_path, capsys):
    """``adapterkit predict --route``: each text through the adapter its signature picks, with that adapter's
    head (two adapters with opposite heads here), and general texts get no label; equal to classifying each
    group with its adapter alone."""
    from adapterkit.apps import cli

    tok = tokenizer()
    config = T.BertConfig(vocab_size=len(WORDS), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, num_labels=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    inputs = {"a": texts("a", 6, 7), "b": texts("b", 6, 8), None: texts(None, 4, 9)}
    expected = {}
    for sign, task in ((1.0, "a"), (-1.0, "b")):
        ak.add_adapter(model, task, "lora", activate=True)
        randomize_adapters(model, std=1.0)
        with torch.no_grad():
            model.classifier.weight.mul_(sign)  # the two heads disagree: the wrong one flips the label
        ak.save_adapter(model, task, tmp_path / task)
        ak.save_signature(tmp_path / task, ak.signature(model, tok, texts(task, 64, 3)))
        batch = tok(inputs[task], padding=True, return_tensors="pt")
        with torch.no_grad():
            expected[task] = model(**batch).logits.softmax(-1).argmax(-1).tolist()
        ak.delete_adapter(model, task)
    signatures = {task: ak.load_signature(tmp_path / task) for task in ("a", "b")}
    validation = {"a": texts("a", 16, 11), "b": texts("b", 16, 12), None: texts(None, 16, 13)}
    threshold = ak.Router(model, tok, signatures, resident=False).calibrate(validation).config.threshold
    given = [t for task in ("a", None, "b") for t in inputs[task]]
    args = ["predict", "--model", str(tmp_path / "base"), "--route", f"--route-threshold={threshold}"]
    args += [f"--adapter={task}={tmp_path / task}" for task in ("a", "b")] + [f"--text={t}" for t in given]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == given
    by_task = {task: [r for r in rows if r["text"] in inputs[task]] for task in inputs}
    assert all(r["adapter"] is None and r["label"] is None for r in by_task[None])
    for task in ("a", "b"):
        routed = [r["adapter"] for r in by_task[task]]
        assert set(routed) <= {task, None} and routed.count(task) >= 5  # a rare one falls above the threshold
        for row, label in zip(by_task[task], expected[task], strict=True):
            if row["adapter"] == task:  # through its adapter and that adapter's own head
                assert int(row["label"].removeprefix("LABEL_")) == label
    assert expected["a"] != expected["b"]  # the heads disagree: a text through the wrong one would show it
