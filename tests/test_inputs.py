"""Every masker, segmenter, layout, channel count and preprocessing preset, against known answers."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
from onnx_models import conv_model, linear_model
from PIL import Image

from shapfleet.errors import ImageError, InvalidSettingsError, ModelError
from shapfleet.workers.engine.images import fit_to_model, load_image
from shapfleet.workers.engine.inspection import inspect_model
from shapfleet.workers.engine.maskers import InpaintMasker, build_masker
from shapfleet.workers.engine.model import OnnxClassifier
from shapfleet.workers.engine.segmentation import check_segments, renumber, segment
from shapfleet.workers.engine.settings import ExplainSettings, MaskerSpec
from shapfleet.workers.local import explain, explain_array


def linear_expected(weights, image, background, segments, mean=0.0, std=1.0):
    difference = (np.asarray(image, np.float64) - np.asarray(background, np.float64)) / np.asarray(std, np.float64)
    contribution = weights * difference[..., None]
    return np.stack([contribution[segments == s].sum(axis=(0, 1)) for s in range(int(segments.max()) + 1)])


@pytest.fixture
def colour_image(rng):
    return rng.uniform(0, 255, (10, 12, 3)).astype(np.float32)


# -- maskers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, background", [
    ("constant:30", lambda img: np.full_like(img, 30)),
    ("constant:10,20,30", lambda img: np.broadcast_to(np.array([10, 20, 30], np.float32), img.shape)),
    ("mean", lambda img: np.broadcast_to(img.mean(axis=(0, 1)), img.shape)),
    ("blur:3,5", lambda img: cv2.blur(img, (3, 5), borderType=cv2.BORDER_REFLECT_101)),
])
def test_background_maskers_give_the_linear_closed_form(rng, colour_image, spec, background):
    weights = rng.normal(size=(10, 12, 3, 2))
    settings = ExplainSettings(segmenter="grid", grid="2x3", masker=spec, all_classes=True, preprocess="raw")
    model = OnnxClassifier(linear_model(weights, np.zeros(2), double=True), settings)
    result = explain_array(colour_image, model.predict, settings)
    np.testing.assert_allclose(result.values, linear_expected(weights, colour_image, background(colour_image), result.segments),
                               atol=1e-6)


def test_image_and_dataset_maskers(rng, colour_image, tmp_path):
    weights = rng.normal(size=(10, 12, 3, 2))
    model_bytes = linear_model(weights, np.zeros(2), "nhwc", double=True)
    reference = rng.uniform(0, 255, colour_image.shape).astype(np.uint8)
    Image.fromarray(colour_image.astype(np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(reference).save(tmp_path / "ref.png")
    backgrounds = rng.uniform(0, 255, (5,) + colour_image.shape).astype(np.float32)
    np.savez(tmp_path / "bg.npz", images=backgrounds)
    image = colour_image.astype(np.uint8).astype(np.float32)
    base = ExplainSettings(segmenter="grid", grid="2x2", all_classes=True, preprocess="raw")
    (ref_run,) = explain([str(tmp_path / "x.png")], model_bytes, base.replace(masker=f"image:{tmp_path / 'ref.png'}"))
    np.testing.assert_allclose(ref_run.explanation.values,
                               linear_expected(weights, image, reference, ref_run.explanation.segments), atol=1e-6)
    # A background set: v(z) is the mean output over the set, so for a linear model the values are
    # the closed form against the mean background, and v(empty) is the mean output on the set.
    (set_run,) = explain([str(tmp_path / "x.png")], model_bytes, base.replace(masker=f"dataset:{tmp_path / 'bg.npz'}"))
    result = set_run.explanation
    np.testing.assert_allclose(result.values, linear_expected(weights, image, backgrounds.astype(np.float64).mean(axis=0), result.segments), atol=1e-6)
    flat = weights.reshape(-1, 2)
    np.testing.assert_allclose(result.base_values, (backgrounds.reshape(5, -1) @ flat).mean(axis=0), atol=1e-6)
    assert result.n_evaluations == 1 + 5 + 14 * 5  # v(full), v(empty) over 5, 14 coalitions x 5


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpaint_maskers_fill_hidden_pixels_from_visible_ones(colour_image, method):
    masker = build_masker(MaskerSpec.parse(f"inpaint_{method}"), colour_image)
    assert isinstance(masker, InpaintMasker)
    keep = np.zeros((3, 10, 12), dtype=bool)
    keep[1, :, :6] = True
    keep[2] = True
    out = masker.compose(colour_image, keep)
    np.testing.assert_array_equal(out[0], np.broadcast_to(colour_image.mean(axis=(0, 1)), colour_image.shape))
    np.testing.assert_array_equal(out[1][:, :6], colour_image[:, :6])
    expected = cv2.inpaint(np.rint(colour_image).astype(np.uint8), (~keep[1]).astype(np.uint8), 3,
                           cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS)
    np.testing.assert_array_equal(out[1][:, 6:], expected[:, 6:])
    np.testing.assert_array_equal(out[2], colour_image)
    settings = ExplainSettings(segmenter="grid", grid="2x2", masker=f"inpaint_{method}", top_k=2)
    model = OnnxClassifier(conv_model(10, 12), settings)
    result = explain_array(colour_image, model.predict, settings)
    assert result.exact and np.max(np.abs(result.additivity_residual)) < 1e-10


@pytest.mark.parametrize("spec", ["nothing", "constant:abc", "constant:1,2", "constant:300", "blur:0,3", "blur:3",
                                  "mean:1", "image:", "rm -rf /", "../../etc/passwd"])
def test_bad_masker_strings_are_refused(spec):
    with pytest.raises(InvalidSettingsError):
        MaskerSpec.parse(spec)


# -- segmenters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("segmenter, extra", [
    ("slic", {"n_segments": 12, "compactness": 10}),
    ("quickshift", {"quickshift_kernel_size": 3, "quickshift_max_dist": 6}),
    ("felzenszwalb", {"felzenszwalb_scale": 50, "felzenszwalb_min_size": 10}),
    ("grid", {"grid": "4x3"}),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_segmenters_label_zero_to_m_minus_one(rng, segmenter, extra, channels):
    image = np.zeros((40, 48, channels), np.float32)
    image[:20] = 200
    image[:, :24] += 40
    image += rng.uniform(0, 10, image.shape).astype(np.float32)
    labels = segment(image, ExplainSettings(segmenter=segmenter, **extra))
    assert labels.shape == (40, 48) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(labels.max() + 1)) and labels.max() >= 1
    if segmenter == "grid":
        assert labels.max() + 1 == 12


def test_user_segments_are_renumbered_whatever_their_start(tmp_path, rng):
    labels = np.repeat(np.repeat(np.array([[5, 9], [9, 1]]), 5, axis=0), 6, axis=1)
    assert set(np.unique(renumber(labels))) == {0, 1, 2}
    np.save(tmp_path / "seg.npy", labels)
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "seg.png")
    image = rng.uniform(0, 255, (10, 12, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    settings = ExplainSettings(all_classes=True)
    for path in ("seg.npy", "seg.png"):
        (run,) = explain([str(tmp_path / "x.png")], conv_model(10, 12), settings, segments=str(tmp_path / path))
        assert run.explanation.values.shape == (3, 3) and run.explanation.exact
    with pytest.raises(ImageError, match="is 3x4 but the image is 10x12"):
        check_segments(np.zeros((3, 4), int), (10, 12))


def test_segment_count_checks():
    with pytest.raises(InvalidSettingsError, match="n_segments"):
        ExplainSettings(n_segments=0)
    with pytest.raises(InvalidSettingsError, match="exceeds"):
        segment(np.zeros((4, 4, 3), np.float32), ExplainSettings(n_segments=17))


# -- model adapter: layouts, channels, preprocessing ------------------------------------------------
PRESETS = [("unit", 0.0, 255.0), ("raw", 0.0, 1.0), ("centered", 127.0, 128.0),
           ("imagenet", np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375]))]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("channels, preset, mean, std", [
    (channels, *preset) for channels in (1, 3) for preset in PRESETS
    if not (channels == 1 and preset[0] == "imagenet")  # the ImageNet preset is per RGB channel
])
def test_layouts_channels_and_presets(rng, layout, channels, preset, mean, std):
    weights = rng.normal(size=(8, 10, channels, 2))
    model_bytes = linear_model(weights, np.ones(2), layout, double=True)
    info = inspect_model(model_bytes)
    assert (info.layout, info.channels, info.height, info.width) == (layout, channels, 8, 10)
    image = rng.uniform(0, 255, (8, 10, channels)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="2x2", masker="constant:50", all_classes=True, preprocess=preset)
    model = OnnxClassifier(model_bytes, settings)
    direct = ((image.astype(np.float64) - mean) / std).reshape(-1) @ weights.reshape(-1, 2) + 1
    np.testing.assert_allclose(model.predict(image[None])[0], direct, rtol=1e-10)
    result = explain_array(image, model.predict, settings)
    np.testing.assert_allclose(result.values, linear_expected(weights, image, np.full_like(image, 50), result.segments, std=std),
                               atol=1e-6)


def test_explicit_mean_std_and_bgr_order(rng):
    weights = rng.normal(size=(6, 6, 3, 1))
    settings = ExplainSettings(mean=(10, 20, 30), std=(2, 4, 8), channel_order="bgr")
    model = OnnxClassifier(linear_model(weights, np.zeros(1), double=True), settings)
    image = rng.uniform(0, 255, (6, 6, 3))
    bgr = image[..., ::-1]
    expected = ((bgr - np.array([10, 20, 30])) / np.array([2, 4, 8])).reshape(-1) @ weights.reshape(-1, 1)
    np.testing.assert_allclose(model.predict(image[None].astype(np.float32))[0], expected, rtol=1e-6)


def test_output_transforms(rng):
    weights = rng.normal(size=(4, 4, 3, 3)) * 0.01
    model_bytes = linear_model(weights, np.zeros(3), double=True)
    image = rng.uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)
    raw = OnnxClassifier(model_bytes, ExplainSettings()).predict(image)
    soft = OnnxClassifier(model_bytes, ExplainSettings(output="softmax")).predict(image)
    np.testing.assert_allclose(soft, np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True))
    probabilities = OnnxClassifier(conv_model(4, 4), ExplainSettings()).predict(image)
    logits = OnnxClassifier(conv_model(4, 4), ExplainSettings(output="logit")).predict(image)
    np.testing.assert_allclose(logits, np.log(probabilities / (1 - probabilities)), rtol=1e-6)


def test_layout_detection_and_forcing():
    ambiguous = linear_model(np.zeros((3, 3, 3, 2)), np.zeros(2), "nchw")
    with pytest.raises(ModelError, match="--layout"):
        inspect_model(ambiguous)
    assert inspect_model(ambiguous, layout="nchw").layout == "nchw"


# -- images ---------------------------------------------------------------------------------------
def test_resize_and_centre_crop(rng, tmp_path):
    image = rng.uniform(0, 255, (60, 90, 3)).astype(np.float32)
    assert fit_to_model(image, (40, 40), "40", "40", "x").shape == (40, 40, 3)
    assert fit_to_model(image, (32, 48), "32x48", None, "x").shape == (32, 48, 3)
    assert fit_to_model(image, (None, None), None, None, "x").shape == (60, 90, 3)
    with pytest.raises(ImageError, match="--resize 40x40"):
        fit_to_model(image, (40, 40), None, None, "x")
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "a.png")
    grey = load_image(str(tmp_path / "a.png"), channels=1)
    assert grey.shape == (60, 90, 1)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ImageError, match="cannot read"):
        load_image(str(tmp_path / "bad.png"), 3)
    with pytest.raises(ImageError, match="limit"):
        load_image(str(tmp_path / "a.png"), 3, max_pixels=100)


@pytest.mark.parametrize("layout, channels, masker, double", [("nchw", 3, "mean", False), ("nhwc", 3, "blur:3,3", False),
                                                               ("nhwc", 1, "constant:0", False), ("nchw", 1, "constant:200", False),
                                                               ("nchw", 3, "constant:90,10,250", True)])
def test_masking_fused_into_the_model_gives_identical_values(rng, layout, channels, masker, double):
    """The fused graph selects pixels with keep * image + (not keep) * background: exact for finite
    values, so the answers equal the numpy path's bit for bit, in float32 and float64 models."""
    from shapfleet.workers.engine.evaluation import coalition_predictor
    from shapfleet.workers.engine.planning import plan_explanation

    image = rng.uniform(0, 255, (12, 12, channels)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="3x4", masker=masker, all_classes=True, nsamples=600, batch_size=16)
    # onnxruntime has no float64 Conv on the CPU: the float64 case is a linear model.
    model_bytes = (linear_model(rng.normal(size=(12, 12, channels, 3)), rng.normal(size=3), layout=layout, double=True)
                   if double else conv_model(12, 12, channels=channels, layout=layout))
    model = OnnxClassifier(model_bytes, settings)
    plan = plan_explanation(image, model.predict, settings)
    assert coalition_predictor(model, plan) is not None  # the fused path is really taken
    fused = explain_array(image, model.predict, settings)
    numpy_path = explain_array(image, model.predict, settings, fuse=False)
    np.testing.assert_array_equal(fused.values, numpy_path.values)
    np.testing.assert_array_equal(fused.std, numpy_path.std)


