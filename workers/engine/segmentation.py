"""Superpixels: the players of the Shapley game.

Every segmenter returns an ``H x W`` int32 label image whose labels are exactly ``0..M-1`` (renumbered
in order of first appearance in sorted label order), whatever label the underlying algorithm starts
from and whether or not it leaves gaps.
"""

from __future__ import annotations

import io
import os

import numpy as np

from shapfleet.errors import ImageError, InvalidSettingsError

from .settings import ExplainSettings


def renumber(labels: np.ndarray) -> np.ndarray:
    """Map the distinct values of ``labels`` to ``0..M-1`` preserving their order."""
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    return inverse.reshape(np.shape(labels)).astype(np.int32)


def segment(image: np.ndarray, settings: ExplainSettings) -> np.ndarray:
    """Segment a float32 ``H x W x C`` 0..255 image with the segmenter named in ``settings``.

    SLIC, quickshift and Felzenszwalb see the image as uint8, so that scikit-image scales it to
    [0, 1] (and to Lab for colour SLIC) the same way whatever the model's preprocessing is.
    """
    height, width, channels = image.shape
    if settings.segmenter == "grid":
        rows, cols = settings.grid_shape
        if rows > height or cols > width:
            raise InvalidSettingsError(f"grid {rows}x{cols} has more cells than the {height}x{width} image has pixels")
        row_index = np.arange(height) * rows // height
        col_index = np.arange(width) * cols // width
        return renumber(row_index[:, None] * cols + col_index[None, :])
    if settings.segmenter == "slic" and settings.n_segments > height * width:
        raise InvalidSettingsError(
            f"n_segments={settings.n_segments} exceeds the image's {height * width} pixels"
        )
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if settings.segmenter == "slic":
        from .slic import slic

        return renumber(slic(pixels if channels == 3 else pixels[:, :, 0], settings.n_segments,
                             settings.compactness, settings.sigma))
    from skimage import segmentation as sk  # imported here: scikit-image's segmentation is slow to import

    if settings.segmenter == "quickshift":
        rgb = pixels if channels == 3 else np.repeat(pixels, 3, axis=2)
        labels = sk.quickshift(
            rgb,
            kernel_size=settings.quickshift_kernel_size,
            max_dist=settings.quickshift_max_dist,
            ratio=settings.quickshift_ratio,
            sigma=settings.sigma,
            rng=0,
        )
    else:
        labels = sk.felzenszwalb(
            pixels if channels == 3 else pixels[:, :, 0],
            scale=settings.felzenszwalb_scale,
            sigma=settings.sigma,
            min_size=settings.felzenszwalb_min_size,
            channel_axis=-1 if channels == 3 else None,
        )
    return renumber(labels)


def load_segments(source: str | os.PathLike[str] | bytes, shape: tuple[int, int], name: str | None = None) -> np.ndarray:
    """Read a user label image, a file or its bytes (``.npy`` integer array, or a PNG whose pixel
    values are labels), and check it against the image's ``shape``."""
    name = name or (str(source) if not isinstance(source, bytes) else "the segments")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    is_npy = source[:6] == b"\x93NUMPY" if isinstance(source, bytes) else str(source).lower().endswith(".npy")
    try:
        if is_npy:
            labels = np.load(stream, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(stream) as img:
                labels = np.asarray(img)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read the segments file {name}: {e}") from e
    return check_segments(labels, shape, name)


def check_segments(labels: np.ndarray, shape: tuple[int, int], name: str = "segments") -> np.ndarray:
    """Validate a user label array against the image shape and renumber it."""
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[2] in (3, 4):
        # A colour label PNG: each distinct colour is one superpixel.
        rgb = labels[:, :, :3].astype(np.int64)
        labels = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ImageError(f"{name} must be a 2-D integer label image, got {labels.dtype} of shape {labels.shape}")
    if tuple(labels.shape) != tuple(shape):
        raise ImageError(f"{name} is {labels.shape[0]}x{labels.shape[1]} but the image is {shape[0]}x{shape[1]}")
    return renumber(labels)


def adjacent_superpixels(segments: np.ndarray) -> np.ndarray:
    """``M x M`` bool: which superpixels touch, i.e. have pixels that are horizontal or vertical
    neighbours (4-connectivity; the diagonal is False). ``segments``: labels ``0..M-1``."""
    labels = np.asarray(segments, dtype=np.int64)
    n_superpixels = int(labels.max()) + 1
    adjacency = np.zeros((n_superpixels, n_superpixels), dtype=bool)
    for first, second in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        differ = first != second
        adjacency[first[differ], second[differ]] = True
    adjacency |= adjacency.T
    return adjacency
