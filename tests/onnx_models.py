"""Small ONNX models built with onnx.helper, whose behaviour the tests know exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, initializers) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _image_input(height: int, width: int, channels: int, layout: str, batch="N", dtype=TensorProto.FLOAT):
    shape = [batch, channels, height, width] if layout == "nchw" else [batch, height, width, channels]
    return helper.make_tensor_value_info("image", dtype, shape)


def linear_model(weights: np.ndarray, bias: np.ndarray, layout: str = "nchw", double: bool = False) -> bytes:
    """f(x) = sum_p W[p, k] x_p + bias_k, with ``weights`` of shape H x W x C x K in pixel order
    (whatever the input layout) so the test can compute Shapley values in closed form. ``double``
    builds it in float64, so that comparisons are not limited by float32 round-off."""
    height, width, channels, classes = weights.shape
    ordered = weights.transpose(2, 0, 1, 3) if layout == "nchw" else weights
    numpy_type, onnx_type = (np.float64, TensorProto.DOUBLE) if double else (np.float32, TensorProto.FLOAT)
    matrix = ordered.reshape(-1, classes).astype(numpy_type)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["scores"]),
    ]
    inits = [numpy_helper.from_array(matrix, "W"), numpy_helper.from_array(bias.astype(numpy_type), "b")]
    return _model(nodes, [_image_input(height, width, channels, layout, dtype=onnx_type)],
                  [helper.make_tensor_value_info("scores", onnx_type, ["N", classes])], inits)


def conv_model(height: int, width: int, channels: int = 3, classes: int = 3, layout: str = "nchw", seed: int = 0,
               double: bool = False, batch="N") -> bytes:
    """Conv(4 filters, 3x3) -> ReLU -> Flatten -> Gemm -> Softmax: a small non-linear classifier
    (weights scaled for inputs of order 1, i.e. ``--preprocess unit``)."""
    rng = np.random.default_rng(seed)
    numpy_type, onnx_type = (np.float64, TensorProto.DOUBLE) if double else (np.float32, TensorProto.FLOAT)
    filters = 4
    kernel = rng.normal(0, 0.5, (filters, channels, 3, 3)).astype(numpy_type)
    conv_bias = rng.normal(0, 0.1, filters).astype(numpy_type)
    dense = rng.normal(0, 3.0 / np.sqrt(filters * height * width), (filters * height * width, classes)).astype(numpy_type)
    dense_bias = rng.normal(0, 0.1, classes).astype(numpy_type)
    nodes = []
    source = "image"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes += [
        helper.make_node("Conv", [source, "K", "kb"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "D", "db"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((kernel, "K"), (conv_bias, "kb"), (dense, "D"), (dense_bias, "db"))]
    return _model(nodes, [_image_input(height, width, channels, layout, batch=batch, dtype=onnx_type)],
                  [helper.make_tensor_value_info("probs", onnx_type, [batch, classes])], inits)


def nan_model(height: int, width: int, channels: int = 3) -> bytes:
    """Returns NaN for every input: log(-1 - |x|) per class."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Abs", ["flat"], ["absval"]),
        helper.make_node("Sub", ["minus_one", "absval"], ["negative"]),
        helper.make_node("Log", ["negative"], ["out"]),
    ]
    inits = [numpy_helper.from_array(np.array([-1.0], np.float32), "minus_one")]
    return _model(nodes, [_image_input(height, width, channels, "nchw")],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", channels])], inits)


def two_input_model(height: int, width: int) -> bytes:
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Flatten", ["s"], ["out"], axis=1)]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3, height, width]) for name in ("a", "b")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", None])], [])