def test_non_finite_model_inputs_are_not_fused(rng):
    """0 * inf is NaN, so the fused selection is exact only for finite inputs: a normalisation that
    overflows (a tiny std) takes the numpy path, which composes by selection."""
    from shapfleet.workers.engine.evaluation import coalition_predictor
    from shapfleet.workers.engine.fused import selection_is_exact
    from shapfleet.workers.engine.planning import plan_explanation

    finite = np.zeros((1, 3, 4, 4), np.float32)
    assert selection_is_exact(finite, finite)
    assert not selection_is_exact(finite, np.full_like(finite, np.inf))
    assert not selection_is_exact(np.full_like(finite, np.nan), finite)
    image = rng.uniform(1, 255, (12, 12, 3)).astype(np.float32)
    fine = ExplainSettings(segmenter="grid", grid="3x4", masker="constant:0", all_classes=True, nsamples=100)
    overflowing = fine.replace(preprocess=None, mean=(0.0,), std=(1e-40,))  # 255 / 1e-40 is inf in float32
    plan = plan_explanation(image, lambda x: np.ones((len(x), 3)), fine)
    assert coalition_predictor(OnnxClassifier(conv_model(12, 12), fine), plan) is not None
    with np.errstate(over="ignore"):
        assert coalition_predictor(OnnxClassifier(conv_model(12, 12), overflowing), plan) is None


