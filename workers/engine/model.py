"""The model adapter: an ONNX image classifier as ``predict(images) -> outputs``.

``images`` are float32 ``B x H x W x C`` arrays of 0..255 pixels; the adapter reorders channels
(``rgb``/``bgr``), applies ``(pixel - mean) / std`` per channel, transposes to the model's layout
(NCHW, NHWC, or NHW for single-channel models without a channel axis), runs onnxruntime and returns
float64 ``B x classes`` outputs, optionally through softmax or logit.

Models are checked before any session is created: they must parse, have exactly one image-shaped
float input, and hold no external-data references (a model is self-contained bytes; a reference
such as ``../../etc/passwd`` is refused, not resolved). Only onnxruntime's built-in operators run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Iterator, Sequence

import numpy as np

from shapfleet.errors import ModelError, ModelOutputError

from .settings import ExplainSettings

log = logging.getLogger(__name__)

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


def _graphs(graph) -> Iterator:
    """The graph and every subgraph (If/Loop/Scan bodies) inside it."""
    import onnx

    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)


def _uses_external_data(model) -> bool:
    import onnx

    for graph in _graphs(model.graph):
        tensors = list(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attribute.t)
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    tensors.extend(attribute.tensors)
        if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors):
            return True
    return False


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def inspect_model(model_bytes: bytes, layout: str = "auto") -> ModelInfo:
    """Validate a model's bytes and describe its image input. Raises :class:`ModelError`."""
    import onnx

    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as e:  # onnx raises DecodeError and others from protobuf
        raise ModelError(f"the file is not an ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError("the file is not an ONNX model (it has no graph)")
    if _uses_external_data(model):
        raise ModelError("the model references external data files; upload a self-contained model "
                         "(onnx.save_model(..., save_as_external_data=False))")
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names]
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
                         "shapfleet explains models with exactly one image input")
    if not model.graph.output:
        raise ModelError("the model has no outputs")
    tensor = inputs[0].type.tensor_type
    input_type = _ONNX_FLOAT_ELEM.get(tensor.elem_type)
    if input_type is None:
        name = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "non-tensor"
        raise ModelError(f"the model's input {inputs[0].name!r} is {name}; image inputs must be float, double or float16")
    dims: list[int | None] = [(_dim(d.dim_value) if d.HasField("dim_value") else None) for d in tensor.shape.dim]
    info = _image_layout(inputs[0].name, dims, layout)
    output = model.graph.output[0]
    out_dims = [(_dim(d.dim_value) if d.HasField("dim_value") else None) for d in output.type.tensor_type.shape.dim]
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


def run_in_fixed_batches(run, batch: np.ndarray, fixed: int | None) -> np.ndarray:
    """``run(batch)``, or, for a model whose batch dimension is fixed, ``run`` on chunks of exactly
    that size (the last padded by repeating its final row) with the padding's outputs dropped."""
    if fixed is None or fixed == len(batch):
        return run(batch)
    outputs = []
    for start in range(0, len(batch), fixed):
        chunk = batch[start:start + fixed]
        pad = fixed - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(run(chunk)[: fixed - pad])
    return np.concatenate(outputs)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's CUDA provider links against, once.

    Installed as pip packages (``onnxruntime-gpu[cuda,cudnn]``, as the GPU image does) they are not
    on the loader's path, and without this the provider fails to load and onnxruntime silently runs
    on the CPU. ``preload_dlls`` also falls back to the system's libraries (a CUDA base image), and
    does nothing in a CPU-only onnxruntime."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def cuda_provider(provider: str | tuple[str, dict]) -> str | tuple[str, dict]:
    """The CUDA provider with TF32 off unless its options say otherwise; other providers unchanged.

    onnxruntime lets float32 convolutions and matrix products use TF32 on Ampere and newer GPUs
    (10-bit mantissa): model outputs then change by about 1e-3 relative with the batch's shape and
    composition, the same coalition gives different outputs in different batches, and exact
    Shapley values are off by far more than float32 rounding (measured on an H100: 1.8e-5 on values
    of 4e-3). Explanations are differences of outputs, so shapfleet keeps float32 arithmetic."""
    name, options = provider if isinstance(provider, tuple) else (provider, {})
    if name != "CUDAExecutionProvider":
        return provider
    return name, {"use_tf32": "0", **options}


