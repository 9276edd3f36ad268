"""The renderer's own pieces against what they replace: its percentile against numpy's, its PNG
writer (grey and RGB) against what Pillow decodes."""

import io

import numpy as np
import pytest
from PIL import Image

from shapfleet.workers.engine import rendering


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

    assert rendering._deflate.__module__.startswith("isal")
    pixels = np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8).repeat(7, axis=0)
    with_isal = rendering.png_bytes(pixels)
    monkeypatch.setattr(rendering, "_deflate", zlib.compress)
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