class _ReportsCuda:
    """A CPU onnxruntime session that says it runs on the CUDA provider, recording each batch's rows."""

    def __init__(self, session) -> None:
        self.session, self.batches = session, []

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_provider_options(self) -> dict:
        return {"CUDAExecutionProvider": {"device_id": "0"}}

    def run(self, names, feed, run_options=None):
        (batch,) = feed.values()
        self.batches.append(len(batch))
        return self.session.run(names, feed)


def test_on_a_gpu_every_batch_runs_at_the_batch_size(rng):
    """onnxruntime's CUDA convolutions re-plan on every change of batch shape, so on a GPU the last,
    smaller batch of each shard (and the planning batch) is padded to ``batch_size``; the padding's
    outputs are dropped and the values do not change. On the CPU batches run as they come."""
    from shapfleet.workers.engine.model import ModelSessions
    from shapfleet.workers.engine.sessions import create_session

    image = rng.uniform(0, 255, (12, 12, 3)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="3x4", masker="mean", all_classes=True, nsamples=300, batch_size=32)
    model_bytes = conv_model(12, 12, channels=3, layout="nchw")
    cpu = OnnxClassifier(model_bytes, settings, providers=["CPUExecutionProvider"])
    plain = _ReportsCuda(create_session(model_bytes, ["CPUExecutionProvider"]))
    gpu_like = OnnxClassifier(model_bytes, settings, sessions=ModelSessions(model_bytes, plain=plain))
    assert cpu.fixed_batch is None and gpu_like.fixed_batch == 32
    expected = explain_array(image, cpu.predict, settings, fuse=False)
    padded = explain_array(image, gpu_like.predict, settings, fuse=False)
    recorded = gpu_like.session.batches
    assert set(recorded) == {32} and len(recorded) > 2
    np.testing.assert_allclose(padded.values, expected.values, rtol=0, atol=1e-9)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_on_the_cpu_an_unset_batch_size_runs_small_runs_and_a_given_one_runs_whole(rng, monkeypatch, fuse, threads):
    """Unset, ``batch_size`` composes 64 masked images at a time and onnxruntime runs at most
    ``CPU_RUN_INPUT_BYTES`` of model input at once (``CPU_SIDE_BY_SIDE_RUN_INPUT_BYTES`` with runs
    side by side), in runs as even as they divide; given, each batch is one run of that many
    images. The values are the same to the last bit."""
    from shapfleet.workers.engine import model as model_module
    from shapfleet.workers.engine.fused import CoalitionPredictor

    runs: list[int] = []
    for cls in (OnnxClassifier, CoalitionPredictor):
        def recording(self, batch, _original=cls._run):
            runs.append(len(batch))
            return _original(self, batch)
        monkeypatch.setattr(cls, "_run", recording)
    image = rng.uniform(0, 255, (12, 12, 3)).astype(np.float32)
    monkeypatch.setattr(model_module, "CPU_RUN_INPUT_BYTES", 5 * 3 * 12 * 12 * 4 + 100)  # 5 float32 3x12x12 images
    monkeypatch.setattr(model_module, "CPU_SIDE_BY_SIDE_RUN_INPUT_BYTES", 3 * 3 * 12 * 12 * 4 + 100)  # 3 of them
    most = 5 if threads == 1 else 3
    unset = ExplainSettings(segmenter="grid", grid="3x4", masker="mean", all_classes=True, nsamples=300)
    given = unset.replace(batch_size=64)
    values = {}
    for name, settings in (("unset", unset), ("given", given)):
        runs.clear()
        classifier = OnnxClassifier(conv_model(12, 12, channels=3, layout="nchw"), settings,
                                    providers=["CPUExecutionProvider"], threads=threads)
        values[name] = explain_array(image, classifier.predict, settings, fuse=fuse).values
        recorded = list(runs)
        if name == "unset":
            assert max(recorded) == most
            assert recorded.count(most - 1) + recorded.count(most) >= len(recorded) - 3
        else:
            assert max(recorded) == 64 and recorded.count(64) >= 3
    assert unset.images_per_batch == 64 and given.images_per_batch == 64
    np.testing.assert_array_equal(values["unset"], values["given"])