def vector_input_model(features: int = 10) -> bytes:
    """A model whose single input is a feature vector, not an image."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])], [])


def expanding_model(op: str, side: int = 15000) -> bytes:
    """A few hundred bytes whose constants expand to side x side floats if anything folds them: a 1x1
    initializer through ``Tile``, ``Expand``, an outer ``MatMul`` or ``ConstantOfShape``, summed into
    an otherwise ordinary 32x32 classifier's scores."""
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["mm"])]
    inits = [numpy_helper.from_array(np.zeros((3 * 32 * 32, 3), np.float32), "W"),
             numpy_helper.from_array(np.ones((1, 1), np.float32), "small")]
    shape = numpy_helper.from_array(np.array([side, side], np.int64), "shape")
    if op == "tile":
        inits.append(shape)
        nodes.append(helper.make_node("Tile", ["small", "shape"], ["big"]))
    elif op == "expand":
        inits.append(shape)
        nodes.append(helper.make_node("Expand", ["small", "shape"], ["big"]))
    elif op == "matmul":
        inits.append(numpy_helper.from_array(np.array([1, side], np.int64), "shape"))
        nodes += [helper.make_node("Expand", ["small", "shape"], ["row"]),
                  helper.make_node("Transpose", ["row"], ["column"]), helper.make_node("MatMul", ["column", "row"], ["big"])]
    else:
        inits.append(shape)
        nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                      value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])))
    nodes += [helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0), helper.make_node("Add", ["mm", "total"], ["scores"])]
    return _model(nodes, [_image_input(32, 32, 3, "nchw")], [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
                  inits)


def _input_dependent_one(nodes: list, inits: list) -> str:
    """Nodes computing the scalar 1.0 from the image (0 * max|x| + 1): a value that no shape inference
    or constant folding can know, so whatever is sized from it is only known when the model runs."""
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array(1.0, np.float32), "one_f")]
    nodes += [helper.make_node("Abs", ["image"], ["abs_image"]),
              helper.make_node("ReduceMax", ["abs_image"], ["max_abs"], keepdims=0),
              helper.make_node("Mul", ["max_abs", "zero"], ["zeroed"]),
              helper.make_node("Add", ["zeroed", "one_f"], ["input_one"])]
    return "input_one"


def _scores_plus(nodes: list, inits: list, extra: str) -> bytes:
    """An ordinary 32x32 linear classifier (3 classes) whose scores add ``extra`` (a scalar) times 0."""
    rng = np.random.default_rng(5)
    inits += [numpy_helper.from_array(rng.normal(0, 1e-3, (3 * 32 * 32, 3)).astype(np.float32), "W"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero_out")]
    nodes += [helper.make_node("Flatten", ["image"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["mm"]),
              helper.make_node("Mul", [extra, "zero_out"], ["nothing"]), helper.make_node("Add", ["mm", "nothing"], ["scores"])]
    return _model(nodes, [_image_input(32, 32, 3, "nchw")], [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
                  inits)


def runaway_model(iterations: float = 1e12) -> bytes:
    """A 32x32 classifier whose ``Loop`` runs ``iterations`` times, a count computed from its input: it
    passes every static check and runs for days."""
    nodes: list = []
    inits: list = [numpy_helper.from_array(np.array(iterations, np.float32), "iterations"),
                   numpy_helper.from_array(np.array(True), "keep_going"),
                   numpy_helper.from_array(np.ones((1, 16), np.float32), "v0")]
    one = _input_dependent_one(nodes, inits)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["v_in", "eye"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.eye(16, dtype=np.float32), "eye")])
    nodes += [helper.make_node("Mul", [one, "iterations"], ["trips_f"]),
              helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
              helper.make_node("Loop", ["trips", "keep_going", "v0"], ["v_final"], body=body),
              helper.make_node("ReduceSum", ["v_final"], ["loop_sum"], keepdims=0)]
    return _scores_plus(nodes, inits, "loop_sum")


def memory_hungry_model(floats: float = 1.5e9) -> bytes:
    """A 32x32 classifier that expands a value to ``floats`` float32s (6 GB by default), a size computed
    from its input: it passes every static check and allocates when it runs."""
    nodes: list = []
    inits: list = [numpy_helper.from_array(np.array(floats, np.float32), "floats"),
                   numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
                   numpy_helper.from_array(np.ones((1,), np.float32), "value")]
    one = _input_dependent_one(nodes, inits)
    nodes += [helper.make_node("Mul", [one, "floats"], ["size_f"]),
              helper.make_node("Cast", ["size_f"], ["size"], to=TensorProto.INT64),
              helper.make_node("Reshape", ["size", "one_axis"], ["shape"]),
              helper.make_node("Expand", ["value", "shape"], ["big"]),
              helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=0)]
    return _scores_plus(nodes, inits, "big_sum")
