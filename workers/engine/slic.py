"""SLIC superpixels of a 2-D image, through scikit-image's compiled kernels.

This is ``skimage.segmentation.slic`` for the one case the engine uses (a 2-D uint8 image, grey or
RGB, no mask, default iterations and size factors), with the same steps in the same order, so the
labels are the same bit for bit (``tests/test_slic.py`` holds it to that; the steps and the
kernels' signatures are the same from scikit-image 0.22 to 0.26). It exists because
importing ``skimage.segmentation.slic`` imports ``scipy.cluster.vq`` and ``scipy.spatial`` for its
masked start, which the engine never uses: half a second of every explanation's start-up.
``scipy.ndimage`` (smoothing, ``sigma > 0``) and ``skimage.color`` (Lab, colour images) are imported
only when the image needs them.

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
        from skimage.color import rgb2lab

        image = rgb2lab(image)
    if sigma > 0:
        from scipy import ndimage

        # the depth axis is smoothed too, as scikit-image does: a no-op on one slice, kept for identity
        image = ndimage.gaussian_filter(image, [sigma, sigma, sigma, 0.0], mode="reflect", cval=0, truncate=4.0)

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