@pytest.mark.parametrize("fuse", [True, False])
def test_on_the_cpu_runs_go_side_by_side_on_one_thread_each_and_give_the_same_values(rng, monkeypatch, fuse):
    """With two threads, the sessions run on one intra-op thread each and two runs are in flight at
    once (the evaluation starts a batch before adding up the last); with one thread, one run at a
    time. The values are the same to the last bit. A job that gives ``batch_size`` runs each batch
    whole on a session with both threads."""
    import time

    from shapfleet.workers.engine.fused import CoalitionPredictor
    from shapfleet.workers.engine.model import ModelSessions

    in_flight, most = [0], [0]
    lock = threading.Lock()
    for cls in (OnnxClassifier, CoalitionPredictor):
        def counting(self, batch, _original=cls._run):
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            try:
                time.sleep(0.002)  # long enough for the other thread's run to start
                return _original(self, batch)
            finally:
                with lock:
                    in_flight[0] -= 1
        monkeypatch.setattr(cls, "_run", counting)
    image = rng.uniform(0, 255, (12, 12, 3)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="3x4", masker="mean", all_classes=True, nsamples=300)
    model_bytes = conv_model(12, 12, channels=3, layout="nchw")
    values = {}
    for threads in (1, 2):
        most[0] = 0
        classifier = OnnxClassifier(model_bytes, settings, providers=["CPUExecutionProvider"], threads=threads)
        values[threads] = explain_array(image, classifier.predict, settings, fuse=fuse).values
        assert most[0] == threads
        assert (classifier.runs is None) == (threads == 1)
        assert classifier.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_array_equal(values[1], values[2])

    sessions = ModelSessions(model_bytes, ["CPUExecutionProvider"], threads=2)
    given = OnnxClassifier(model_bytes, settings.replace(batch_size=64), sessions=sessions)
    unset = OnnxClassifier(model_bytes, settings, sessions=sessions)
    assert given.runs is None and given.session.get_session_options().intra_op_num_threads == 2
    assert unset.runs is not None and unset.session is not given.session
    most[0] = 0
    np.testing.assert_array_equal(explain_array(image, given.predict, settings.replace(batch_size=64), fuse=fuse).values,
                                  values[1])
    assert most[0] == 1


