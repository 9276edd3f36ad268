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
