"""ONNX Runtime export: the model with its adapter's modules in the graph (every method, not only mergeable ones).

``export_onnx(model_dir, adapter, out)`` (``adapterkit export --to onnx``) writes a folder: ``model.onnx`` (with
``model.onnx.data`` beside it past 1.5 GB), the tokenizer's files and ``export.json`` (the export manifest,
which also describes the graph's inputs, outputs and labels). Sequence classifiers of encoders (BERT, MiniLM,
RoBERTa, ...) take the tokenizer's arrays and give ``logits``; causal LMs take ``past_key_values.*`` and give
``present.*`` (:mod:`adapterkit.export.onnx_lm`), so generation is incremental.

The exporter is TorchScript's (``torch.onnx.export(dynamo=False)``). It traces the forward as Python runs it:
adapterkit's forward hooks, the active setup held in a ``ContextVar`` and the relays between hooks are plain
Python that the tracer evaluates, recording only the tensor operations. Both exporters gave every preset to
1e-8 on a tiny BERT; TorchScript took about 1 s a graph, the dynamo exporter (``torch.export``) 12-22 s, which
the test suite's budget cannot afford (``dynamo=True`` picks it). Tracing fixes Python-level decisions at export
time, so the example inputs are chosen to take the general path: a padded row (the attention mask is then
built in the graph, never skipped) and, for causal LMs, a non-empty cache. Tests run every graph at other
batch sizes and lengths than the traced ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.errors import AdapterError
from adapterkit.export import load, output
from adapterkit.export.onnx_graph import (
    GRAPH,
    OPSET,
    check_model,
    check_quantize,
    describe,
    header,
    manifest,
    save_tokenizer,
    session,
    write_graph,
)
from adapterkit.export.onnx_lm import export_causal_lm, generate

__all__ = ["GRAPH", "export_causal_lm", "export_classifier", "export_onnx", "generate", "manifest", "session"]


def export_onnx(
    model_dir: str,
    adapter: str | None,
    out: str,
    quantize: str | None = None,
    *,
    opset: int = OPSET,
    dynamo: bool = False,
) -> Path:
    """Export ``model_dir`` with ``adapter`` (``[NAME=]PATH`` or ``hub:`` reference; None: the base alone) to
    the folder ``out`` for ONNX Runtime; ``quantize="int8"``: int8 weights (onnxruntime's dynamic quantization).

    A sequence classifier when the adapter carries a classification head, else the checkpoint's own kind (a
    causal LM). ``opset``, ``dynamo``: as :func:`export_classifier` takes them. Returns the folder.
    """
    check_quantize(quantize)
    output.earlier_files(Path(out))  # a folder of the user's files is refused before the model loads
    causal = is_causal(model_dir, adapter)
    model, tokenizer, name = load.load(model_dir, adapter, causal=causal)
    info = {"base_model": model_dir, "adapter": name}
    export = export_causal_lm if causal else export_classifier
    return export(model, tokenizer, out, quantize=quantize, opset=opset, dynamo=dynamo, info=info)


def is_causal(model_dir: str, adapter: str | None) -> bool:
    """Whether the checkpoint is a causal LM and the adapter brings no classification head (an LM's own
    ``lm_head``, saved with its adapter, is no classifier)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from adapterkit.core.io import inspect_adapter
    from adapterkit.core.pretrained import from_pretrained

    config = from_pretrained(transformers.AutoConfig, model_dir)
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) not in (config.architectures or []):
        return False
    head = inspect_adapter(load.adapter_source(adapter)[1])["head"] if adapter else {}
    return all(key.startswith("lm_head.") for key in head)


def export_classifier(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    quantize: str | None = None,
    opset: int = OPSET,
    dynamo: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write an encoder sequence classifier, with its active adapters, as an ONNX graph in folder ``out``.

    Inputs: the tokenizer's arrays (``input_ids``, ``attention_mask``, ``token_type_ids`` where the model takes
    them; int64, axes ``batch`` and ``sequence``); output ``logits`` ``(batch, labels)``. ``tokenizer`` (may be
    None) is saved beside the graph. ``dynamo``: torch.export's exporter instead of TorchScript's.
    """
    check_quantize(quantize)
    check_model(model, "sequence-classification")
    names = classifier_inputs(model, tokenizer)
    shapes = {n: ["batch", "sequence"] for n in names} | {"logits": ["batch", model.config.num_labels]}
    graph = ClassifierGraph(model, names)

    def fill(tmp: Path) -> dict[str, Any]:
        write_graph(graph, example_tokens(model, names), names, ["logits"], shapes, tmp, opset, dynamo, quantize)
        save_tokenizer(tokenizer, tmp)
        described = describe(shapes, names, {n: "int64" for n in names})
        labels = {str(i): label for i, label in sorted(model.config.id2label.items())}
        return header(model, "sequence-classification", quantize, opset, dynamo, info) | described | {"labels": labels}

    return output.write_export(out, fill)


class ClassifierGraph(nn.Module):
    """``(input tensors in ``names``' order) -> logits``: the traced function."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True))).logits


def classifier_inputs(model: nn.Module, tokenizer: Any) -> list[str]:
    """The tokenizer's array names that the model's forward takes (so a tokenizer's output feeds the graph)."""
    wanted = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
    taken = inspect.signature(type(model).forward).parameters
    names = [n for n in wanted if n in taken and n in ("input_ids", "attention_mask", "token_type_ids")]
    if "input_ids" not in names:
        raise AdapterError(f"{type(model).__name__} takes no input_ids; ONNX export covers token classifiers")
    return names if "attention_mask" in names else [*names, "attention_mask"]


def example_tokens(model: nn.Module, names: Sequence[str], batch: int = 2, length: int = 8) -> tuple:
    """Trace inputs: the last row padded, so that the graph builds the attention mask rather than skip it."""
    ids = torch.arange(batch * length).view(batch, length) % (model.config.vocab_size - 3) + 3
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[n] for n in names)
