"""The model adapter: an ONNX image classifier as ``predict(images) -> outputs``.

``images`` are float32 ``B x H x W x C`` arrays of 0..255 pixels; the adapter reorders channels
(``rgb``/``bgr``), applies ``(pixel - mean) / std`` per channel, transposes to the model's layout
(NCHW, NHWC, or NHW for single-channel models without a channel axis), runs onnxruntime and returns
float64 ``B x classes`` outputs, optionally through softmax or logit. What the model is comes from
:mod:`shapfleet.workers.engine.inspection`, its sessions from :mod:`shapfleet.workers.engine.sessions`,
and the masking fused into its graph from :mod:`shapfleet.workers.engine.fused`.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from shapfleet.errors import ModelError, ModelOutputError, ShapfleetError

from .bounds import run_bounded
from .fused import CoalitionPredictor, fuse_masking, selection_is_exact
from .inspection import _FLOAT_TYPES, ModelInfo, inspect_model
from .sessions import (
    ConcurrentRuns,
    available_cpus,
    create_session,
    default_providers,
    run_in_fixed_batches,
    session_device,
)
from .settings import FIXED_BACKGROUND_MASKERS, ExplainSettings

#: On the CPU, when the job leaves ``batch_size`` unset, one onnxruntime run gets at most this
#: many bytes of model input (at least one image): 6 images at 224 x 224 x 3 in float32. A large
#: convnet runs slower per image in large runs, whose activations outgrow the caches (EfficientNet-Lite0
#: here: about 3.0-3.1 ms an image in runs of 2 to 6, 3.8 ms in runs of 64, interleaved).
CPU_RUN_INPUT_BYTES = 4 << 20
#: The same bound where runs go side by side, one thread each (see :class:`ModelSessions`): 3
#: colour images at 224 x 224. EfficientNet-Lite0 with the fused masking ran 2.98 ms an image in runs
#: of 2 or 3, 3.05 in runs of 4, 3.09 in runs of 6 and 3.08 in runs of 1, two side by side.
CPU_SIDE_BY_SIDE_RUN_INPUT_BYTES = 2 << 20


class ModelSessions:
    """One model's onnxruntime sessions, each created on first use (or ahead of it, on a thread:
    :meth:`build_ahead`): ``plain`` (image input) and ``fused(info)`` (coalition input, see
    :mod:`shapfleet.workers.engine.fused`). Workers keep one per model.

    On the CPU with more than one thread (``threads``, default every CPU this process may use), the
    sessions run on one intra-op thread each and ``runs`` runs that many of their runs side by
    side; a job that sets its own ``batch_size`` runs each batch whole, on the ``whole=True``
    sessions, whose one run uses every thread. On a GPU, or with one thread, both are the same
    sessions and ``runs`` is None."""

    def __init__(self, model_bytes: bytes, providers: Sequence[str | tuple[str, dict]] | None = None,
                 threads: int | None = None, plain=None) -> None:
        self.model_bytes = model_bytes
        self.providers = providers
        self.threads = threads
        self._sessions: dict[tuple[str, bool], object] = {}
        self._building: dict[tuple[str, bool], Future] = {}
        if plain is not None:
            self._sessions[("plain", False)] = self._sessions[("plain", True)] = plain
        wanted = (providers or default_providers())[0]
        on_cpu = (wanted[0] if isinstance(wanted, tuple) else wanted) == "CPUExecutionProvider"
        self._side_by_side = (threads or available_cpus()) if on_cpu and plain is None else 1

    @cached_property
    def runs(self) -> ConcurrentRuns | None:
        """The threads that run the one-thread sessions' runs side by side, or None (one run at a time)."""
        if self._side_by_side <= 1 or session_device(self.plain)[0] != "cpu":
            return None
        return ConcurrentRuns(self._side_by_side)

    def _key(self, kind: str, whole: bool) -> tuple[str, bool]:
        return kind, whole and self._side_by_side > 1

    def _create(self, key: tuple[str, bool], model: Callable[[], bytes | None]):
        model_bytes = model()
        threads = self.threads if key[1] or self._side_by_side <= 1 else 1
        return None if model_bytes is None else create_session(model_bytes, self.providers, threads)

    def _session(self, kind: str, whole: bool, model: Callable[[], bytes | None]):
        key = self._key(kind, whole)
        if key not in self._sessions:
            building = self._building.pop(key, None)
            self._sessions[key] = building.result() if building is not None else self._create(key, model)
        return self._sessions[key]

    def build_ahead(self, info: "ModelInfo", whole: bool = False, fused: bool = True) -> None:
        """Start building the plain session (and, with ``fused``, the fused one for ``info``'s
        layout) on a thread, one after the other, and return at once; each is taken at its first
        use, which waits for it and raises what building it raised (a :class:`ModelError` for a
        model onnxruntime cannot load). onnxruntime builds a session without holding the GIL, so
        the caller's own work meanwhile (decoding and segmenting the image) overlaps it."""
        wanted = [("plain", lambda: self.model_bytes)]
        if fused:
            wanted.append((f"fused-{info.layout}", lambda: fuse_masking(self.model_bytes, info)))
        queued = []
        for kind, model in wanted:
            key = self._key(kind, whole)
            if key not in self._sessions and key not in self._building:
                self._building[key] = future = Future()
                queued.append((future, key, model))
        if queued:
            threading.Thread(target=self._build_all, args=(queued,), name="session-build", daemon=True).start()

    def _build_all(self, queued: list) -> None:
        for future, key, model in queued:
            try:
                future.set_result(self._create(key, model))
            except BaseException as e:  # raised again where the session is first used
                future.set_exception(e)

    def is_building(self, kind: str, whole: bool = False) -> bool:
        """Whether this session is being built by :meth:`build_ahead` and not yet taken."""
        return self._key(kind, whole) in self._building

    @property
    def plain(self):
        return self._session("plain", False, lambda: self.model_bytes)

    def plain_whole(self):
        """The plain session whose one run uses every thread (the same as ``plain`` where runs do not go side by side)."""
        return self._session("plain", True, lambda: self.model_bytes)

    def fused(self, info: "ModelInfo", whole: bool = False):
        """The fused session for this layout, or None when the model cannot be fused."""
        return self._session(f"fused-{info.layout}", whole, lambda: fuse_masking(self.model_bytes, info))


