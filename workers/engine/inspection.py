"""Model inspection: what an ONNX model is, read from its structure without running it.

Models are checked before any session is created: they must parse, have exactly one image-shaped
float input, and hold no external-data references (a model is self-contained bytes; a reference
such as ``../../etc/passwd`` is refused, not resolved).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shapfleet.errors import ModelError

from .onnx_wire import ELEMENT_TYPE_NAMES, WireError, read_model, uses_external_data

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
_ONNX_FLOAT_ELEM = {1: "tensor(float)", 11: "tensor(double)", 10: "tensor(float16)"}


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model's single image input and its output."""

    sha256: str
    input_name: str
    input_type: str
    layout: str  # "nchw", "nhwc" or "nhw"
    channels: int
    height: int | None  # None: any size
    width: int | None
    batch: int | None  # None: any batch size
    output_name: str
    n_classes: int | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def read_model_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModelError(f"cannot read the model file {path}: {e.strerror or e}") from e


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def inspect_model(model_bytes: bytes, layout: str = "auto") -> ModelInfo:
    """Validate a model's bytes and describe its image input. Raises :class:`ModelError`.

    The bytes are read at the protobuf wire level (:mod:`.onnx_wire`), as onnxruntime's parser
    reads them, without importing ``onnx``."""
    try:
        model = read_model(model_bytes)
        external = uses_external_data(model_bytes)
    except WireError as e:
        raise ModelError(f"the file is not an ONNX model (malformed protobuf: {e})") from e
    if not model.has_nodes and not model.outputs:
        raise ModelError("the file is not an ONNX model (it has no graph)")
    if external:
        raise ModelError("the model references external data files; upload a self-contained model "
                         "(onnx.save_model(..., save_as_external_data=False))")
    inputs = model.inputs
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
                         "shapfleet explains models with exactly one image input")
    if not model.outputs:
        raise ModelError("the model has no outputs")
    input_type = _ONNX_FLOAT_ELEM.get(inputs[0].elem_type)
    if input_type is None:
        elem_type = inputs[0].elem_type
        name = ELEMENT_TYPE_NAMES.get(elem_type, f"element type {elem_type}") if elem_type else "non-tensor"
        raise ModelError(f"the model's input {inputs[0].name!r} is {name}; image inputs must be float, double or float16")
    dims = [_dim(d) for d in inputs[0].dims]
    info = _image_layout(inputs[0].name, dims, layout)
    output = model.outputs[0]
    out_dims = [_dim(d) for d in output.dims]
    n_classes = out_dims[1] if len(out_dims) >= 2 else None
    return ModelInfo(hashlib.sha256(model_bytes).hexdigest(), inputs[0].name, input_type, *info,
                     output_name=output.name, n_classes=n_classes)


def _image_layout(name: str, dims: Sequence[int | None], forced: str) -> tuple:
    """(layout, channels, height, width, batch) from the input shape; ``forced`` overrides detection."""
    shape_text = "x".join("?" if d is None else str(d) for d in dims)
    if len(dims) == 3:
        return "nhw", 1, dims[1], dims[2], dims[0]
    if len(dims) != 4:
        raise ModelError(f"the model's input {name!r} has shape [{shape_text}]; an image input is "
                         "N x C x H x W, N x H x W x C or N x H x W")
    first, last = dims[1], dims[3]
    layout = forced
    if layout == "auto":
        first_ok, last_ok = first in (1, 3), last in (1, 3)
        if first_ok and not last_ok:
            layout = "nchw"
        elif last_ok and not first_ok:
            layout = "nhwc"
        else:
            raise ModelError(f"cannot tell whether the input [{shape_text}] is NCHW or NHWC; pass --layout nchw or --layout nhwc")
    if layout == "nchw":
        channels, height, width = first, dims[2], dims[3]
    else:
        channels, height, width = last, dims[1], dims[2]
    if channels not in (1, 3):
        raise ModelError(f"the model's input [{shape_text}] read as {layout.upper()} has {channels} channels; "
                         "shapfleet explains 1- or 3-channel images")
    return layout, channels, height, width, dims[0]


#: Bytes per element of the ONNX tensor types a model may compute with (others count as 8).
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def check_tensor_sizes(model_bytes: bytes, max_bytes: int) -> None:
    """Refuse a model any of whose tensors is statically larger than ``max_bytes``, or all of whose
    statically sized tensors together exceed twice that: every initializer,
    and every intermediate tensor whose shape ONNX shape inference (with data propagation, so
    ``Tile``/``Expand``/``ConstantOfShape`` of constant shapes are known) pins down. Nothing of the
    model runs; a few hundred bytes whose constants would expand to gigabytes are caught here."""
    import onnx

    try:
        model = onnx.load_model_from_string(model_bytes)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True, strict_mode=False)
    except Exception as e:  # onnx raises its own InferenceError/ValidationError types
        raise ModelError(f"the model's shapes cannot be inferred: {e}") from e
    sized = [(t.name, list(t.dims), t.data_type) for t in inferred.graph.initializer]
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.HasField("shape") and all(d is not None for d in dims):
            sized.append((value.name, dims, tensor.elem_type))
    total = 0
    for name, dims, elem_type in sized:
        size = _ELEMENT_BYTES.get(elem_type, 8)
        for d in dims:
            size *= max(int(d), 0)
        if size > max_bytes:
            raise ModelError(f"the model's tensor {name!r} is {'x'.join(str(d) for d in dims)} ({size} bytes); "
                             f"the limit is {max_bytes} bytes per tensor")
        total += size
    if total > 2 * max_bytes:
        raise ModelError(f"the model's tensors of known size hold {total} bytes together; the limit is "
                         f"{2 * max_bytes} bytes")
