"""The renderer's own pieces against what they replace: its percentile against numpy's, its PNG
writer (grey and RGB) against what Pillow decodes, its pages (which keep only the rows that differ
from the one above) against the same pages with every row drawn."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from shapfleet.workers.engine import rendering
from shapfleet.workers.engine.result import Explanation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 999, 1000, 1001, 1002, 50_176, 150_528])
def test_percentile_equals_numpy_to_the_last_bit(n):
    rng = np.random.default_rng(n)
    samples = [rng.exponential(size=n), np.abs(rng.normal(size=n)) * 1e-9, rng.integers(0, 4, n).astype(np.float64),
               np.full(n, 0.25)]
    for values in samples:
        for q in (99.9, 50.0, 0.0, 100.0, 37.5):
            assert rendering.percentile(values, q) == np.percentile(values, q), (n, q)


@pytest.mark.parametrize("shape", [(1, 1, 1), (28, 28, 1), (5, 3, 3), (224, 224, 3)])
def test_png_bytes_decode_to_the_pixels_grey_and_rgb(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    pixels[len(pixels) // 2:] = pixels[len(pixels) // 2]  # repeated rows, as upscaled panels have
    with Image.open(io.BytesIO(rendering.png_bytes(pixels))) as decoded:
        assert decoded.mode == ("L" if shape[2] == 1 else "RGB")
        assert np.array_equal(np.asarray(decoded).reshape(shape), pixels)


def test_pages_are_deflated_by_isal_and_zlib_decodes_them_as_without_it(monkeypatch):
    """The engine depends on ``isal``; where it is missing, zlib writes the same pixels."""
    import zlib

    assert rendering._compressobj.__module__.startswith("isal")
    pixels = np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8).repeat(7, axis=0)
    with_isal = rendering.png_bytes(pixels)
    monkeypatch.setattr(rendering, "_compressobj", zlib.compressobj)
    with_zlib = rendering.png_bytes(pixels)
    for data in (with_isal, with_zlib):
        with Image.open(io.BytesIO(data)) as decoded:
            assert np.array_equal(np.asarray(decoded), pixels)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_class_drawn_at_once_is_each_class_drawn_alone_to_the_byte(channels):
    """Pages draw all their classes' panels in one pass (the grey layer once); each panel is the same
    uint8 array as drawing that class alone, NaNs, zeros and values past the limit included."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (9, 7, channels)).astype(np.float32)
    values = rng.normal(size=(9, 7, 4))
    values[0, 0, 1], values[1, 1, 2], values[2, 2, 3] = np.nan, 0.0, 50.0
    limits = np.array([0.5, 1.0, 2.0, 1e-12])
    together = rendering.attribution_rgbs(image, values, limits)
    assert together.shape == (4, 9, 7, 3) and together.dtype == np.uint8
    grey = image[:, :, 0].astype(np.float64) if channels == 1 else image @ np.array([0.2989, 0.5870, 0.1140])
    grey = (grey - grey.min()) / (grey.max() - grey.min())
    base = 0.85 + 0.15 * grey[:, :, None]
    for k in range(4):  # one class alone, as the pages drew each panel before
        alone = np.nan_to_num(values[:, :, k], nan=0.0)
        alpha = np.clip(np.abs(alone) / limits[k], 0, 1)[:, :, None]
        colour = np.where(alone[:, :, None] < 0, np.array([0.0, 0.545, 0.984]), np.array([1.0, 0.0, 0.318]))
        expected = np.rint(255 * ((1 - alpha) * base + alpha * colour)).astype(np.uint8)
        np.testing.assert_array_equal(together[k], expected)
        np.testing.assert_array_equal(rendering.attribution_rgb(image, values[:, :, k], limits[k]), expected)


@pytest.mark.parametrize("strip_bytes", [1, 100, 1 << 20])
def test_png_strips_and_repeated_rows_decode_to_the_pixels(monkeypatch, strip_bytes):
    """Rows filtered and deflated a strip at a time (one row, a few, the whole image) give the same
    pixels; a row marked as repeating the one above is sent as such, whatever its own pixels hold."""
    monkeypatch.setattr(rendering, "PNG_STRIP_BYTES", strip_bytes)
    rng = np.random.default_rng(strip_bytes)
    pixels = rng.integers(0, 256, (23, 9, 3), dtype=np.uint8)
    repeats = np.zeros(23, bool)
    repeats[[3, 4, 5, 11, 22]] = True
    expected = pixels.copy()
    for r in np.flatnonzero(repeats):
        expected[r] = expected[r - 1]
    pixels[repeats] = rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)  # never read
    for given, repeated in ((expected, None), (pixels, repeats)):
        with Image.open(io.BytesIO(rendering.png_bytes(given, repeated))) as decoded:
            assert np.array_equal(np.asarray(decoded), expected)


