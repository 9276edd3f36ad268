"""The engine's SLIC against scikit-image's public ``slic``: the same labels, bit for bit."""

import subprocess
import sys

import numpy as np
import pytest
from skimage import data
from skimage.segmentation import slic as skimage_slic
from skimage.transform import resize

from shapfleet.workers.engine.segmentation import segment
from shapfleet.workers.engine.settings import ExplainSettings
from shapfleet.workers.engine.slic import slic


def _reference(pixels: np.ndarray, n_segments: int, compactness: float, sigma: float) -> np.ndarray:
    return skimage_slic(pixels, n_segments=n_segments, compactness=compactness, sigma=sigma,
                        channel_axis=-1 if pixels.ndim == 3 else None, start_label=0)


def _photo(shape: tuple[int, int]) -> np.ndarray:
    return (resize(data.chelsea(), shape, anti_aliasing=True) * 255).astype(np.uint8)


IMAGES = {
    "photo 224x224": _photo((224, 224)),
    "photo 37x61": _photo((37, 61)),
    "grey camera 64x80": (resize(data.camera(), (64, 80), anti_aliasing=True) * 255).astype(np.uint8),
    "noise rgb 31x29": np.random.default_rng(0).integers(0, 256, (31, 29, 3), dtype=np.uint8),
    "noise grey 28x28": np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8),
    "two levels grey": np.repeat(np.array([[0, 255]], dtype=np.uint8), 14, axis=1).repeat(28, axis=0),
    "constant rgb": np.full((16, 16, 3), 200, dtype=np.uint8),
    "one pixel grey": np.array([[7]], dtype=np.uint8),
}
SETTINGS = [(50, 30.0, 3.0), (200, 10.0, 0.0), (12, 0.1, 1.0), (1, 10.0, 0.5)]


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("n_segments, compactness, sigma", SETTINGS)
def test_labels_equal_scikit_image_slic(name, n_segments, compactness, sigma):
    pixels = IMAGES[name]
    n_segments = min(n_segments, pixels.shape[0] * pixels.shape[1])
    ours = slic(pixels, n_segments, compactness, sigma)
    np.testing.assert_array_equal(ours, _reference(pixels, n_segments, compactness, sigma))
    assert ours.shape == pixels.shape[:2]


def test_the_mnist_tutorial_segmentation_is_unchanged():
    """dianna's MNIST setting (200 segments on 28x28, sigma 0) through ``segment``."""
    digit = np.zeros((28, 28, 1), dtype=np.float32)
    digit[6:22, 12:16] = 255.0
    digit[6:9, 9:16] = 180.0
    settings = ExplainSettings(n_segments=200, sigma=0)
    labels = segment(digit, settings)
    reference = _reference(digit[:, :, 0].astype(np.uint8), 200, settings.compactness, 0.0)
    np.testing.assert_array_equal(labels, np.unique(reference, return_inverse=True)[1].reshape(28, 28))


def test_slic_imports_no_scipy():
    """scikit-image's ``slic`` module imports ``scipy.cluster`` and ``scipy.spatial`` (half a second)
    for a masked start the engine never uses; its Lab conversion and scipy's smoothing cost 0.3 s more
    of imports. A colour photo with smoothing, and a grey image without, import no scipy at all."""
    code = ("import sys, numpy as np\n"
            "from shapfleet.workers.engine.segmentation import segment\n"
            "from shapfleet.workers.engine.settings import ExplainSettings\n"
            "grey = np.random.default_rng(0).uniform(0, 255, (28, 28, 1)).astype(np.float32)\n"
            "assert segment(grey, ExplainSettings(n_segments=50, sigma=0)).max() > 10\n"
            "photo = np.random.default_rng(1).uniform(0, 255, (64, 64, 3)).astype(np.float32)\n"
            "assert segment(photo, ExplainSettings(n_segments=50, compactness=30, sigma=3)).max() > 10\n"
            "print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith(('scipy.', 'skimage.color', "
            "'skimage.segmentation.slic_superpixels'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("shape", [(1, 224, 224, 3), (1, 5, 7, 3), (1, 1, 1, 3), (2, 3, 3)])
def test_lab_conversion_equals_scikit_image_exactly(shape):
    from skimage.color import rgb2lab

    from shapfleet.workers.engine.slic import rgb_to_lab

    rgb = np.random.default_rng(len(shape)).uniform(0, 1, shape)
    rgb.flat[:4] = [0.0, 0.04045, 1.0, 0.0001]  # both sides of the linear segment's edge
    np.testing.assert_array_equal(rgb_to_lab(rgb), rgb2lab(rgb))


@pytest.mark.parametrize("shape", [(1, 224, 224, 3), (1, 13, 5, 1), (1, 1, 1, 3), (1, 2, 40, 3)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 7.3])
def test_smoothing_equals_scipy_gaussian_filter_exactly(shape, sigma):
    """Every spatial axis and the one-slice depth axis, edges shorter than the kernel included."""
    from scipy import ndimage

    from shapfleet.workers.engine.slic import gaussian_smooth

    image = np.random.default_rng(3).normal(50, 30, shape)
    ours = image
    for axis in range(3):
        ours = gaussian_smooth(ours, sigma, axis)
    reference = ndimage.gaussian_filter(image, [sigma, sigma, sigma, 0.0], mode="reflect", cval=0, truncate=4.0)
    np.testing.assert_array_equal(ours, reference)