def test_sessions_built_ahead_are_built_on_a_thread_while_the_caller_goes_on(rng, monkeypatch):
    """``build_ahead`` returns at once and builds the plain and the fused session on another thread
    (the in-process run decodes and segments the image meanwhile); each is taken at its first use,
    the classifier made meanwhile does not wait for it, and a model that cannot load raises its
    ModelError there. A build that waited for the caller would deadlock here: the builder gives up
    after 10 s and the test fails."""
    from shapfleet.workers.engine import model as model_module
    from shapfleet.workers.engine.model import ModelSessions, uses_fused_masking

    release, builders = threading.Event(), []
    original = model_module.create_session

    def gated(model_bytes, providers=None, threads=None):
        builders.append(threading.current_thread())
        if not release.wait(10):
            raise AssertionError("the caller waited for the build")
        return original(model_bytes, providers, threads)

    monkeypatch.setattr(model_module, "create_session", gated)
    settings = ExplainSettings(segmenter="grid", grid="3x3", masker="constant:0", top_k=1, nsamples=100)
    assert uses_fused_masking(settings)
    assert not uses_fused_masking(settings.replace(masker="inpaint_telea"))
    assert not uses_fused_masking(ExplainSettings(method="partition", masker="constant:0"))
    model_bytes = conv_model(12, 12, channels=3, layout="nchw")
    sessions = ModelSessions(model_bytes, ["CPUExecutionProvider"], threads=2)
    ahead = OnnxClassifier(model_bytes, settings, sessions=sessions, build_ahead=True)
    again = OnnxClassifier(model_bytes, settings, sessions=sessions)  # the plan step's: it must not wait either
    assert sessions.is_building("plain") and sessions.is_building(f"fused-{ahead.info.layout}")
    release.set()
    image = rng.uniform(0, 255, (12, 12, 3)).astype(np.float32)
    built_ahead = explain_array(image, again.predict, settings).values
    assert not sessions.is_building("plain") and not sessions.is_building(f"fused-{ahead.info.layout}")
    assert len(builders) == 2 and all(b is not threading.current_thread() for b in builders)
    plain = OnnxClassifier(model_bytes, settings, providers=["CPUExecutionProvider"], threads=2)
    np.testing.assert_array_equal(built_ahead, explain_array(image, plain.predict, settings).values)

    def failing(model_bytes, providers=None, threads=None):
        raise ModelError("onnxruntime cannot load the model: built to fail")

    monkeypatch.setattr(model_module, "create_session", failing)
    broken = ModelSessions(model_bytes, ["CPUExecutionProvider"], threads=2)
    classifier = OnnxClassifier(model_bytes, settings, sessions=broken, build_ahead=True)
    with pytest.raises(ModelError, match="built to fail"):
        classifier.predict(image[None])


