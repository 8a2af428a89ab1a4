"""Exporting a ScaleNet body for every input size: torch.export with dynamic height and width,
and ONNX with dynamic axes.

The body's shape-dependent steps (the -inf padding of short dimensions, nearest or bilinear
resizing) are operators of their own under torch.export (scalenet.py), and scripted parts
under the tracing ONNX exporter, so neither freezes the choices made for the example input.
(Tracing, as detectron2's export_model.py does, needs nothing from here.)
"""

import io
from typing import Sequence

import torch
import torch.fx.experimental._config as symbolic_shapes_config
from torch.export import Dim, ExportedProgram

from .atomic import bytes_writer, write_atomically

__all__ = ["export_body", "export_body_onnx", "MAX_SIDE"]

MAX_SIDE = 8192  # the largest height or width an exported body accepts


def export_body(body: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export of a backbone body (images (N, C, H, W) -> dict of feature maps), with N, H
    and W dynamic: H and W from 1 to MAX_SIDE.

    Size-oblivious reasoning: the export otherwise specialises every feature-map size that
    could be 1 (a 7x-pooled map of a small image is 1x1), which no value of 1 changes here.
    """
    dims = {
        0: Dim("batch", min=1, max=1024),
        2: Dim("height", min=1, max=MAX_SIDE),
        3: Dim("width", min=1, max=MAX_SIDE),
    }
    with symbolic_shapes_config.patch(backed_size_oblivious=True):
        return torch.export.export(body.eval(), (example,), dynamic_shapes=(dims,))


def export_body_onnx(body: torch.nn.Module, path: str, example: torch.Tensor, opset: int = 17) -> Sequence[str]:
    """Writes `body` (eval mode) as ONNX to `path` (atomically), with the batch, height and width
    of input "images" dynamic; returns the output names (the body's output features, in order).

    The tracing exporter records the shapes of the example's intermediate maps; they hold only
    for the example's size, so they are dropped (onnxruntime infers them at each run).
    """
    import onnx  # an optional dependency: pip install onnx onnxruntime

    body = body.eval()
    names = list(body.output_shape())
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            body,
            (example,),
            buffer,
            dynamo=False,  # the tracing exporter: the scripted shape logic becomes ONNX If nodes
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
        )
    model = onnx.load_from_string(buffer.getvalue())
    _drop_example_shapes(model.graph)
    onnx.checker.check_model(model)
    write_atomically({path: bytes_writer(model.SerializeToString())})
    return names


def _drop_example_shapes(graph) -> None:
    import onnx

    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:  # the branches of an If
                _drop_example_shapes(attribute.g)
                for output in attribute.g.output:
                    output.type.tensor_type.ClearField("shape")
