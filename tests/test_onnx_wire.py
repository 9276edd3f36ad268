"""The wire-level ONNX reader and rewriter (engine/onnx_wire.py) against the ``onnx`` package: the
same inputs, outputs, opsets and external-data verdicts on every test model and on hand-built
hostile ones, and a fused model that onnx parses, checks and reads back as the rewrite intended."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import conv_model, linear_model, nan_model, runaway_model, two_input_model, vector_input_model

from shapfleet.errors import ModelError
from shapfleet.workers.engine import onnx_wire
from shapfleet.workers.engine.fused import PREFIX, fuse_masking
from shapfleet.workers.engine.inspection import inspect_model


def _models() -> dict[str, bytes]:
    return {
        "linear nchw": linear_model(np.ones((4, 4, 3, 2)), np.zeros(2)),
        "linear nhwc double": linear_model(np.ones((4, 4, 3, 2)), np.zeros(2), layout="nhwc", double=True),
        "conv": conv_model(8, 8, classes=4),
        "conv nhwc": conv_model(8, 8, layout="nhwc"),
        "nan": nan_model(4, 4),
        "two inputs": two_input_model(4, 4),
        "vector": vector_input_model(),
        "loop": runaway_model(),
    }


def _dims(value_info) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim)


@pytest.mark.parametrize("name", list(_models()))
def test_the_reader_sees_what_onnx_sees(name):
    data = _models()[name]
    model = onnx.load_model_from_string(data)
    summary = onnx_wire.read_model(data)
    initializers = {t.name for t in model.graph.initializer}
    expected_inputs = [i for i in model.graph.input if i.name not in initializers]
    assert [i.name for i in summary.inputs] == [i.name for i in expected_inputs]
    assert [i.elem_type for i in summary.inputs] == [i.type.tensor_type.elem_type for i in expected_inputs]
    assert [i.dims for i in summary.inputs] == [_dims(i) for i in expected_inputs]
    assert [o.name for o in summary.outputs] == [o.name for o in model.graph.output]
    assert [o.dims for o in summary.outputs] == [_dims(o) for o in model.graph.output]
    assert summary.opset == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert summary.has_nodes and not onnx_wire.uses_external_data(data)


def _with_external(tensor: TensorProto) -> TensorProto:
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    return tensor


def _graph_with(nodes, initializers=(), sparse=()) -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])
    return helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers), sparse_initializer=list(sparse))


def _external_models() -> dict[str, bytes]:
    weight = lambda: _with_external(helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0]))  # noqa: E731
    identity = helper.make_node("Identity", ["x"], ["y"])
    then_branch = helper.make_graph([helper.make_node("Constant", [], ["z"], value=weight())], "then", [],
                                    [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    else_branch = helper.make_graph([helper.make_node("Constant", [], ["z"], value=helper.make_tensor(
        "v", TensorProto.FLOAT, [1], [2.0]))], "else", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    nested_if = helper.make_node("If", ["c"], ["z"], then_branch=then_branch, else_branch=else_branch)
    sparse = helper.make_sparse_tensor(weight(), helper.make_tensor("i", TensorProto.INT64, [1], [0]), [4])
    function = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Constant", [], ["b"], value=weight())],
                                    [helper.make_opsetid("", 17)])
    return {
        "initializer": helper.make_model(_graph_with([identity], [weight()])).SerializeToString(),
        "attribute tensor": helper.make_model(_graph_with(
            [helper.make_node("Constant", [], ["k"], value=weight()), identity])).SerializeToString(),
        "subgraph": helper.make_model(_graph_with(
            [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             nested_if, identity])).SerializeToString(),
        "sparse initializer": helper.make_model(_graph_with([identity], sparse=[sparse])).SerializeToString(),
        "function": helper.make_model(_graph_with([identity]), functions=[function]).SerializeToString(),
    }


@pytest.mark.parametrize("name", list(_external_models()))
def test_external_data_is_found_wherever_a_tensor_can_be(name):
    data = _external_models()[name]
    assert onnx_wire.uses_external_data(data)
    with pytest.raises(ModelError, match="external data"):
        inspect_model(data)


def test_a_graph_split_over_two_fields_is_read_as_its_merge():
    """protobuf merges a singular message that occurs twice: the second piece's input counts."""
    model = onnx.load_model_from_string(conv_model(8, 8))
    extra = onnx.GraphProto()
    extra.input.add().CopyFrom(helper.make_tensor_value_info("second", TensorProto.FLOAT, [1, 3, 8, 8]))
    data = model.SerializeToString() + onnx_wire.length_field(onnx_wire.MODEL_GRAPH, extra.SerializeToString())
    assert len(onnx.load_model_from_string(data).graph.input) == 2  # onnx's own parse agrees
    with pytest.raises(ModelError, match="2 inputs"):
        inspect_model(data)


