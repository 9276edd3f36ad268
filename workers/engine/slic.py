"""SLIC superpixels of a 2-D image, through scikit-image's compiled kernels.

This is ``skimage.segmentation.slic`` for the one case the engine uses (a 2-D uint8 image, grey or
RGB, no mask, default iterations and size factors), with the same steps in the same order, so the
labels are the same bit for bit (``tests/test_slic.py`` holds it to that; the steps and the
kernels' signatures are the same from scikit-image 0.22 to 0.26). It exists because
importing ``skimage.segmentation.slic`` imports ``scipy.cluster.vq`` and ``scipy.spatial`` for its
masked start, which the engine never uses: half a second of every explanation's start-up. The
CIELAB conversion and the Gaussian smoothing are done here in numpy, with the operations of
``skimage.color.rgb2lab`` and ``scipy.ndimage.gaussian_filter`` in the same order (so the same
floating-point results): importing those two cost another 0.3 s, most of it scipy's array-API
set-up, for arithmetic that takes milliseconds.

The steps: scale the image to [0, 1] (uint8 / 255, then min-max), convert RGB to CIELAB, smooth
with a Gaussian of ``sigma`` pixels per spatial axis (reflected edges), seed ``~n_segments``
centres on a regular grid of step ``S``, run ten k-means iterations in (Lab or grey, y, x) space
with the colour distance divided by ``compactness`` (SLIC's ``m / S`` weighting), then merge
segments smaller than half the mean size into a neighbour.
"""

from __future__ import annotations

import math

import numpy as np

#: skimage.segmentation.slic's defaults, which the engine keeps.
MAX_ITERATIONS = 10
MIN_SIZE_FACTOR = 0.5
MAX_SIZE_FACTOR = 3.0


def slic(pixels: np.ndarray, n_segments: int, compactness: float, sigma: float) -> np.ndarray:
    """Labels ``0..K-1`` (``int``, ``H x W``) of a uint8 ``H x W`` (grey) or ``H x W x 3`` (RGB) image."""
    try:
        from skimage.segmentation._slic import _enforce_label_connectivity_cython, _slic_cython
    except ImportError:  # a scikit-image whose kernels moved: its public function, imports and all
        from skimage.segmentation import slic as skimage_slic

        colour = pixels.ndim == 3
        return skimage_slic(pixels, n_segments=n_segments, compactness=compactness, sigma=sigma,
                            channel_axis=-1 if colour else None, start_label=0)
    from skimage.util import img_as_float, regular_grid

    image = img_as_float(pixels).astype(np.float64, copy=True)
    low, high = image.min(), image.max()
    image -= low
    if high != low:
        image /= high - low
    colour = image.ndim == 3
    # the kernels work on (depth, height, width, channels)
    image = image[np.newaxis] if colour else image[np.newaxis, :, :, np.newaxis]
    if colour:
        image = rgb_to_lab(image)
    if sigma > 0:
        # the depth axis is smoothed too, as scikit-image does: one slice, so only round-off changes
        for axis in range(3):
            image = gaussian_smooth(image, sigma, axis)

    depth, height, width = image.shape[:3]
    grid = regular_grid((depth, height, width), n_segments)
    coordinates = np.mgrid[:depth, :height, :width]
    centroids = np.stack([axis[grid].ravel() for axis in coordinates], axis=-1)
    steps = [float(s.step) if s.step is not None else 1.0 for s in grid]
    segments = np.ascontiguousarray(
        np.concatenate([centroids, np.zeros((len(centroids), image.shape[3]))], axis=-1), dtype=np.float64)
    spacing = np.ones(3, dtype=np.float64)
    image = np.ascontiguousarray(image * (1.0 / compactness), dtype=np.float64)
    labels = _slic_cython(image, None, segments, max(steps), MAX_ITERATIONS, spacing, False,
                          ignore_color=False, start_label=0)
    segment_size = math.prod(image.shape[:3]) / len(centroids)
    labels = _enforce_label_connectivity_cython(labels, int(MIN_SIZE_FACTOR * segment_size),
                                                int(MAX_SIZE_FACTOR * segment_size), start_label=0)
    return labels[0]


#: sRGB (D65) to CIE XYZ, and the D65 white point for the 2-degree observer, as scikit-image has them.
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65, 2 degrees) of float64 sRGB in [0, 1] on the last axis, as ``skimage.color.rgb2lab``
    computes it: linearise (``((c + 0.055) / 1.055) ** 2.4`` above 0.04045, else ``c / 12.92``), XYZ,
    divide by the white point, ``t ** (1/3)`` above 0.008856 (else ``7.787 t + 16/116``), then
    ``L = 116 y - 16``, ``a = 500 (x - y)``, ``b = 200 (y - z)``."""
    arr = rgb.copy()
    mask = arr > 0.04045
    arr[mask] = np.power((arr[mask] + 0.055) / 1.055, 2.4)
    arr[~mask] /= 12.92
    arr = arr @ XYZ_FROM_RGB.T.astype(arr.dtype)
    arr = arr / D65_WHITE
    mask = arr > 0.008856
    arr[mask] = np.cbrt(arr[mask])
    arr[~mask] = 7.787 * arr[~mask] + 16.0 / 116.0
    x, y, z = arr[..., 0], arr[..., 1], arr[..., 2]
    return np.concatenate([c[..., np.newaxis] for c in (116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z))], axis=-1)


def gaussian_smooth(image: np.ndarray, sigma: float, axis: int, truncate: float = 4.0) -> np.ndarray:
    """``image`` (float64) correlated along ``axis`` with a Gaussian of ``sigma`` samples, truncated at
    ``truncate`` sigmas, edges extended by half-sample reflection (``d c b a | a b c d | d c b a``),
    as ``scipy.ndimage.gaussian_filter1d`` computes it: weights ``exp(-x^2 / (2 sigma^2))`` normalised
    to sum 1, and for each sample ``w_0 x_i``, then ``(x_{i-j} + x_{i+j}) w_j`` added from the
    farthest tap ``j = r`` in to ``j = 1``."""
    radius = int(truncate * float(sigma) + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * taps ** 2)
    weights = (weights / weights.sum())[::-1]
    if image.shape[axis] == 1:
        # Every reflected sample is the sample itself: the same sums, without padding an axis of one
        # (padding the depth axis of a single slice took most of the smoothing's time).
        out = image * weights[radius]
        for j in range(radius, 0, -1):
            out += (image + image) * weights[radius - j]
        return out
    moved = np.moveaxis(image, axis, -1)
    length = moved.shape[-1]
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(radius, radius)], mode="symmetric")
    out = padded[..., radius:radius + length] * weights[radius]
    for j in range(radius, 0, -1):
        out += (padded[..., radius - j:radius - j + length] + padded[..., radius + j:radius + j + length]) * weights[radius - j]
    return np.moveaxis(out, -1, axis)