def session_device(session) -> tuple[str, int]:
    """Where the session's graph runs: ``("cuda", device_id)`` when the CUDA provider comes first,
    else ``("cpu", 0)``."""
    providers = session.get_providers()
    if providers and providers[0] == "CUDAExecutionProvider":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


def create_session(model_bytes: bytes, providers: Sequence[str | tuple[str, dict]] | None = None,
                   threads: int | None = None):
    """An onnxruntime session for already-inspected model bytes (built-in operators only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The engine does numpy work between model calls; spinning onnxruntime threads would fight it for
    # the cores (measured: a 64-image MNIST batch plus a small matmul took 11.7 ms spinning, 5.5 ms not).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    providers = [cuda_provider(p) for p in (providers or default_providers())]
    if any(isinstance(p, tuple) and p[0] == "CUDAExecutionProvider" for p in providers):
        load_cuda_libraries()
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(f"onnxruntime cannot load the model: {e}") from e
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if session.get_providers()[0] != wanted:
        # onnxruntime falls back to the next provider (the CPU) when one cannot start, saying nothing
        # at our log level: a GPU worker running on its CPU must be visible in its log.
        log.warning("onnxruntime could not start %s and runs this model on %s", wanted, session.get_providers()[0])
    return session


class ModelSessions:
    """One model's onnxruntime sessions, each created on first use: ``plain`` (image input) and
    ``fused(info)`` (coalition input, see :mod:`shapfleet.workers.engine.fused`). Workers keep one per model."""

    def __init__(self, model_bytes: bytes, providers: Sequence[str | tuple[str, dict]] | None = None,
                 threads: int | None = None, plain=None) -> None:
        self.model_bytes = model_bytes
        self.providers = providers
        self.threads = threads
        self._plain = plain
        self._fused: dict[str, object] = {}

    @property
    def plain(self):
        if self._plain is None:
            self._plain = create_session(self.model_bytes, self.providers, self.threads)
        return self._plain

    def fused(self, info: "ModelInfo"):
        """The fused session for this layout, or None when the model cannot be fused."""
        from .fused import fuse_masking

        if info.layout not in self._fused:
            fused_bytes = fuse_masking(self.model_bytes, info)
            self._fused[info.layout] = None if fused_bytes is None else create_session(fused_bytes, self.providers, self.threads)
        return self._fused[info.layout]


class OnnxClassifier:
    """An onnxruntime session wrapped as ``predict(B x H x W x C pixels) -> B x K float64``.

    ``sessions`` lets a worker reuse one model's sessions (created once per process and model) for
    jobs with different preprocessing settings; ``info`` (from :func:`inspect_model` with
    ``settings.layout``) saves parsing the model again.
    """

    def __init__(self, model_bytes: bytes, settings: ExplainSettings, providers: Sequence[str] | None = None,
                 threads: int | None = None, sessions: ModelSessions | None = None, info: ModelInfo | None = None) -> None:
        self.info = info if info is not None else inspect_model(model_bytes, settings.layout)
        self.settings = settings
        mean, std = settings.normalization()
        channels = self.info.channels
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ModelError(f"mean/std give {len(mean)}/{len(std)} values; the model takes {channels} channels")
        self._dtype = _FLOAT_TYPES[self.info.input_type]
        # Normalise in the model's precision (float32 for float16 models), so a float64 model sees
        # float64-exact inputs.
        self._work_dtype = np.float64 if self._dtype == np.float64 else np.float32
        self._mean = np.broadcast_to(np.asarray(mean, dtype=self._work_dtype), (channels,)).copy()
        self._std = np.broadcast_to(np.asarray(std, dtype=self._work_dtype), (channels,)).copy()
        self.sessions = sessions if sessions is not None else ModelSessions(model_bytes, providers, threads)
        _ = self.sessions.plain  # load now: a model onnxruntime cannot run is refused here, not mid-job

    @property
    def session(self):
        return self.sessions.plain

    def coalition_predictor(self, image: np.ndarray, background: np.ndarray, segments: np.ndarray):
        """``predict(Z) -> B x K`` with the masking inside the model (one background), or None when
        the model cannot be fused or the fused selection would not be exact (a non-finite value)."""
        from .fused import CoalitionPredictor, selection_is_exact

        model_image, model_background = self.to_model_input(image[None]), self.to_model_input(background[None])
        if not selection_is_exact(model_image, model_background):
            return None
        session = self.sessions.fused(self.info)
        if session is None:
            return None
        return CoalitionPredictor(session, self.info, model_image, model_background, segments, self.finish_outputs,
                                  self.fixed_batch)

    @cached_property
    def fixed_batch(self) -> int | None:
        """The number of rows every run gets (smaller batches are padded), or None for any number.

        The model's own fixed batch dimension when it has one. On a GPU, the job's ``batch_size``:
        onnxruntime's CUDA convolutions re-plan whenever the batch shape differs from the last run's
        (measured on an H100 with EfficientNet-Lite0: 0.4 to 1.5 s per change, against 0.05 s for a
        whole batch of 512), and each shard ends in a smaller batch. Padding costs at most one
        batch of extra inference per shard. On the CPU a new shape costs nothing measurable, so
        batches run as they come."""
        if self.info.batch is not None:
            return self.info.batch
        return self.settings.batch_size if session_device(self.session)[0] == "cuda" else None

    @property
    def input_size(self) -> tuple[int | None, int | None]:
        return self.info.height, self.info.width

    @property
    def channels(self) -> int:
        return self.info.channels

    def to_model_input(self, images: np.ndarray) -> np.ndarray:
        """Pixels (``B x H x W x C``, 0..255) -> the model's input tensor."""
        x = images
        if self.settings.channel_order == "bgr" and x.shape[-1] == 3:
            x = x[..., ::-1]
        x = (x.astype(self._work_dtype, copy=False) - self._mean) / self._std
        if self.info.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        elif self.info.layout == "nhw":
            x = x[..., 0]
        return np.ascontiguousarray(x, dtype=self._dtype)

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """Run the session on model-ready input, honouring a fixed batch dimension."""
        return run_in_fixed_batches(self._run, batch, self.fixed_batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.session.run([self.info.output_name], {self.info.input_name: batch})
        except Exception as e:
            raise ModelOutputError(f"the model failed on a batch of {len(batch)}: {e}") from e
        return np.asarray(out)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``B x H x W x C`` pixels -> ``B x K`` float64 outputs after the output transform."""
        return self.finish_outputs(self.run_raw(self.to_model_input(images)))

    def finish_outputs(self, out: np.ndarray) -> np.ndarray:
        """Raw model output -> ``B x K`` float64, checked and transformed (``--output``)."""
        out = np.asarray(out, dtype=np.float64)
        out = out.reshape(len(out), -1) if out.ndim > 2 and all(d == 1 for d in out.shape[2:]) else out
        if out.ndim != 2:
            raise ModelOutputError(f"the model's output has shape {list(out.shape)}; a classifier returns batch x classes")
        return transform_outputs(out, self.settings.output)


def transform_outputs(out: np.ndarray, transform: str) -> np.ndarray:
    """Apply ``raw``, ``softmax`` or ``logit`` to ``B x K`` outputs and check they are finite."""
    if not np.all(np.isfinite(out)):
        bad = "NaN" if np.isnan(out).any() else "Inf"
        raise ModelOutputError(f"the model returned {bad} outputs; shapfleet cannot explain non-finite outputs")
    if transform == "softmax":
        shifted = out - out.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        out = e / e.sum(axis=1, keepdims=True)
    elif transform == "logit":
        if np.any(out <= 0) or np.any(out >= 1):
            raise ModelOutputError("--output logit needs probabilities strictly between 0 and 1; the model returned "
                                   f"values in [{out.min():.3g}, {out.max():.3g}]")
        out = np.log(out) - np.log1p(-out)
    return out
