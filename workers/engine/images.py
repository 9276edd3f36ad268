"""Reading images into float32 ``H x W x C`` arrays of 0..255 pixels, and fitting them to a model.

Decoding is guarded: a pixel-count limit is checked from the header before any pixel is decoded
(decompression bombs), and truncated or unreadable files raise :class:`ImageError`.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from shapfleet.errors import ImageError

from .settings import parse_size

#: Images with more pixels than this are refused before decoding.
DEFAULT_MAX_PIXELS = 40_000_000


def load_image(source: str | os.PathLike[str] | bytes | BinaryIO, channels: int,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to a float32 ``H x W x channels`` array of 0..255 pixels.

    ``channels`` is 1 (greyscale, ITU-R 601 luma) or 3 (RGB); every mode is read as a viewer shows it
    (:func:`viewer_pixels`), turned by its EXIF orientation. ``.npy`` files are read as arrays in pixel
    units (``H x W`` or ``H x W x C``).
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".npy"):
        try:
            array = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read {name}: {e}") from e
        return as_pixel_array(array, channels, name)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{name} has {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
                if width == 0 or height == 0:
                    raise ImageError(f"{name} is empty ({width}x{height})")
                image.load()
                pixels = viewer_pixels(ImageOps.exif_transpose(image), channels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own guard (at twice its default limit) can fire before ours does.
        raise ImageError(f"{name} has more pixels than the limit of {max_pixels} ({e})") from e
    except FileNotFoundError as e:
        raise ImageError(f"no such image file: {name}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read {name} as an image: {e}") from e
    return as_pixel_array(pixels, channels, name)


#: Modes of integer pixels wider than 8 bits (16-bit PNG and TIFF greyscale), read as 0..65535.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def viewer_pixels(image: Image.Image, channels: int) -> np.ndarray:
    """The 0..255 pixels an image viewer shows, for a decoded image of any mode Pillow reads, as
    greyscale (``channels`` 1: ITU-R 601 luma) or RGB: 16-bit greyscale scaled by 255/65535 (Pillow's
    conversion would clip every value above 255 to white); palette, 1-bit, LA, CMYK, YCbCr and the
    rest through Pillow's conversion; alpha dropped. The caller applies the EXIF orientation first."""
    if image.mode in WIDE_GREY_MODES:
        wide = np.asarray(image).astype(np.float32)
        return np.clip(wide, 0, 65535) * np.float32(255 / 65535)
    return np.asarray(image.convert("L" if channels == 1 else "RGB"))


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (no pickles): how pixel arrays, label maps and round outputs are stored."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def as_pixel_array(array: np.ndarray, channels: int, name: str = "image") -> np.ndarray:
    """Check and convert an ``H x W`` or ``H x W x C`` array to float32 ``H x W x channels``."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name} must be an H x W or H x W x C array with H, W > 0, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise ImageError(f"{name} must hold finite numbers")
    if array.shape[2] == channels:
        pass
    elif array.shape[2] == 1 and channels == 3:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] in (3, 4) and channels == 1:
        array = (array[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[:, :, None]
    elif array.shape[2] == 4 and channels == 3:
        array = array[:, :, :3]
    else:
        raise ImageError(f"{name} has {array.shape[2]} channels; the model takes {channels}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    channels = image.shape[2]
    planes = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
        for c in range(channels)
    ]
    return np.stack(planes, axis=2).astype(np.float32)


def resized_size(shape: tuple[int, int], resize: str) -> tuple[int, int]:
    """The (height, width) ``resize`` gives an image of ``shape``, computed before anything is
    allocated, so a caller can check it against a pixel limit first."""
    size = parse_size(resize, "resize")
    h, w = shape
    if isinstance(size, int):
        scale = size / min(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    return size


def fit_to_model(image: np.ndarray, model_size: tuple[int | None, int | None], resize: str | None,
                 center_crop: str | None, name: str = "image") -> np.ndarray:
    """Apply ``resize`` (``N``: short side to N; ``HxW``: exactly) then ``center_crop`` (``N`` or
    ``HxW``), and check the result against the model's input size (``None`` = any size).

    This is torchvision's ``Resize(N)`` + ``CenterCrop(S)`` convention, so ``resize="256",
    center_crop="224"`` reproduces the usual ImageNet evaluation transform.
    """
    if resize is not None:
        target = resized_size(image.shape[:2], resize)
        if target != image.shape[:2]:
            image = _resize(image, *target)
    if center_crop is not None:
        size = parse_size(center_crop, "center_crop")
        ch, cw = (size, size) if isinstance(size, int) else size
        h, w = image.shape[:2]
        if ch > h or cw > w:
            raise ImageError(f"{name} is {h}x{w}, smaller than the centre crop {ch}x{cw}; resize it first")
        top, left = (h - ch) // 2, (w - cw) // 2
        image = image[top:top + ch, left:left + cw]
    want_h, want_w = model_size
    h, w = image.shape[:2]
    if (want_h is not None and want_h != h) or (want_w is not None and want_w != w):
        wanted = f"{want_h or h}x{want_w or w}"
        raise ImageError(
            f"{name} is {h}x{w} (HxW) but the model takes {wanted}; pass --resize {wanted} to resize it, "
            f"or --resize N --center-crop {wanted} to resize the short side and crop"
        )
    return np.ascontiguousarray(image, dtype=np.float32)