class _EveryRowCanvas(rendering._Canvas):
    """A page that keeps every row from the start: each panel writes all its rows, as pages were
    drawn before they kept only rows that differ from the one above."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width, height)
        self.pixels[:] = 255
        self.repeats[:] = False


def _explanations():
    rng = np.random.default_rng(11)
    e = Explanation(values=rng.normal(size=(6, 3)), std=np.full((6, 3), 0.1), segments=np.arange(36).reshape(6, 6) % 6,
                    image=rng.uniform(0, 255, (6, 6, 3)), classes=np.array([0, 1, 2]), class_names=["cat", "dog", "bird"],
                    base_values=np.zeros(3), outputs=np.ones(3), all_outputs=np.array([0.5, 0.3, 0.2]),
                    n_evaluations=10, n_coalitions=10, exact=False, seed=0, settings={})
    e.values[2, 1] = np.nan
    grey = dataclasses.replace(e, image=e.image[1:, :4, :1], segments=e.segments[1:, :4],  # 5 x 4, grey
                               class_names=["a title far wider than its panel, " * 3, "dog", "bird"])
    large = dataclasses.replace(e, image=np.kron(e.image, np.ones((40, 40, 1))),  # 240 x 240: factor 1
                                segments=np.kron(e.segments, np.ones((40, 40), int)))
    return e, grey, large


def test_pages_are_the_pages_with_every_row_drawn(monkeypatch):
    """Summaries, class overlays and grids (of images of several sizes, upscaled by 34, 40 and 1,
    titles wider than their panels) decode to the same pixels as when every row is written."""
    e, grey, large = _explanations()

    def pages() -> dict[str, np.ndarray]:
        drawn = {"grid": rendering.grid_png([e, grey, large, e])}
        for name, explanation in (("e", e), ("grey", grey), ("large", large)):
            drawn[f"{name}/summary"] = rendering.summary_png(explanation)
            for k, page in enumerate(rendering.class_overlay_pngs(explanation)):
                drawn[f"{name}/class{k}"] = page
        return {name: np.asarray(Image.open(io.BytesIO(data))) for name, data in drawn.items()}

    kept_rows = []
    real_png = rendering.png_bytes
    monkeypatch.setattr(rendering, "png_bytes", lambda pixels, repeats=None: kept_rows.append(
        (~repeats).mean()) or real_png(pixels, repeats))
    drawn = pages()
    assert kept_rows[1] < 0.25 and max(kept_rows) > 0.8  # upscaled pages keep few rows, one of 240 px most
    monkeypatch.setattr(rendering, "_Canvas", _EveryRowCanvas)
    every_row = pages()
    for name in drawn:
        assert np.array_equal(drawn[name], every_row[name]), name


def test_an_images_class_pages_drawn_together_are_each_drawn_alone_to_the_byte():
    """All of an image's class pages coloured in one pass, each at its own limit, are the bytes of
    each page drawn alone, in the order asked for."""
    for explanation in _explanations():
        together = rendering.class_overlay_pngs(explanation)
        assert len(together) == len(explanation.classes) > 1
        assert together == [rendering.class_overlay_png(explanation, k) for k in range(len(together))]
        assert rendering.class_overlay_pngs(explanation, [1, 0]) == together[1::-1]
        assert len(set(together)) == len(together)


def test_text_and_panels_over_each_other_keep_the_rows_below():
    """Ink over an upscaled panel's block, a panel over text, a tick through a block: the rows below
    each show what they showed before it, as with every row written."""
    rng = np.random.default_rng(2)
    block = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    canvases = [rendering._Canvas(60, 50), _EveryRowCanvas(60, 50)]
    for canvas in canvases:
        canvas.panel(2, 3, block, 9)  # rows 3-29
        canvas.text(20, 7, "Wg", 13)  # ink inside the first block
        canvas.panel(30, 10, block[:2], 5)  # a second panel, blocks out of step with the first
        canvas.region(12, 14, 0, 60)[:] = 7  # two rows through both panels
        canvas.panel(40, 40, block, 2)  # past the page's bottom
    decoded = [np.asarray(Image.open(io.BytesIO(canvas.png()))) for canvas in canvases]
    assert np.array_equal(decoded[0], decoded[1])
    assert canvases[0].repeats.sum() > 20
