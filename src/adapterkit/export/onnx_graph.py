"""What every ONNX export shares: which models it takes, tracing into one file, int8, the manifest, sessions.

Split from :mod:`adapterkit.export.onnx` (the classifier and the entry point) and used by it and by
:mod:`adapterkit.export.onnx_lm` (causal LMs).
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core import composition as co
from adapterkit.core.quantize import is_quantized
from adapterkit.errors import AdapterError
from adapterkit.export import output

GRAPH = "model.onnx"
OPSET = 18
QUANTIZE = ("int8",)
EXTERNAL_BYTES = 1_500_000_000  # protobuf's limit is 2 GB: larger graphs keep their weights in model.onnx.data
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")  # sequence classifiers
DECODERS = ("llama", "mistral", "qwen2")  # causal LMs with transformers' DynamicCache
PER_REQUEST = (co.PerRow, co.BatchSplit, co.Parallel)  # setups that assign rows at call time


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise AdapterError(f"quantize={quantize!r}: ONNX export quantizes to {', '.join(QUANTIZE)} (or None: fp32)")


def check_model(model: nn.Module, task: str) -> None:
    """Refuse what the graph cannot express: another kind of model, quantized weights, per-request setups."""
    found = task_of(model)
    if found != task:
        raise AdapterError(f"{type(model).__name__} is a {found} model, not a {task} one: use the matching export")
    if any(is_quantized(m) for m in model.modules()):
        raise AdapterError(
            "the model's weights are torchao-quantized; ONNX export traces a full-precision model: load the base "
            "in fp32 and pass quantize='int8' (onnxruntime's int8)"
        )
    state = model.__dict__.get("_adapterkit_state")
    setup = state.current() if state else co.Stack()
    rows = [b for b in co.walk(setup) if isinstance(b, PER_REQUEST)]
    if rows:
        raise AdapterError(
            f"the active setup {setup!r} assigns adapters to rows per call ({type(rows[0]).__name__}), which one "
            "traced graph cannot take as an input: export each adapter (or a Stack) as its own graph"
        )


def task_of(model: nn.Module) -> str:
    """``"sequence-classification"`` or ``"causal-lm"``; any other model raises :class:`AdapterError`."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    kind, name = getattr(getattr(model, "config", None), "model_type", None), type(model).__name__
    if kind in ENCODERS and MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(kind) == name:
        return "sequence-classification"
    if kind in DECODERS and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind) == name:
        return "causal-lm"
    raise AdapterError(
        f"ONNX export covers sequence classifiers of {', '.join(ENCODERS)} and causal LMs of {', '.join(DECODERS)}; "
        f"{name} (model_type {kind!r}) is neither: load the base with AutoModelForSequenceClassification or "
        "AutoModelForCausalLM, or use --to merged"
    )


def write_graph(
    module: nn.Module,
    args: tuple,
    inputs: Sequence[str],
    outputs: Sequence[str],
    shapes: dict[str, list[int | str]],
    folder: Path,
    opset: int,
    dynamo: bool,
    quantize: str | None,
) -> None:
    """Trace ``module`` on ``args`` into ``folder / model.onnx`` (fp32, or int8 weights)."""
    raw = folder / ".trace"
    raw.mkdir()
    with export_mode(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shapes read as ints: the tests run other shapes
        torch.onnx.export(
            module,
            args,
            str(raw / GRAPH),
            input_names=list(inputs),
            output_names=list(outputs),
            opset_version=opset,
            dynamo=dynamo,
            **dynamic_options(module, shapes, inputs, dynamo),
        )
    fp32 = folder / ".fp32" if quantize else folder
    fp32.mkdir(exist_ok=True)
    one_file(raw, fp32)
    if quantize:
        quantize_int8(fp32 / GRAPH, folder / GRAPH)
        shutil.rmtree(fp32)
    shutil.rmtree(raw)


@contextlib.contextmanager
def export_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients while tracing; each submodule's mode restored after (the exporter resets
    them all to the top module's)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def one_file(raw: Path, folder: Path) -> None:
    """The exporter's graph saved as ``model.onnx``, its weights inside it or, past 1.5 GB, in one data file."""
    import onnx

    proto = onnx.load(str(raw / GRAPH))  # with the external tensors the exporter wrote for a large graph
    large = sum(f.stat().st_size for f in raw.iterdir()) > EXTERNAL_BYTES
    location = GRAPH + ".data"
    onnx.save_model(proto, str(folder / GRAPH), save_as_external_data=large, location=location)


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights (per output channel) of the linear layers, activations
    quantized at run time; the embedding tables (Gather) int8 too, a quarter of their size. On MiniLM per-channel
    scales halved the logit error of per-tensor ones and ran faster."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = sum(f.stat().st_size for f in source.parent.iterdir()) > EXTERNAL_BYTES
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        use_external_data_format=large,
    )


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def dynamic_axes(shapes: dict[str, list[int | str]]) -> dict[str, dict[int, str]]:
    """The exporter's ``dynamic_axes``: the named (str) dimensions of each input's and output's shape."""
    return {name: {i: d for i, d in enumerate(dims) if isinstance(d, str)} for name, dims in shapes.items()}


def dynamic_options(module: nn.Module, shapes: dict, inputs: Sequence[str], dynamo: bool) -> dict[str, Any]:
    """TorchScript's ``dynamic_axes`` (names per input and output), or torch.export's ``dynamic_shapes``, shaped
    as ``module.forward``'s arguments (its ``*tensors`` one tuple); torch.export works out how dimensions relate."""
    axes = dynamic_axes(shapes)
    if not dynamo:
        return {"dynamic_axes": axes}
    dims = [{i: torch.export.Dim.DYNAMIC for i in axes[name]} for name in inputs]
    named = [p for p in inspect.signature(module.forward).parameters.values() if p.kind != p.VAR_POSITIONAL]
    return {"dynamic_shapes": (*dims[: len(named)], tuple(dims[len(named) :]))}


def describe(shapes: dict[str, list[int | str]], inputs: Sequence[str], dtypes: dict[str, str]) -> dict[str, Any]:
    """The graph's inputs and outputs for the manifest: name, element type and shape (names: dynamic axes)."""

    def entry(name: str) -> dict[str, Any]:
        return {"name": name, "dtype": dtypes.get(name, "float32"), "shape": shapes[name]}

    return {
        "inputs": [entry(n) for n in shapes if n in inputs],
        "outputs": [entry(n) for n in shapes if n not in inputs],
    }


def header(model: nn.Module, task: str, quantize: str | None, opset: int, dynamo: bool, info: dict | None) -> dict:
    """What the manifest says of every ONNX export."""
    state = model.__dict__.get("_adapterkit_state")
    setup = state.current() if state else co.Stack()
    return {
        "target": "onnx",
        "task": task,
        "graph": GRAPH,
        "model_type": model.config.model_type,
        "quantize": quantize,
        "opset": opset,
        "exporter": "dynamo" if dynamo else "torchscript",
        "active_setup": repr(setup),
        "methods": {n: state.configs[n].method for n in setup.names()} if state else {},
        **(info or {}),
    }


def session(folder: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime session (CPU) on an exported folder's graph; ``threads``: intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(Path(folder) / GRAPH), options, providers=["CPUExecutionProvider"])


def manifest(folder: str | Path) -> dict[str, Any]:
    """An exported folder's ``export.json``."""
    import json

    return json.loads((Path(folder) / output.MANIFEST).read_text())
