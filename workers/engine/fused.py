"""Masking fused into the model: the graph takes coalitions instead of images.

:func:`fuse_masking` rewrites a model whose input is an image X into one whose inputs are

    shapfleet_coalitions  bool   B x M      which superpixels are kept
    shapfleet_segments    int64  H*W        each pixel's superpixel (row-major)
    shapfleet_mask_shape  int64  3 or 4     [-1, 1, H, W] (NCHW), [-1, H, W, 1] (NHWC), [-1, H, W] (NHW)
    shapfleet_image       T      1 x ...    the normalised image, in the model's layout and dtype
    shapfleet_background  T      1 x ...    the normalised background, likewise

and computes X = Where(Reshape(Gather(coalitions, segments, axis=1)), image, background) in front of
the original graph. ``Where`` selects values, it does no arithmetic, so X is bit-identical to the
composite the numpy path builds and normalises (tests check that answers are identical). Only Z and
the two small constant images cross into onnxruntime per batch; the image and background are inputs,
not initializers, so one fused session serves every image and job of a model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .model import ModelInfo, run_in_fixed_batches

PREFIX = "shapfleet_"
MIN_OPSET = 9  # Where


def fuse_masking(model_bytes: bytes, info: ModelInfo) -> bytes | None:
    """The fused model's bytes, or None when the model's opset predates ``Where``."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_model_from_string(model_bytes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        return None
    graph = model.graph
    original = next(i for i in graph.input if i.name == info.input_name)
    element = original.type.tensor_type.elem_type
    image_shape = [1] + [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                         for d in original.type.tensor_type.shape.dim][1:]
    inputs = [
        helper.make_tensor_value_info(f"{PREFIX}coalitions", TensorProto.BOOL, ["batch", "players"]),
        helper.make_tensor_value_info(f"{PREFIX}segments", TensorProto.INT64, ["pixels"]),
        helper.make_tensor_value_info(f"{PREFIX}mask_shape", TensorProto.INT64, [len(image_shape)]),
        helper.make_tensor_value_info(f"{PREFIX}image", element, image_shape),
        helper.make_tensor_value_info(f"{PREFIX}background", element, image_shape),
    ]
    nodes = [
        helper.make_node("Gather", [f"{PREFIX}coalitions", f"{PREFIX}segments"], [f"{PREFIX}pixel_mask"], axis=1),
        helper.make_node("Reshape", [f"{PREFIX}pixel_mask", f"{PREFIX}mask_shape"], [f"{PREFIX}mask"]),
        helper.make_node("Where", [f"{PREFIX}mask", f"{PREFIX}image", f"{PREFIX}background"], [info.input_name]),
    ]
    kept = [i for i in graph.input if i.name != info.input_name]
    del graph.input[:]
    graph.input.extend(inputs + kept)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return model.SerializeToString()


class CoalitionPredictor:
    """``predict_coalitions(Z) -> B x K`` outputs for one image, background and label map."""

    def __init__(self, session, info: ModelInfo, image: np.ndarray, background: np.ndarray, segments: np.ndarray,
                 transform: Callable[[np.ndarray], np.ndarray]) -> None:
        self.session = session
        self.info = info
        self.transform = transform
        height, width = segments.shape
        shape = {"nchw": [-1, 1, height, width], "nhwc": [-1, height, width, 1], "nhw": [-1, height, width]}[info.layout]
        self.constant_inputs = {
            f"{PREFIX}segments": np.ascontiguousarray(segments.reshape(-1), dtype=np.int64),
            f"{PREFIX}mask_shape": np.asarray(shape, dtype=np.int64),
            f"{PREFIX}image": image,
            f"{PREFIX}background": background,
        }

    def _run(self, coalitions: np.ndarray) -> np.ndarray:
        feed = {f"{PREFIX}coalitions": coalitions, **self.constant_inputs}
        (out,) = self.session.run([self.info.output_name], feed)
        return np.asarray(out)

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        coalitions = np.ascontiguousarray(coalitions, dtype=bool)
        out = run_in_fixed_batches(self._run, coalitions, self.info.batch)
        return self.transform(out.astype(np.float64))
