"""ONNX models read and rewritten at the protobuf wire level, without the ``onnx`` package.

``import onnx`` costs a second or more of start-up (it loads ``ml_dtypes`` and the whole helper
API), several times the inference of a small model; the engine only needs to read a model's
inputs, outputs, opsets and where its tensors keep their data, and to put a few nodes and inputs in
front of its graph. Both are done here on the bytes themselves.

The protobuf wire format: a message is a sequence of fields, each a varint key
``number << 3 | wire_type`` followed by a varint (type 0), 8 bytes (1), a varint length and that
many bytes (2), or 4 bytes (5); types 3 and 4 (groups) do not occur in ONNX and are refused. The
reading follows protobuf's own rules, so that it sees what onnxruntime's parser will:

- a repeated field is every occurrence, in order;
- a singular scalar is its last occurrence;
- a singular message that occurs more than once is the merge of its occurrences, which is the
  parse of their bytes concatenated;
- a known field number with an unexpected wire type is an unknown field, and is skipped.

Field numbers are those of ``onnx/onnx.proto`` (ModelProto.graph = 7, GraphProto.input = 11, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from shapfleet.errors import ModelError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

#: Deepest nesting of graphs in attributes (If/Loop/Scan bodies) accepted; protobuf's own parsers
#: stop at 100 nested messages, and a graph level is several messages deep.
MAX_GRAPH_DEPTH = 24

# ModelProto
MODEL_OPSET_IMPORT, MODEL_GRAPH, MODEL_TRAINING_INFO, MODEL_FUNCTIONS = 8, 7, 20, 25
# OperatorSetIdProto
OPSET_DOMAIN, OPSET_VERSION = 1, 2
# GraphProto
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 12, 15
# NodeProto
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 4, 5
# AttributeProto
ATTR_NAME, ATTR_I, ATTR_T, ATTR_G, ATTR_INTS, ATTR_TENSORS, ATTR_GRAPHS, ATTR_TYPE = 1, 3, 5, 6, 8, 10, 11, 20
ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 22, 23
ATTRIBUTE_INT, ATTRIBUTE_INTS = 2, 7  # AttributeProto.AttributeType
# TensorProto
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, DATA_LOCATION_EXTERNAL = 13, 14, 1
# SparseTensorProto
SPARSE_VALUES, SPARSE_INDICES = 1, 2
# TrainingInfoProto
TRAINING_INITIALIZATION, TRAINING_ALGORITHM = 1, 2
# FunctionProto
FUNCTION_NODE = 7
# ValueInfoProto, TypeProto, TypeProto.Tensor, TensorShapeProto, TensorShapeProto.Dimension
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_TYPE_ELEM_TYPE, TENSOR_TYPE_SHAPE = 1, 2
SHAPE_DIM = 1
DIM_VALUE, DIM_PARAM = 1, 2

#: TensorProto.DataType names, for messages.
ELEMENT_TYPE_NAMES = {
    0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
    9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
    16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4",
    22: "INT4", 23: "FLOAT4E2M1", 24: "FLOAT8E8M0", 25: "UINT2", 26: "INT2",
}
ELEMENT_BOOL, ELEMENT_INT64 = 9, 7


class WireError(ModelError):
    """The bytes are not a well-formed protobuf message."""


# -- reading -----------------------------------------------------------------------------------------
def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise WireError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview, int, int]]:
    """Every field of one message as (number, wire type, value, start, end): the value is an int
    for varint and fixed fields (unsigned) and a view of the bytes of a length-delimited one
    (nothing is copied, so reading a model of large weights costs its number of fields, not its
    size); ``data[start:end]`` is the whole field as stored. Raises :class:`WireError`."""
    data = memoryview(data)
    position, end = 0, len(data)
    while position < end:
        start = position
        key = data[position]  # keys and lengths are mostly one byte: read those inline
        if key < 0x80:
            position += 1
        else:
            key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == LENGTH:
            if position < end and data[position] < 0x80:
                length = data[position]
                position += 1
            else:
                length, position = _varint(data, position)
            if position + length > end:
                raise WireError("a length-delimited field runs past its message")
            value = data[position:position + length]
            position += length
        elif wire_type == VARINT:
            value, position = _varint(data, position)
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if position + size > end:
                raise WireError("truncated fixed-width field")
            value = int.from_bytes(data[position:position + size], "little")
            position += size
        else:
            raise WireError(f"wire type {wire_type} (field {number})")
        yield number, wire_type, value, start, position


class Message:
    """One message's fields, indexed by number, with protobuf's rules for reading them."""

    __slots__ = ("raw", "_by_number")

    def __init__(self, data: bytes | memoryview) -> None:
        self.raw = memoryview(data)
        self._by_number: dict[int, list[tuple[int, int | memoryview]]] = {}
        for number, wire_type, value, _, _ in fields(self.raw):
            self._by_number.setdefault(number, []).append((wire_type, value))

    def has(self, number: int, wire_type: int) -> bool:
        return any(t == wire_type for t, _ in self._by_number.get(number, ()))

    def messages(self, number: int) -> list[Message]:
        """A repeated message field."""
        return [Message(v) for t, v in self._by_number.get(number, ()) if t == LENGTH]

    def message(self, number: int) -> Message:
        """A singular message field: the merge of its occurrences (empty when absent)."""
        values = [v for t, v in self._by_number.get(number, ()) if t == LENGTH]
        return Message(values[0] if len(values) == 1 else b"".join(values))

    def string(self, number: int) -> str:
        """A singular string field (its last occurrence; "" when absent)."""
        values = [v for t, v in self._by_number.get(number, ()) if t == LENGTH]
        return str(values[-1], "utf-8", "surrogateescape") if values else ""

    def integer(self, number: int, default: int = 0) -> int:
        """A singular int32/int64/enum field, as a signed 64-bit value (its last occurrence)."""
        values = [v for t, v in self._by_number.get(number, ()) if t == VARINT]
        return _signed(values[-1]) if values else default

    def without(self, number: int, keep=lambda raw: False) -> bytes:
        """This message's bytes with field ``number`` left out, except the occurrences whose bytes
        ``keep`` accepts; every other field is copied as it was stored, in its order."""
        out, start, data = [], 0, self.raw
        for field_number, wire_type, value, field_start, field_end in fields(data):
            if field_number == number and wire_type == LENGTH and not keep(value):
                out.append(data[start:field_start])
                start = field_end
        out.append(data[start:])
        return b"".join(out)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# -- what the engine reads ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: its name, element type (0: not a tensor) and dimensions (an int
    for a fixed one, None for a symbolic or unset one), and its message as stored."""

    name: str
    elem_type: int
    dims: tuple[int | None, ...]
    raw: memoryview


