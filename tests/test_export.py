"""Exported ScaleNets give the eager result at input sizes other than the example's: torch.export
with dynamic height and width, ONNX with dynamic axes (onnxruntime), and traced detectors."""

import pytest
import torch
from conftest import damp_norms
from detectron2.modeling import build_model

from scalenet_d2 import ScaleNet
from scalenet_d2.modeling.export import export_body, export_body_onnx

# Tracing a whole detector meets detectron2's and torchvision's shape checks, which the trace keeps
# as constants (what the tests below check is that the result holds at other sizes); the legacy
# ONNX exporter that export_body_onnx uses is deprecated.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore::torch.jit.TracerWarning:(detectron2|torchvision|torch)(\.|$)"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning:torch.onnx"),
]

EXAMPLE = (256, 320)
# other sizes: larger, not multiples of 32, tiny (maps of 1 pixel, -inf padding), very wide and tall
SIZES = [(256, 352), (288, 384), (96, 1000), (1000, 17), (33, 47), (5, 7), (1, 1)]
STAGES = ["res2", "res3", "res4", "res5"]


def images(height, width, batch=1, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def relative_error(ours, expected):
    return ((ours - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def body():
    torch.manual_seed(0)
    return ScaleNet("scalenet_tiny").eval()


def test_torch_export_with_dynamic_height_and_width(body):
    program = export_body(body, images(*EXAMPLE))
    exported = program.module()
    for size in SIZES + [(64, 64)]:
        for batch in (1, 2):
            x = images(*size, batch=batch)
            with torch.no_grad():
                expected, ours = body(x), exported(x)
            for stage in STAGES:
                assert ours[stage].shape == expected[stage].shape
                assert relative_error(ours[stage], expected[stage]) <= 1e-4, f"{stage} at {size}, batch {batch}"
    # the shape-dependent steps are operators of the program, not constants of the example
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"scalenet_d2.max_pool_clamped.default", "scalenet_d2.pooled_branch.default"} <= targets


def test_torch_export_of_a_published_allocation(tmp_path):
    torch.manual_seed(0)
    body = ScaleNet("scalenet50_light", out_features=["res4", "res5"]).eval()
    program = export_body(body, images(224, 224))
    path = tmp_path / "scalenet50_light.pt2"
    torch.export.save(program, str(path))
    exported = torch.export.load(str(path)).module()  # as a user loads it back
    for size in [(320, 480), (200, 96)]:
        x = images(*size)
        with torch.no_grad():
            expected, ours = body(x), exported(x)
        for stage in ("res4", "res5"):
            assert relative_error(ours[stage], expected[stage]) <= 1e-4, f"{stage} at {size}"


def test_onnx_with_dynamic_axes_matches_eager(body, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extras: pip install -e .[dev]")
    path = tmp_path / "body.onnx"
    names = export_body_onnx(body, str(path), images(*EXAMPLE))
    assert names == STAGES
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in SIZES:
        for batch in (1, 2):
            x = images(*size, batch=batch)
            with torch.no_grad():
                expected = body(x)
            ours = dict(zip(names, session.run(None, {"images": x.numpy()})))
            for stage in STAGES:
                assert relative_error(torch.from_numpy(ours[stage]), expected[stage]) <= 1e-4, f"{stage} at {size}"


class Detections(torch.nn.Module):
    """A detector's inference on one image as a tuple of tensors, which torch.jit.trace takes
    (what detectron2's TracingAdapter does; its module does not import on detectron2 v0.6)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        instances = self.model.inference([{"image": image}], do_postprocess=False)[0]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def detector(detector_cfg, backbone):
    cfg = detector_cfg("fpn")
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.SCALENET.NORM = cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.SCALENET.OUT_FEATURES
    torch.manual_seed(0)
    model = damp_norms(build_model(cfg).eval())
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    return model


def uint8_image(height, width, seed=0):
    return torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(seed)).float()


# five sizes other than the traced one (detectron2's traced detectors, ResNet's too, keep the
# proposal count of the example, so sizes with fewer proposals than that are left out)
DETECTOR_SIZES = [(256, 352), (288, 384), (96, 1000), (480, 640), (64, 64)]


@pytest.mark.parametrize("backbone", ["build_scalenet_fpn_backbone", "build_resnet_twin_fpn_backbone"])
def test_a_traced_detector_is_exact_at_other_sizes(detector_cfg, backbone):
    model = Detections(detector(detector_cfg, backbone))
    with torch.no_grad():
        traced = torch.jit.trace(model, uint8_image(*EXAMPLE), check_trace=False)
        for size in DETECTOR_SIZES:
            image = uint8_image(*size)
            expected, ours = model(image), traced(image)
            assert len(expected[0]) > 0, size
            for e, o in zip(expected, ours):
                assert o.shape == e.shape, size
                torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-3, msg=f"at {size}")


def test_detectron2_tracing_adapter(detector_cfg):
    try:
        from detectron2.export import TracingAdapter
    except ImportError as e:  # v0.6's detectron2.export needs caffe2
        pytest.skip(f"detectron2.export does not import here ({e})")
    model = detector(detector_cfg, "build_scalenet_fpn_backbone")
    adapter = TracingAdapter(
        model, [{"image": uint8_image(*EXAMPLE)}], lambda m, inputs: m.inference(inputs, do_postprocess=False)
    )
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        for size in DETECTOR_SIZES:
            image = uint8_image(*size)
            expected = model.inference([{"image": image}], do_postprocess=False)[0]
            ours = adapter.outputs_schema(traced(image))[0]
            torch.testing.assert_close(ours.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(ours.scores, expected.scores, rtol=1e-4, atol=1e-3)