class OnnxClassifier:
    """An onnxruntime session wrapped as ``predict(B x H x W x C pixels) -> B x K float64``.

    ``sessions`` lets a worker reuse one model's sessions (created once per process and model) for
    jobs with different preprocessing settings; ``info`` (from :func:`inspect_model` with
    ``settings.layout``) saves parsing the model again.
    """

    def __init__(self, model_bytes: bytes, settings: ExplainSettings, providers: Sequence[str] | None = None,
                 threads: int | None = None, sessions: ModelSessions | None = None, info: ModelInfo | None = None,
                 build_ahead: bool = False) -> None:
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
        # A batch_size the job gives is the images of one model run: each runs whole, on every thread.
        self._whole_runs = settings.batch_size is not None
        if build_ahead:  # on a thread, while the caller plans; its first model run waits for it
            self.sessions.build_ahead(self.info, self._whole_runs, fused=uses_fused_masking(settings))
        elif not self.sessions.is_building("plain", self._whole_runs):
            _ = self.session  # load now: a model onnxruntime cannot run is refused here, not mid-job

    @property
    def session(self):
        return self.sessions.plain_whole() if self._whole_runs else self.sessions.plain

    @property
    def runs(self) -> ConcurrentRuns | None:
        """Where this classifier's runs go side by side (see :class:`ModelSessions`), or None."""
        return None if self._whole_runs else self.sessions.runs

    def coalition_predictor(self, image: np.ndarray, background: np.ndarray, segments: np.ndarray):
        """``predict(Z) -> B x K`` with the masking inside the model (one background), or None when
        the model cannot be fused or the fused selection would not be exact (a non-finite value)."""
        model_image, model_background = self.to_model_input(image[None]), self.to_model_input(background[None])
        if not selection_is_exact(model_image, model_background):
            return None
        session = self.sessions.fused(self.info, whole=self._whole_runs)
        if session is None:
            return None
        return CoalitionPredictor(session, self.info, model_image, model_background, segments, self.finish_outputs,
                                  self.fixed_batch, self.run_rows(model_image[0].nbytes), self.runs)

    @cached_property
    def fixed_batch(self) -> int | None:
        """The number of rows every run gets (smaller batches are padded), or None for any number.

        The model's own fixed batch dimension when it has one. On a GPU, the job's ``batch_size``:
        onnxruntime's CUDA convolutions re-plan whenever the batch shape differs from the last run's
        (which costs many batches' time), and each shard ends in a smaller batch. Padding costs at most one
        batch of extra inference per shard. On the CPU a new shape costs nothing measurable, so
        batches run as they come."""
        if self.info.batch is not None:
            return self.info.batch
        return self.settings.images_per_batch if session_device(self.session)[0] == "cuda" else None

    def run_rows(self, row_bytes: int) -> int | None:
        """The most rows one onnxruntime run gets, for model inputs of ``row_bytes`` bytes an image,
        or None for a whole batch. With ``batch_size`` given, every batch runs whole (it is the
        number of images per model call); unset, on the CPU, at most :data:`CPU_RUN_INPUT_BYTES`
        of input, or :data:`CPU_SIDE_BY_SIDE_RUN_INPUT_BYTES` where runs go side by side. A fixed
        batch (the model's own, or the GPU's) takes precedence."""
        if self.settings.batch_size is not None or self.fixed_batch is not None:
            return None
        limit = CPU_RUN_INPUT_BYTES if self.runs is None else CPU_SIDE_BY_SIDE_RUN_INPUT_BYTES
        return max(1, limit // max(1, row_bytes))

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
        return run_in_fixed_batches(self._run, batch, self.fixed_batch, self.run_rows(batch[0].nbytes if len(batch) else 1),
                                    self.runs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        feeds = {self.info.input_name: batch}
        try:
            (out,) = run_bounded(lambda options: self.session.run([self.info.output_name], feeds, options),
                                 f"a batch of {len(batch)}")
        except ShapfleetError:
            raise
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


def uses_fused_masking(settings: ExplainSettings) -> bool:
    """Whether a job with these settings evaluates its coalitions through the fused session: method
    kernel with a masker of one fixed background (see
    :func:`shapfleet.workers.engine.evaluation.coalition_predictor`)."""
    return settings.method == "kernel" and settings.masker_spec.kind in FIXED_BACKGROUND_MASKERS


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