def value_info(message: Message) -> ValueInfo:
    tensor = message.message(VALUE_TYPE).message(TYPE_TENSOR)
    shape = tensor.message(TENSOR_TYPE_SHAPE)
    dims = tuple(d.integer(DIM_VALUE) if d.has(DIM_VALUE, VARINT) else None for d in shape.messages(SHAPE_DIM))
    return ValueInfo(message.string(VALUE_NAME), tensor.integer(TENSOR_TYPE_ELEM_TYPE), dims, message.raw)


@dataclass(frozen=True)
class ModelSummary:
    """What :func:`read_model` finds: the main graph's inputs that are not initializers, its
    outputs, whether it has nodes, and the default-domain opset (0: none imported)."""

    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    has_nodes: bool
    opset: int


def read_model(data: bytes) -> ModelSummary:
    """Read a ModelProto's bytes. Raises :class:`WireError` on bytes that are not a message."""
    model = Message(data)
    graph = model.message(MODEL_GRAPH)
    initializers = {t.string(8) for t in graph.messages(GRAPH_INITIALIZER)}  # TensorProto.name = 8
    inputs = tuple(v for v in map(value_info, graph.messages(GRAPH_INPUT)) if v.name not in initializers)
    outputs = tuple(map(value_info, graph.messages(GRAPH_OUTPUT)))
    opset = next((o.integer(OPSET_VERSION) for o in model.messages(MODEL_OPSET_IMPORT)
                  if o.string(OPSET_DOMAIN) in ("", "ai.onnx")), 0)
    return ModelSummary(inputs, outputs, bool(graph.messages(GRAPH_NODE)), opset)


def uses_external_data(data: bytes) -> bool:
    """Whether any tensor anywhere in the model (initializers, sparse initializers, attributes,
    subgraphs at any depth up to :data:`MAX_GRAPH_DEPTH`, functions, training graphs) keeps its
    data in an external file. Raises :class:`WireError`."""
    model = Message(data)
    graphs = [model.message(MODEL_GRAPH)]
    for training in model.messages(MODEL_TRAINING_INFO):
        graphs += [training.message(TRAINING_INITIALIZATION), training.message(TRAINING_ALGORITHM)]
    return any(_graph_uses_external_data(g, 0) for g in graphs) or any(
        _nodes_use_external_data(f.messages(FUNCTION_NODE), 0) for f in model.messages(MODEL_FUNCTIONS))


def _tensor_is_external(tensor: Message) -> bool:
    return tensor.integer(TENSOR_DATA_LOCATION) == DATA_LOCATION_EXTERNAL or tensor.has(TENSOR_EXTERNAL_DATA, LENGTH)


def _sparse_is_external(sparse: Message) -> bool:
    return _tensor_is_external(sparse.message(SPARSE_VALUES)) or _tensor_is_external(sparse.message(SPARSE_INDICES))


