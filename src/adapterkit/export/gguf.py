"""llama.cpp's files: a causal LM's base as one GGUF, each LoRA as a small GGUF LoRA adapter beside it.

What llama.cpp reads, from its ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` and
``src/llama-adapter.cpp`` (the copy vendored by llama-cpp-python 0.3.36, which the tests run):

- tensor names come from llama.cpp's own table, which the ``gguf`` package ships
  (``gguf.get_tensor_name_map``: ``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``);
- Llama's query and key rows are reordered from Hugging Face's rotate-half RoPE layout to llama.cpp's
  interleaved one (:func:`rope_rows`), in the base weights and in a LoRA's ``B`` alike;
- an adapter file has ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for
  each target ``NAME.weight.lora_a`` (r, in) and ``NAME.weight.lora_b`` (out, r) in numpy order (ggml's
  ``ne`` reversed): peft's A and B as they are. llama.cpp scales ``B A x`` by ``alpha / r``, r read from B;
- vectors stay f32 in every type; q8_0 needs rows of whole 32-value blocks, other matrices fall back to
  f16 (the converters' rule). The tokenizer is llama.cpp's BPE ("gpt2") with a named pre-tokenizer,
  recognised by the hash of a fixed text's tokens (``get_vocab_base_pre``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from adapterkit.core import state as st
from adapterkit.core.adapters import known
from adapterkit.core.methods.lora import LoRA
from adapterkit.errors import AdapterError, ArchitectureError

# transformers class -> llama.cpp architecture (convert_hf_to_gguf's LlamaModel, with its Q/K reordering)
ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA}

# llama.cpp's pre-tokenizer names by the sha256 of str(tokenizer.encode(PRE_TOKENIZER_TEXT)), from its
# get_vocab_base_pre (generated there by convert_hf_to_gguf_update.py); the Llama family's entries
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
}
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

Q = gguf.GGMLQuantizationType
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def architecture(config: Any) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a transformers config, or an :class:`ArchitectureError` naming the fix."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ArchitectureError(
        f"--to gguf writes {', '.join(ARCHITECTURES)} models (llama.cpp's Llama); this one is "
        f"{names[0] if names else getattr(config, 'model_type', 'unknown')}: use --to onnx or --to merged"
    )


def write_base(model: nn.Module, tokenizer_dir: Path, path: Path, kind: str) -> None:
    """``model``'s base weights (no adapter: the unmerged weights) and tokenizer as one GGUF file."""
    arch = architecture(model.config)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(getattr(model.config, "name_or_path", "") or "model")).name)
        hyperparameters(writer, model.config, kind)
        vocabulary(writer, tokenizer_dir, model.config.vocab_size)
        for name, array in base_tensors(model, arch):
            add_tensor(writer, name, array, kind)

    write_gguf(path, arch, fill)


def write_lora(model: nn.Module, name: str, path: Path, kind: str) -> None:
    """Adapter ``name`` (a LoRA) as a llama.cpp LoRA adapter file for the base :func:`write_base` writes."""
    arch = architecture(model.config)
    alpha, pairs = lora_pairs(model, name, arch)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for target, a, b in pairs:
            add_tensor(writer, f"{target}.lora_a", a, kind)
            add_tensor(writer, f"{target}.lora_b", b, kind)

    write_gguf(path, arch, fill)


def write_gguf(path: Path, arch: gguf.MODEL_ARCH, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, kind: str) -> None:
    """``array`` in the file's type: vectors f32; q8_0 where rows are whole blocks, else f16."""
    if array.ndim == 1 or kind == "f32":
        writer.add_tensor(name, array.astype(np.float32))
    elif kind == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def hyperparameters(writer: gguf.GGUFWriter, config: Any, kind: str) -> None:
    """The ``llama.*`` keys convert_hf_to_gguf writes for a Llama (TextModel and LlamaModel)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(FILE_TYPES[kind])
    if rope(config).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope(config)["factor"])


def rope(config: Any) -> dict[str, Any]:
    """RoPE's settings: transformers 5's ``rope_parameters``, or 4's ``rope_theta`` + ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": getattr(config, "rope_theta", 1e4)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ArchitectureError(f"RoPE scaling {kind!r} is not written to GGUF by adapterkit (default, linear, llama3)")
    return {**params, "rope_type": kind}


