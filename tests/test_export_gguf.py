"""``adapterkit export --to gguf / merged`` checked by the runtimes themselves: llama.cpp (llama-cpp-python,
built by scripts/setup.sh) loads the base GGUF with the LoRA adapter GGUF, and the merged GGUF, and its greedy
tokens equal PyTorch's (f32) on SmolLM2-135M-Instruct; the merged checkpoint loads with plain transformers in a
process where adapterkit cannot be imported. Bad input is refused before anything is written."""

import json
import subprocess
import sys

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors import safe_open

import adapterkit as ak
from adapterkit.apps.cli import main
from adapterkit.apps.models import smollm2
from adapterkit.errors import AdapterError, ArchitectureError
from adapterkit.export.gguf import export_gguf, write_lora
from adapterkit.export.merged import export_merged, write_checkpoint

pytestmark = pytest.mark.slow

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\nx =",
    "Water boils at a temperature of",
    "<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n",
]
STEPS = 10


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """SmolLM2 with a LoRA (r=8, alpha=16) on all 7 projections, B random with a fixed seed, saved as a folder;
    and a DoRA and an IA3 beside it (inactive), randomised alike."""
    path = smollm2()
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    ak.add_adapter(model, "task", "lora", r=8, alpha=16, target_modules=PROJECTIONS)
    ak.add_adapter(model, "dora", "lora", r=4, alpha=8, use_dora=True)
    ak.add_adapter(model, "ia3", "ia3")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "ia3_l", "lora_magnitude")):
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
    folder = tmp_path_factory.mktemp("adapter") / "task"
    ak.save_adapter(model, "task", folder)
    ak.set_active(model, "task")
    return model, tokenizer, path, folder


def torch_greedy(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, pad_token_id=2)
    first = model(torch.tensor([ids])).logits[0, -1].numpy()
    return out[0, len(ids) :].tolist(), first


def llama_greedy(llm_cpp: llama_cpp.Llama, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's own greedy decoding: argmax of its logits, token by token."""
    llm_cpp.reset()
    llm_cpp.eval(ids)
    tokens, first = [], None
    for _ in range(STEPS):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm_cpp.ctx, -1), shape=(llm_cpp.n_vocab(),))
        first = logits.copy() if first is None else first
        tokens.append(int(logits.argmax()))
        llm_cpp.eval(tokens[-1:])
    return tokens, first


@pytest.fixture(scope="module")
def expected(llm):
    model, tokenizer, _, _ = llm
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        adapted = [torch_greedy(model, i) for i in ids]
        with ak.disable_adapters(model):
            base = [torch_greedy(model, i) for i in ids]
    return ids, adapted, base


@pytest.fixture(scope="module")
def exported(llm, tmp_path_factory):
    """Base + adapter (through the CLI) and the merged model, f32."""
    _, _, path, folder = llm
    root = tmp_path_factory.mktemp("gguf")
    assert main(["export", "--model", str(path), "--adapter", str(folder), "--to", "gguf", "--type", "f32",
                 str(root / "f32")]) == 0  # fmt: skip
    export_gguf(str(path), str(folder), root / "merged", "f32", merged=True)
    return root