def _graph_uses_external_data(graph: Message, depth: int) -> bool:
    if depth > MAX_GRAPH_DEPTH:
        raise WireError(f"graphs nest more than {MAX_GRAPH_DEPTH} deep")
    return (any(map(_tensor_is_external, graph.messages(GRAPH_INITIALIZER)))
            or any(map(_sparse_is_external, graph.messages(GRAPH_SPARSE_INITIALIZER)))
            or _nodes_use_external_data(graph.messages(GRAPH_NODE), depth))


def _nodes_use_external_data(nodes: list[Message], depth: int) -> bool:
    """Every tensor and graph an attribute can hold is looked at, whatever the attribute's declared
    type says (a parser may honour a field the type does not name)."""
    for node in nodes:
        for attribute in node.messages(NODE_ATTRIBUTE):
            tensors = [attribute.message(ATTR_T)] if attribute.has(ATTR_T, LENGTH) else []
            tensors += attribute.messages(ATTR_TENSORS)
            sparse = [attribute.message(ATTR_SPARSE_TENSOR)] if attribute.has(ATTR_SPARSE_TENSOR, LENGTH) else []
            sparse += attribute.messages(ATTR_SPARSE_TENSORS)
            if any(map(_tensor_is_external, tensors)) or any(map(_sparse_is_external, sparse)):
                return True
            graphs = [attribute.message(ATTR_G)] if attribute.has(ATTR_G, LENGTH) else []
            graphs += attribute.messages(ATTR_GRAPHS)
            if any(_graph_uses_external_data(g, depth + 1) for g in graphs):
                return True
    return False


# -- writing ---------------------------------------------------------------------------------------------
def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, wire_type: int, value: int | bytes) -> bytes:
    key = _encode_varint(number << 3 | wire_type)
    if wire_type == VARINT:
        return key + _encode_varint(value)
    if wire_type == LENGTH:
        return key + _encode_varint(len(value)) + value
    return key + int(value).to_bytes(8 if wire_type == FIXED64 else 4, "little")


def length_field(number: int, value: bytes | str) -> bytes:
    return _field(number, LENGTH, value.encode() if isinstance(value, str) else value)


def varint_field(number: int, value: int) -> bytes:
    return _field(number, VARINT, value)


def node(op_type: str, inputs: list[str], outputs: list[str], **attributes: int | list[int]) -> bytes:
    """A NodeProto with int or ints attributes."""
    out = b"".join(length_field(NODE_INPUT, name) for name in inputs)
    out += b"".join(length_field(NODE_OUTPUT, name) for name in outputs)
    out += length_field(NODE_OP_TYPE, op_type)
    for name, value in attributes.items():
        if isinstance(value, list):
            body = length_field(ATTR_NAME, name) + b"".join(varint_field(ATTR_INTS, v) for v in value)
            body += varint_field(ATTR_TYPE, ATTRIBUTE_INTS)
        else:
            body = length_field(ATTR_NAME, name) + varint_field(ATTR_I, value) + varint_field(ATTR_TYPE, ATTRIBUTE_INT)
        out += length_field(NODE_ATTRIBUTE, body)
    return out


def tensor_input(name: str, elem_type: int, dims: list[bytes]) -> bytes:
    """A ValueInfoProto of a tensor; ``dims`` are Dimension messages (see :func:`dimension`)."""
    shape = b"".join(length_field(SHAPE_DIM, d) for d in dims)
    tensor = varint_field(TENSOR_TYPE_ELEM_TYPE, elem_type) + length_field(TENSOR_TYPE_SHAPE, shape)
    return length_field(VALUE_NAME, name) + length_field(VALUE_TYPE, length_field(TYPE_TENSOR, tensor))


def dimension(value: int | str) -> bytes:
    """A Dimension message: fixed (int) or symbolic (str)."""
    return varint_field(DIM_VALUE, value) if isinstance(value, int) else length_field(DIM_PARAM, value)


def dimensions(info: ValueInfo) -> list[bytes]:
    """The Dimension messages of a value's shape, as they are stored."""
    shape = Message(info.raw).message(VALUE_TYPE).message(TYPE_TENSOR).message(TENSOR_TYPE_SHAPE)
    return [d.raw for d in shape.messages(SHAPE_DIM)]


def prepend_to_graph(data: bytes, nodes: list[bytes], inputs: list[bytes], drop_input: str) -> bytes:
    """The model with ``nodes`` put before its graph's nodes and ``inputs`` before its inputs, and
    the graph inputs named ``drop_input`` removed. Every other byte of the graph and the model is
    kept; a graph stored in several pieces is written back as their merge, one field."""
    model = Message(data)
    graph = model.message(MODEL_GRAPH)
    kept = graph.without(GRAPH_INPUT, keep=lambda raw: Message(raw).string(VALUE_NAME) != drop_input)
    new_graph = b"".join(length_field(GRAPH_NODE, n) for n in nodes) + b"".join(
        length_field(GRAPH_INPUT, i) for i in inputs) + kept
    return model.without(MODEL_GRAPH) + length_field(MODEL_GRAPH, new_graph)