@pytest.mark.parametrize("data, match", [
    (b"\x08\x07garbage-not-a-model", "malformed protobuf"),  # wire type 7
    (conv_model(8, 8)[:-5], "not an ONNX model"),  # truncated
    (b"\x3a\xff\xff\xff\xff\x0f", "runs past"),  # a graph longer than the file
    (b"\x08" + b"\xff" * 11, "varint"),
    (b"", "no graph"),
])
def test_malformed_bytes_are_refused_with_a_message(data, match):
    with pytest.raises(ModelError, match=match):
        inspect_model(data)


def test_graphs_nested_past_the_limit_are_refused():
    body = helper.make_graph([], "leaf", [], [helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    for _ in range(onnx_wire.MAX_GRAPH_DEPTH + 2):
        loop = helper.make_node("If", ["c"], ["c"], then_branch=body)  # one branch: the size stays linear
        body = helper.make_graph([loop], "level", [], [helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    data = helper.make_model(_graph_with([helper.make_node("If", ["c"], ["y"], then_branch=body)])).SerializeToString()
    with pytest.raises(ModelError, match="nest"):
        inspect_model(data)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_the_fused_model_is_a_valid_onnx_model_with_the_masking_in_front(layout):
    data = conv_model(8, 8, layout=layout)
    info = inspect_model(data)
    fused = onnx.load_model_from_string(fuse_masking(data, info))
    onnx.checker.check_model(fused, full_check=True)
    original = onnx.load_model_from_string(data)
    assert [i.name for i in fused.graph.input] == [f"{PREFIX}{n}" for n in
                                                   ("coalitions", "segments", "mask_shape", "image", "background")]
    assert [n.op_type for n in fused.graph.node[:9]] == ["Gather", "Transpose", "Reshape", "Not", "Cast", "Cast",
                                                         "Mul", "Mul", "Add"]
    assert fused.graph.node[8].output == [info.input_name]
    assert list(fused.graph.node[9:]) == list(original.graph.node)
    assert list(fused.graph.initializer) == list(original.graph.initializer)
    image = fused.graph.input[3].type.tensor_type
    assert image.elem_type == TensorProto.FLOAT
    assert _dims(fused.graph.input[3])[0] == 1 and _dims(fused.graph.input[3])[1:] == _dims(original.graph.input[0])[1:]
    assert helper.get_attribute_value(fused.graph.node[1].attribute[0]) == [1, 0]
    assert helper.get_attribute_value(fused.graph.node[4].attribute[0]) == TensorProto.FLOAT


def test_negative_integers_round_trip_as_ten_byte_varints():
    encoded = onnx_wire.node("Gather", ["a", "b"], ["c"], axis=-1)
    decoded = onnx.NodeProto()
    decoded.ParseFromString(encoded)
    assert helper.get_attribute_value(decoded.attribute[0]) == -1


def test_explaining_imports_no_onnx(tmp_path):
    """The engine reads and fuses models without the onnx package (its import alone costs a second)."""
    model = tmp_path / "m.onnx"
    model.write_bytes(conv_model(8, 8, classes=3))
    code = (
        "import sys, numpy as np\n"
        "from shapfleet.workers.engine.model import OnnxClassifier\n"
        "from shapfleet.workers.engine.settings import ExplainSettings\n"
        f"c = OnnxClassifier(open({str(model)!r}, 'rb').read(), ExplainSettings())\n"
        "c.predict(np.zeros((2, 8, 8, 3)))\n"
        "p = c.coalition_predictor(np.zeros((8, 8, 3)), np.ones((8, 8, 3)), np.zeros((8, 8), dtype=int))\n"
        "assert p(np.ones((2, 1), dtype=bool)).shape == (2, 3)\n"
        "assert 'onnx' not in sys.modules, 'onnx was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