def load(path, lora=None) -> llama_cpp.Llama:
    """llama.cpp on one thread (its threads spin at barriers: on a shared CPU two are erratic, not faster), with
    an f32 KV cache (its default, f16, rounds the attention's keys and values)."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), lora_path=lora and str(lora), n_ctx=256, n_threads=1,
                           n_threads_batch=1, type_k=f32, type_v=f32, verbose=False)  # fmt: skip


def test_the_adapter_file_is_a_llama_cpp_lora_adapter(exported):
    manifest = json.loads((exported / "f32" / "export.json").read_text())
    assert manifest["files"] == ["model.f32.gguf", "task.lora.f32.gguf"]
    reader = gguf.GGUFReader(exported / "f32" / "task.lora.f32.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [fields[k] for k in ("general.type", "adapter.type", "general.architecture")] == ["adapter", "lora", "llama"]
    assert fields["adapter.lora.alpha"] == 16.0
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml's ne: (in, r) and (r, out)
    assert len(shapes) == 30 * 7 * 2
    assert shapes["blk.0.attn_k.weight.lora_a"] == (576, 8) and shapes["blk.0.attn_k.weight.lora_b"] == (8, 192)
    assert shapes["blk.29.ffn_down.weight.lora_a"] == (1536, 8)
    size = {p.name: p.stat().st_size for p in (exported / "f32").iterdir()}
    assert size["task.lora.f32.gguf"] < 0.02 * size["model.f32.gguf"]


def test_llama_cpp_tokenizes_like_transformers(llm, exported, expected):
    llm_cpp = load(exported / "f32" / "model.f32.gguf")
    ids, _, _ = expected
    assert [llm_cpp.tokenize(p.encode(), add_bos=False, special=True) for p in PROMPTS] == ids
    assert llm_cpp.tokenize(b"hello", add_bos=True) == ids_of(llm, "hello")  # the file says: no BOS (as HF)


def ids_of(llm, text):
    return llm[1](text)["input_ids"]


def test_llama_cpp_with_the_lora_adapter_generates_pytorchs_greedy_tokens(exported, expected):
    ids, adapted, base = expected
    llm_cpp = load(exported / "f32" / "model.f32.gguf", exported / "f32" / "task.lora.f32.gguf")
    got = [llama_greedy(llm_cpp, i) for i in ids]
    assert [t for t, _ in got] == [t for t, _ in adapted]
    for (_, mine), (_, theirs) in zip(got, adapted, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=2e-3, rtol=0)
    assert [t for t, _ in adapted] != [t for t, _ in base]  # the adapter changes what is generated
    plain = load(exported / "f32" / "model.f32.gguf")
    assert [llama_greedy(plain, i)[0] for i in ids] == [t for t, _ in base]


def test_the_merged_gguf_generates_the_same_tokens(exported, expected):
    ids, adapted, _ = expected
    llm_cpp = load(exported / "merged" / "task.merged.f32.gguf")
    got = [llama_greedy(llm_cpp, i) for i in ids]
    assert [t for t, _ in got] == [t for t, _ in adapted]
    np.testing.assert_allclose(got[0][1], adapted[0][1], atol=2e-3, rtol=0)


MERGED = ["task", "dora", "ia3"]
LOAD_PLAIN = """
import json, sys
sys.modules["adapterkit"] = None  # importing adapterkit fails here: the checkpoints must not need it
import torch, transformers as T
out = {}
for folder in sys.argv[2:]:
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        out[folder] = model(**tokenizer(sys.argv[1], return_tensors="pt")).logits[0, -1].tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def merged_checkpoints(llm, tmp_path_factory):
    """A merged checkpoint per method, and each one's last logits as plain transformers computes them in a
    process without adapterkit."""
    model, tokenizer, _, _ = llm
    root = tmp_path_factory.mktemp("merged")
    for name in MERGED:
        write_checkpoint(model, tokenizer, name, root / name)
    folders = [str(root / name) for name in MERGED]
    run = subprocess.run([sys.executable, "-c", LOAD_PLAIN, PROMPTS[0], *folders], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    logits = json.loads(run.stdout)
    return {name: (root / name, torch.tensor(logits[folder])) for name, folder in zip(MERGED, folders, strict=True)}


@pytest.mark.parametrize("name", MERGED)
def test_a_merged_checkpoint_loads_without_adapterkit_and_gives_the_adapted_logits(llm, merged_checkpoints, name):
    model, tokenizer, _, _ = llm
    folder, got = merged_checkpoints[name]
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 272 and not [k for k in keys if "adapterkit" in k]
    with torch.no_grad(), ak.use(model, name):
        want = model(**tokenizer(PROMPTS[0], return_tensors="pt")).logits[0, -1]
    with torch.no_grad(), ak.disable_adapters(model):
        base = model(**tokenizer(PROMPTS[0], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    assert (got - base).abs().max() > 0.1  # the adapter is in the weights
    assert ak.active_adapters(model) == ("task",) and not any(row.merged for row in ak.summary(model).adapters)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("ia3", "ia3, not a low-rank update B A.*--merged"), ("dora", "DoRA: it rescales each output row.*--merged")],
)
def test_a_method_llama_cpp_cannot_load_is_refused_with_the_reason(llm, tmp_path, name, reason):
    with pytest.raises(AdapterError, match=reason):
        write_lora(llm[0], name, tmp_path / "x.gguf", "f32")
    assert not list(tmp_path.iterdir())


def test_an_architecture_llama_cpp_export_cannot_express_is_refused(tmp_path):
    T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, architectures=["GPT2LMHeadModel"]).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(ArchitectureError, match="this one is GPT2LMHeadModel: use --to onnx or --to merged"):
        export_gguf(str(tmp_path / "gpt2"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["gguf", "merged"])
def test_a_folder_holding_the_users_files_is_never_touched(llm, tmp_path, target):
    _, _, path, folder = llm
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.f32.gguf").write_text("also mine")
    export = export_gguf if target == "gguf" else export_merged
    with pytest.raises(AdapterError, match="holds files adapterkit did not write .*model.f32.gguf, notes.txt"):
        export(str(path), str(folder), out)
    assert sorted(p.name for p in out.iterdir()) == ["model.f32.gguf", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.f32.gguf").read_text() == "also mine"


def test_the_cli_refuses_options_of_another_target(llm, tmp_path, capsys):
    path = str(llm[2])
    assert main(["export", "--model", path, "--to", "merged", "--type", "f16", str(tmp_path / "o")]) == 2
    assert "--type and --merged are options of --to gguf" in capsys.readouterr().err
    assert main(["export", "--model", path, "--to", "gguf", "--merged", str(tmp_path / "o")]) == 2
    assert "--merged merges an adapter into the model: pass --adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
