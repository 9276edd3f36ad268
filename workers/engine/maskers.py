"""Maskers: what a hidden superpixel becomes.

A masker turns a batch of pixel masks (True = the pixel's superpixel is in the coalition, so it keeps
the image's value) into the images the model sees. Two kinds exist:

- :class:`BackgroundMasker` holds N fixed background images (``constant``, ``mean``, ``blur``,
  ``image``, ``dataset``). A coalition yields N composites ``where(mask, image, background_n)``; the
  game's value v(z) is the mean model output over them (N = 1 except for ``dataset``).
- :class:`InpaintMasker` fills the hidden pixels of each composite from the visible ones with OpenCV
  inpainting (radius 3), as shap's ``Image("inpaint_telea"|"inpaint_ns")`` does, so its fill depends
  on the coalition. With every pixel hidden it uses the image's per-channel mean, as shap does.

Both are rebuilt on a worker from plain arrays (``kind`` + ``backgrounds``), never from file paths.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shapfleet.errors import ImageError, InvalidSettingsError

from .images import as_pixel_array
from .settings import MaskerSpec

INPAINT_RADIUS = 3


@dataclass(frozen=True)
class BackgroundMasker:
    """Fixed backgrounds, float32 ``N x H x W x C`` in 0..255 pixel units."""

    backgrounds: np.ndarray
    kind: str = "background"

    @property
    def n_backgrounds(self) -> int:
        return int(self.backgrounds.shape[0])

    def compose(self, image: np.ndarray, pixel_masks: np.ndarray) -> np.ndarray:
        """``B x H x W`` (or per channel, ``B x H x W x C``) bool masks -> ``(B * N) x H x W x C``
        composites, coalition-major."""
        keep = pixel_masks[:, None, :, :, None] if pixel_masks.ndim == 3 else pixel_masks[:, None]
        composites = np.where(keep, image[None, None], self.backgrounds[None])
        return composites.reshape((-1,) + image.shape).astype(np.float32, copy=False)


@dataclass(frozen=True)
class InpaintMasker:
    """Coalition-dependent fill by OpenCV inpainting (``method``: ``telea`` or ``ns``)."""

    method: str

    @property
    def kind(self) -> str:
        return f"inpaint_{self.method}"

    n_backgrounds = 1
    backgrounds = None

    def compose(self, image: np.ndarray, pixel_masks: np.ndarray) -> np.ndarray:
        import cv2

        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        if pixel_masks.ndim == 4:  # per-channel masks: a pixel with any channel hidden is inpainted (as shap)
            pixel_masks = pixel_masks.all(axis=3)
        pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        out = np.empty((len(pixel_masks),) + image.shape, dtype=np.float32)
        for i, keep in enumerate(pixel_masks):
            if keep.all():
                out[i] = image
            elif not keep.any():
                out[i] = image.mean(axis=(0, 1))
            else:
                filled = cv2.inpaint(pixels, (~keep).astype(np.uint8), INPAINT_RADIUS, flag)
                # Inpainting round-trips through uint8; keep the visible pixels exact.
                out[i] = np.where(keep[:, :, None], image, filled.reshape(image.shape))
        return out


Masker = BackgroundMasker | InpaintMasker


def build_masker(spec: MaskerSpec, image: np.ndarray,
                 load_image: Callable[[str], np.ndarray] | None = None,
                 background_set: bytes | None = None) -> Masker:
    """Make the masker for ``image`` (float32 ``H x W x C``, 0..255).

    ``load_image(path)`` reads and fits a reference image for ``image:PATH`` (the caller knows the
    model's size and resize settings); ``dataset:PATH`` reads an ``.npz`` of N images from PATH, or
    from ``background_set`` (the bytes a fleet job was submitted with) when given.
    """
    channels = image.shape[2]
    if spec.kind == "mean":
        return BackgroundMasker(np.broadcast_to(image.mean(axis=(0, 1)), image.shape)[None].astype(np.float32), "mean")
    if spec.kind == "constant":
        values = np.asarray(spec.values, dtype=np.float32)
        if values.size == 3 and channels == 1:
            raise InvalidSettingsError(f"masker {spec}: the model takes 1 channel; give one constant value")
        return BackgroundMasker(np.broadcast_to(values, image.shape)[None].astype(np.float32), "constant")
    if spec.kind == "blur":
        import cv2

        kx, ky = (int(v) for v in spec.values)
        blurred = cv2.blur(image, (kx, ky), borderType=cv2.BORDER_REFLECT_101)
        return BackgroundMasker(blurred.reshape(image.shape)[None].astype(np.float32), "blur")
    if spec.kind in ("inpaint_telea", "inpaint_ns"):
        return InpaintMasker(spec.kind.removeprefix("inpaint_"))
    if spec.kind == "image":
        if load_image is None:
            raise InvalidSettingsError("the image: masker needs a reference image file")
        reference = load_image(spec.path or "")
        if reference.shape != image.shape:
            raise ImageError(f"reference image {spec.path} is {reference.shape[:2]} after fitting, the image is {image.shape[:2]}")
        return BackgroundMasker(reference[None].astype(np.float32), "image")
    if spec.kind == "dataset":
        if background_set is not None:
            return BackgroundMasker(load_background_set(io.BytesIO(background_set), image.shape, "the background set"),
                                    "dataset")
        return BackgroundMasker(load_background_set(spec.path or "", image.shape), "dataset")
    raise InvalidSettingsError(f"unknown masker {spec}")


def load_background_set(source: str | os.PathLike[str] | io.BytesIO, shape: tuple[int, ...],
                        name: str | None = None) -> np.ndarray:
    """Read N background images from an ``.npz`` (array ``images``, else its only array), in 0..255
    pixel units, shaped ``N x H x W`` or ``N x H x W x C``."""
    path = name or str(source)
    try:
        with np.load(source, allow_pickle=False) as archive:
            names = list(archive.files)
            if "images" in names:
                array = archive["images"]
            elif len(names) == 1:
                array = archive[names[0]]
            else:
                raise ImageError(f"{path} holds {names}; name the background array 'images'")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ImageError(f"cannot read the background set {path}: {e}") from e
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        raise ImageError(f"the background set {path} must be N x H x W (x C) with N >= 1, got {array.shape}")
    images = np.stack([as_pixel_array(a, shape[2], f"{path}[{i}]") for i, a in enumerate(array)])
    if images.shape[1:] != tuple(shape):
        raise ImageError(f"the background set {path} holds {images.shape[1]}x{images.shape[2]} images; the image is {shape[0]}x{shape[1]}")
    return images


def masker_from_arrays(kind: str, backgrounds: np.ndarray | None) -> Masker:
    """Rebuild a masker on a worker from what :func:`masker_arrays` stored."""
    if kind.startswith("inpaint_"):
        return InpaintMasker(kind.removeprefix("inpaint_"))
    if backgrounds is None:
        raise InvalidSettingsError(f"masker {kind} needs its background arrays")
    return BackgroundMasker(np.asarray(backgrounds, dtype=np.float32), kind)
