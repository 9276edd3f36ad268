"""Masking fused into the model: the graph takes coalitions instead of images.

:func:`fuse_masking` rewrites a model whose input is an image X into one whose inputs are

    shapfleet_coalitions  bool   M x B      which superpixels are kept (one column per coalition)
    shapfleet_segments    int64  H*W        each pixel's superpixel (row-major)
    shapfleet_mask_shape  int64  3 or 4     [-1, 1, H, W] (NCHW), [-1, H, W, 1] (NHWC), [-1, H, W] (NHW)
    shapfleet_image       T      1 x ...    the normalised image, in the model's layout and dtype
    shapfleet_background  T      1 x ...    the normalised background, likewise

and computes, in front of the original graph, with
keep = Reshape(Transpose(Gather(coalitions, segments, axis=0))),

    X = Cast(keep) * image + Cast(Not(keep)) * background

For finite values this selects exactly: 1 * a = a, 0 * b = +-0 and a + +-0 = a, so X equals the
composite the numpy path builds and normalises, value for value (tests check that answers are
identical); :func:`selection_is_exact` guards the finite case. It is written with ``Mul`` and
``Add`` rather than ``Where(keep, image, background)``, which selects too but is several times
slower in onnxruntime's CPU kernels, and Z comes transposed because onnxruntime's CPU ``Gather``
copies whole rows along axis 0 but single elements along axis 1 (the README's Performance section
gives the measurements). The image
and background are inputs, not initializers, so one fused session serves every image and job of a
model; :class:`CoalitionPredictor` binds them once on the session's device, so per batch only Z
crosses into onnxruntime.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from shapfleet.errors import ModelOutputError, ShapfleetError

from .bounds import run_bounded
from .inspection import ModelInfo
from .onnx_wire import (
    ELEMENT_BOOL,
    ELEMENT_INT64,
    dimension,
    dimensions,
    node,
    prepend_to_graph,
    read_model,
    tensor_input,
)
from .sessions import ConcurrentRuns, Finished, PendingRuns, session_device, submit_runs

PREFIX = "shapfleet_"
MIN_OPSET = 7  # Mul and Add with numpy-style broadcasting


def fuse_masking(model_bytes: bytes, info: ModelInfo) -> bytes | None:
    """The fused model's bytes, or None when the model's opset predates broadcasting ``Mul``/``Add``.

    The rewrite is done on the protobuf bytes (:mod:`.onnx_wire`): the masking nodes and the five
    inputs go in front of the graph's own, the image input is removed, and every other byte of the
    model (weights included) is copied as it is."""
    model = read_model(model_bytes)
    if model.opset < MIN_OPSET:
        return None
    original = next(i for i in model.inputs if i.name == info.input_name)
    element = original.elem_type
    image_dims = [dimension(1), *dimensions(original)[1:]]
    inputs = [
        tensor_input(f"{PREFIX}coalitions", ELEMENT_BOOL, [dimension("players"), dimension("batch")]),
        tensor_input(f"{PREFIX}segments", ELEMENT_INT64, [dimension("pixels")]),
        tensor_input(f"{PREFIX}mask_shape", ELEMENT_INT64, [dimension(len(image_dims))]),
        tensor_input(f"{PREFIX}image", element, image_dims),
        tensor_input(f"{PREFIX}background", element, image_dims),
    ]
    nodes = [
        node("Gather", [f"{PREFIX}coalitions", f"{PREFIX}segments"], [f"{PREFIX}pixel_mask_t"], axis=0),
        node("Transpose", [f"{PREFIX}pixel_mask_t"], [f"{PREFIX}pixel_mask"], perm=[1, 0]),
        node("Reshape", [f"{PREFIX}pixel_mask", f"{PREFIX}mask_shape"], [f"{PREFIX}keep"]),
        node("Not", [f"{PREFIX}keep"], [f"{PREFIX}drop"]),
        node("Cast", [f"{PREFIX}keep"], [f"{PREFIX}keep_weight"], to=element),
        node("Cast", [f"{PREFIX}drop"], [f"{PREFIX}drop_weight"], to=element),
        node("Mul", [f"{PREFIX}keep_weight", f"{PREFIX}image"], [f"{PREFIX}kept_pixels"]),
        node("Mul", [f"{PREFIX}drop_weight", f"{PREFIX}background"], [f"{PREFIX}background_pixels"]),
        node("Add", [f"{PREFIX}kept_pixels", f"{PREFIX}background_pixels"], [info.input_name]),
    ]
    return prepend_to_graph(model_bytes, nodes, inputs, drop_input=info.input_name)


def selection_is_exact(image: np.ndarray, background: np.ndarray) -> bool:
    """Whether the fused graph's arithmetic selection reproduces the numpy composite exactly: true
    when the normalised image and background are finite (0 * inf would be NaN)."""
    return bool(np.isfinite(image).all() and np.isfinite(background).all())


class CoalitionPredictor:
    """``predict_coalitions(Z) -> B x K`` outputs for one image, background and label map.

    The label map, image and background are bound once, as onnxruntime values on the session's
    device, and every batch binds only Z (as M x B booleans) from host memory: on a GPU nothing else
    crosses the bus per batch. ``mask_shape`` stays in host memory because onnxruntime reads a
    ``Reshape``'s shape there whatever the device. Batches are run at ``fixed_batch`` rows when it
    is set (see :attr:`OnnxClassifier.fixed_batch`), at most ``run_rows`` at a time when that is
    (see :meth:`OnnxClassifier.run_rows`), and side by side on ``runs`` when it is given."""

    def __init__(self, session, info: ModelInfo, image: np.ndarray, background: np.ndarray, segments: np.ndarray,
                 transform: Callable[[np.ndarray], np.ndarray], fixed_batch: int | None = None,
                 run_rows: int | None = None, runs: ConcurrentRuns | None = None) -> None:
        import onnxruntime as ort

        self.session = session
        self.info = info
        self.transform = transform
        self.fixed_batch = fixed_batch
        self.run_rows = run_rows
        self.runs = runs
        height, width = segments.shape
        shape = {"nchw": [-1, 1, height, width], "nhwc": [-1, height, width, 1], "nhw": [-1, height, width]}[info.layout]
        self.mask_shape = np.asarray(shape, dtype=np.int64)
        device, device_id = session_device(session)
        # OrtValue.ortvalue_from_numpy on the CPU wraps the array without copying: keep them alive.
        self._host_arrays = {
            f"{PREFIX}segments": np.ascontiguousarray(segments.reshape(-1), dtype=np.int64),
            f"{PREFIX}image": np.ascontiguousarray(image),
            f"{PREFIX}background": np.ascontiguousarray(background),
        }
        self.bound_inputs = {name: ort.OrtValue.ortvalue_from_numpy(array, device, device_id)
                             for name, array in self._host_arrays.items()}

    def _run(self, coalitions: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input(f"{PREFIX}coalitions", np.ascontiguousarray(coalitions.T))
        binding.bind_cpu_input(f"{PREFIX}mask_shape", self.mask_shape)
        for name, value in self.bound_inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.info.output_name, "cpu")
        try:
            run_bounded(lambda options: self.session.run_with_iobinding(binding, options),
                        f"a batch of {len(coalitions)}")
        except ShapfleetError:
            raise
        except Exception as e:  # onnxruntime's own error types; out of GPU memory, for one
            raise ModelOutputError(f"the model failed on a batch of {len(coalitions)}: {e}") from e
        return binding.copy_outputs_to_cpu()[0]

    def submit(self, coalitions: np.ndarray) -> PendingRuns | Finished:
        """Start the runs for ``coalitions`` (side by side on ``runs``, behind those submitted before)
        and return them pending; their ``result()`` is what calling this predictor returns."""
        coalitions = np.ascontiguousarray(coalitions, dtype=bool)
        return submit_runs(self._run, coalitions, self.fixed_batch, self.run_rows, self.runs,
                           lambda out: self.transform(out.astype(np.float64)))

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        return self.submit(coalitions).result()