def rope_factors(config: Any, head_dim: int) -> np.ndarray:
    """Llama 3's per-frequency RoPE factors, the ``rope_freqs.weight`` tensor (LlamaModel.generate_extra_tensors)."""
    params = rope(config)
    freqs = 1.0 / (params.get("rope_theta", 1e4) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low = params.get("factor", 8.0), params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def base_tensors(model: nn.Module, arch: gguf.MODEL_ARCH) -> Iterator[tuple[str, np.ndarray]]:
    """Every base parameter under llama.cpp's name (a tied ``lm_head`` once, as the embeddings), Q/K reordered."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for key, p in st.base_named_parameters(model):
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reads a missing output.weight as the embeddings
        yield gguf_name(names, key), rope_rows(key, p.detach().float(), config).numpy()
    if rope(config)["rope_type"] == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors(config, head_dim)


def gguf_name(names: gguf.TensorNameMap, key: str) -> str:
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ArchitectureError(f"llama.cpp's Llama has no tensor for {key}: this model cannot be written as GGUF")
    return name


def rope_rows(key: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    """Query/key rows (of a weight, bias or LoRA ``B``) from rotate-half to interleaved order
    (convert_hf_to_gguf's ``LlamaModel.permute``); other tensors as they are."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": getattr(config, "num_key_value_heads", None)}
    for proj, n in heads.items():
        if f".{proj}." in f"{key}.":
            n = n or config.num_attention_heads
            shape = tensor.shape
            return tensor.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    return tensor


def lora_pairs(
    model: nn.Module, name: str, arch: gguf.MODEL_ARCH
) -> tuple[float, list[tuple[str, np.ndarray, np.ndarray]]]:
    """``adapter.lora.alpha`` and ``(base tensor name, A, B)`` per target, or an error saying why the
    adapter is no llama.cpp LoRA (and what can be done instead)."""
    state = known(model, name)
    config = state.configs[name]
    check_lora(name, config, name in state.merged)
    hosts = {id(module): path for path, module in st.base_modules(model)}
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    pairs = []
    for host, module in st.adapter_modules(model, name):
        path = hosts[id(host)]
        if module.residual if type(module) is LoRA else False:
            raise AdapterError(
                f"adapter {name!r} is a PiSSA / OLoRA LoRA: its update B A - B0 A0 has rank 2r, which llama.cpp's "
                "one alpha per file cannot scale; --merged writes the model with it merged"
            )
        if type(module) is not LoRA or not isinstance(host, nn.Linear) or path == "lm_head":
            raise AdapterError(
                f"adapter {name!r} has a LoRA on {path} ({type(host).__name__}): llama.cpp adapters cover the "
                "Linear layers of the blocks only; --merged writes the model with it merged"
            )
        b = rope_rows(path, module.lora_B.detach().float(), model.config)
        pairs.append((gguf_name(names, f"{path}.weight"), module.lora_A.detach().float().numpy(), b.numpy()))
    # llama.cpp's one alpha per file, divided by each pair's rank: alpha / r for LoRA, alpha / sqrt(r) for rsLoRA
    return config.scaling * config.r, pairs


def check_lora(name: str, config: Any, merged: bool) -> None:
    """Refuse what a llama.cpp LoRA adapter cannot hold exactly, naming the reason and the way out."""
    method = getattr(config, "method", "?")
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into the weights; unmerge_adapter it before exporting it")
    if method != "lora":
        raise AdapterError(
            f"adapter {name!r} is {method}, not a low-rank update B A: llama.cpp loads LoRA adapters only. "
            "--merged writes the whole model with it merged (LoRA, DoRA and IA3 can be merged)"
        )
    if config.use_dora:
        raise AdapterError(
            f"adapter {name!r} is DoRA: it rescales each output row by m / ||W + s B A||, which a llama.cpp LoRA "
            "adapter cannot express; --merged writes the whole model with it merged"
        )
    if config.use_gating:
        raise AdapterError(f"adapter {name!r} is a gated LoRA: its update depends on the input; neither llama.cpp "
                           "nor a merge can express it")  # fmt: skip
    if config.scaling == 0:
        raise AdapterError(f"adapter {name!r} has alpha 0 (it changes nothing); llama.cpp reads alpha 0 as 'unscaled'")


def vocabulary(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The tokenizer saved in ``folder`` as llama.cpp's BPE vocabulary (convert_hf_to_gguf's ``_set_vocab_gpt2``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ArchitectureError(
            f"this model's tokenizer is not one adapterkit writes to GGUF (pre-tokenizer hash {digest[:12]}...; "
            f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); use --to onnx or --to merged"
        )
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[digest])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    # what the tokenizer itself does (llama.cpp's BPE default is to add a BOS): SmolLM2's adds none
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": ids[:1] == [tokenizer.bos_token_id],
        "eos": ids[-1:] == [tokenizer.eos_token_id],
    }
    special.add_to_gguf(writer, quiet=True)


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's types: added special tokens CONTROL, other added USER_DEFINED."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def export_gguf(model_dir: str, adapter: str | None, out: str | Path, kind: str = "f16", merged: bool = False) -> Path:
    """``adapterkit export --to gguf``: write ``model.<kind>.gguf`` (the base) and ``<adapter>.lora.<kind>.gguf``
    into folder ``out``, or with ``merged`` one ``<adapter>.merged.<kind>.gguf`` of the model with the adapter
    merged. Nothing is written when the model or the adapter cannot be expressed."""
    from transformers import AutoConfig

    from adapterkit.core.pretrained import from_pretrained
    from adapterkit.export import load, output
    from adapterkit.export import merged as merging

    if kind not in FILE_TYPES:
        raise AdapterError(f"--type {kind!r}: choose {', '.join(FILE_TYPES)}")
    if merged and not adapter:
        raise AdapterError("--merged merges an adapter into the model: pass --adapter")
    architecture(from_pretrained(AutoConfig, model_dir))  # refused before any weight is read
    output.earlier_files(Path(out))
    model, tokenizer, name = load.load(model_dir, adapter)
    if name and not merged:
        check_lora(name, known(model, name).configs[name], False)

    if tokenizer is None:
        raise AdapterError(f"{model_dir} has no tokenizer: a GGUF model carries its vocabulary")

    def fill(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as vocab:  # SpecialVocab reads the tokenizer's files
            tokenizer.save_pretrained(vocab)
            if merged:
                with merging.merged(model, name):
                    write_base(model, Path(vocab), tmp / f"{name}.merged.{kind}.gguf", kind)
            else:
                write_base(model, Path(vocab), tmp / f"model.{kind}.gguf", kind)
                if name:
                    write_lora(model, name, tmp / f"{name}.lora.{kind}.gguf", kind)
        return {"target": "gguf", "type": kind, "merged": merged, "base_model": model_dir, "adapter": name}

    return output.write_export(out, fill)