def test_inpainting_is_not_fused(colour_image):
    from shapfleet.workers.engine.evaluation import coalition_predictor
    from shapfleet.workers.engine.planning import plan_explanation

    model = OnnxClassifier(conv_model(10, 12), ExplainSettings())
    plan = plan_explanation(colour_image, model.predict, ExplainSettings(segmenter="grid", grid="2x2", masker="inpaint_telea"))
    assert coalition_predictor(model, plan) is None


@pytest.mark.parametrize("fuse", [True, False])
def test_models_with_a_fixed_batch_dimension(rng, fuse):
    """A model exported with batch 1 (or 4) runs in chunks of exactly that size, padded at the end,
    and gives the dynamic-batch model's values."""
    image = rng.uniform(0, 255, (12, 12, 3)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="3x3", masker="mean", all_classes=True, batch_size=10)
    dynamic = OnnxClassifier(conv_model(12, 12), settings)
    expected = explain_array(image, dynamic.predict, settings, fuse=fuse).values
    for batch in (1, 4):
        fixed = OnnxClassifier(conv_model(12, 12, batch=batch), settings)
        assert fixed.info.batch == batch
        np.testing.assert_allclose(explain_array(image, fixed.predict, settings, fuse=fuse).values, expected, atol=1e-6)


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="needs an onnxruntime without the CUDA provider")
def test_a_gpu_session_that_falls_back_to_the_cpu_says_so(caplog):
    """onnxruntime quietly runs on the next provider when CUDA cannot start (a CPU-only build here,
    missing CUDA libraries on a GPU host): the worker's log must say so."""
    import logging

    from shapfleet.workers.engine.sessions import create_session

    with caplog.at_level(logging.WARNING, logger="shapfleet.workers.engine.sessions"), pytest.warns(UserWarning):
        session = create_session(conv_model(8, 8), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert "could not start CUDAExecutionProvider and runs this model on CPUExecutionProvider" in caplog.text


def test_the_cuda_provider_keeps_float32_arithmetic():
    from shapfleet.workers.engine.sessions import cuda_provider

    assert cuda_provider("CUDAExecutionProvider") == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert cuda_provider(("CUDAExecutionProvider", {"device_id": 1})) == ("CUDAExecutionProvider",
                                                                          {"use_tf32": "0", "device_id": 1})
    assert cuda_provider(("CUDAExecutionProvider", {"use_tf32": "1"}))[1]["use_tf32"] == "1"  # an explicit choice stays
    assert cuda_provider("CPUExecutionProvider") == "CPUExecutionProvider"


def test_a_trial_load_runs_in_a_bounded_child_process():
    """Loading an uploaded model happens in a child process with graph optimisation off, under a
    memory ceiling and a timeout; each bound refuses with a message saying which."""
    from conftest import REPO

    from shapfleet.workers.engine.sessions import trial_load

    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    trial_load(model, seconds=60, memory_bytes=4 << 30)
    with pytest.raises(ModelError, match="needs more than 50000000 bytes of memory"):
        trial_load(model, seconds=60, memory_bytes=50_000_000)
    with pytest.raises(ModelError, match="took longer than 0.01 s"):
        trial_load(model, seconds=0.01, memory_bytes=4 << 30)
    with pytest.raises(ModelError, match="onnxruntime cannot load the model"):
        trial_load(b"\x08\x07 not a model", seconds=60, memory_bytes=4 << 30)


def test_statically_huge_tensors_are_refused_before_anything_runs():
    from onnx_models import expanding_model

    from shapfleet.workers.engine.inspection import check_tensor_sizes

    check_tensor_sizes(expanding_model("tile", side=100), 512 << 20)
    for op in ("tile", "expand", "matmul", "constant_of_shape"):
        with pytest.raises(ModelError, match="15000x15000 \\(900000000 bytes\\); the limit is"):
            check_tensor_sizes(expanding_model(op), 512 << 20)


def _encoded(image, fmt: str = "PNG", **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_every_image_mode_decodes_to_the_pixels_a_viewer_shows():
    """16-bit greyscale (scaled, not clipped to white), palette, LA, 1-bit and CMYK images decode to
    the 0..255 pixels a viewer shows them with, in greyscale and in colour."""
    from PIL import Image

    from shapfleet.workers.engine.images import load_image

    ramp16 = np.linspace(0, 65535, 8 * 8).reshape(8, 8).astype(np.uint16)
    grey = load_image(_encoded(Image.fromarray(ramp16)), 1)[:, :, 0]
    np.testing.assert_allclose(grey, ramp16 / 257.0, atol=1e-3)
    assert grey.min() == 0 and abs(grey.max() - 255) < 1e-3 and 100 < grey.mean() < 155
    np.testing.assert_allclose(load_image(_encoded(Image.fromarray(ramp16)), 3), np.repeat(grey[:, :, None], 3, 2))
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    np.testing.assert_array_equal(load_image(_encoded(palette), 3), np.asarray(palette.convert("RGB")))
    la = Image.fromarray(np.stack([rgb[:, :, 0], rgb[:, :, 1]], axis=2), mode="LA")
    np.testing.assert_array_equal(load_image(_encoded(la), 1)[:, :, 0], rgb[:, :, 0])
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.abs(load_image(_encoded(cmyk, "TIFF"), 3) - rgb).max() <= 1
    bits = Image.fromarray(rgb[:, :, 0] > 127)
    np.testing.assert_array_equal(load_image(_encoded(bits), 1)[:, :, 0], np.where(rgb[:, :, 0] > 127, 255, 0))


def test_exif_orientation_is_applied():
    """A photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) is read
    upright, as a viewer shows it."""
    from PIL import Image

    from shapfleet.workers.engine.images import load_image

    stored = np.zeros((4, 6, 3), np.uint8)
    stored[0, 0] = 255  # top-left as stored: top-right once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = load_image(_encoded(Image.fromarray(stored), exif=exif), 3)
    assert pixels.shape == (6, 4, 3)
    assert pixels[0, 3].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [0, 0, 0]
