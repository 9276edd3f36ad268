"""Pictures of an explanation, in ``shap.image_plot``'s convention, drawn as arrays.

Each attribution panel is the image in greyscale at alpha 0.15 over white, and over it each pixel's
value in a map that runs from blue (negative) through transparent (zero) to red (positive), on a
symmetric scale whose limit is the 99.9th percentile of |value| (as shap does); a horizontal colour
bar with ticks says what the colours mean. Panels are composed with numpy (a colour lookup, two alpha
blends, a nearest-neighbour upscale: superpixel maps are piecewise constant) and written by Pillow,
titles included, so a figure costs milliseconds and the same inputs give the same bytes. Functions
return PNG bytes; nothing here solves or stores anything.
"""

from __future__ import annotations

import math
import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .result import Explanation

try:  # ISA-L's deflate: the pages in a sixth of zlib level 1's time, for 4% more bytes
    from isal.isal_zlib import compressobj as _compressobj
except ImportError:  # a platform without its wheels: zlib, slower, the same pixels
    _compressobj = zlib.compressobj

_BLUE = np.array([0.0, 0.545, 0.984])
_RED = np.array([1.0, 0.0, 0.318])
_GREY_ALPHA = 0.15
#: Panels are upscaled by a whole factor to at least this many pixels on their longer side.
PANEL_PIXELS = 200
_MARGIN = 12
_BAR_HEIGHT = 14


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _grey(image: np.ndarray) -> np.ndarray:
    if image.shape[2] == 1:
        return image[:, :, 0]
    return image[:, :, :3] @ np.array([0.2989, 0.5870, 0.1140])


def _scale(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)]) if values.size else values
    limit = percentile(finite, 99.9) if finite.size else 0.0
    return limit if limit > 0 else 1e-12


def percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` of a non-empty 1-D float64 array, by the same arithmetic (the
    default, linear method): the sorted values' entry at ``(n - 1) q / 100``, interpolated between
    its neighbours ``a + (b - a) t`` (``b - (b - a)(1 - t)`` from ``t = 1/2``). numpy's own imports
    ``numpy.ma`` on its first call, 13 ms of every process that draws a page."""
    n = values.size
    virtual = (n - 1) * (q / 100)
    if virtual >= n - 1:
        return float(values.max())
    low = math.floor(virtual)
    t = virtual - low
    a, b = (float(v) for v in np.partition(values, [low, low + 1])[[low, low + 1]])
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _factor(shape: tuple[int, ...], target: int = PANEL_PIXELS) -> int:
    return max(1, -(-target // max(shape[0], shape[1])))


def attribution_rgb(image: np.ndarray, pixel_values: np.ndarray, limit: float) -> np.ndarray:
    """``H x W x 3`` uint8: the greyscale image at low alpha over white, then the value map (alpha
    |value| / limit, blue below zero, red above) over that."""
    return attribution_rgbs(image, pixel_values[:, :, None], np.array([limit]))[0]


def attribution_rgbs(image: np.ndarray, pixel_values: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """``K x H x W x 3`` uint8: :func:`attribution_rgb` of each class's map (``pixel_values`` is
    ``H x W x K``) on its own limit (``limits``, K), all at once: the grey layer is computed once,
    and each pixel by the same arithmetic as alone (so the same bytes)."""
    grey = _grey(image).astype(np.float64)
    span = grey.max() - grey.min()
    grey = (grey - grey.min()) / span if span > 0 else np.zeros_like(grey)
    base = (1 - _GREY_ALPHA) + _GREY_ALPHA * grey[:, :, None]  # white under the grey layer
    values = np.moveaxis(np.nan_to_num(pixel_values.astype(np.float64), nan=0.0), -1, 0)
    alpha = np.clip(np.abs(values) / np.asarray(limits, np.float64)[:, None, None], 0, 1)[..., None]
    colour = np.where(values[..., None] < 0, _BLUE, _RED)
    return np.rint(255 * ((1 - alpha) * base + alpha * colour)).astype(np.uint8)


def _image_rgb(image: np.ndarray) -> np.ndarray:
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[:, :, :3]


@lru_cache(maxsize=16)
def _colour_bar(width: int) -> np.ndarray:
    """``_BAR_HEIGHT x width x 3``: the colour scale from -1 to +1 (of the limit) over white. It is
    drawn on the unit scale, not from -limit to +limit, so that its pixels do not depend on the
    limit's last bits (two runs whose values agree to round-off draw the same bar), and so once per
    width: a job's pages share a few widths."""
    values = np.linspace(-1.0, 1.0, width)[None].repeat(_BAR_HEIGHT, axis=0)
    bar = attribution_rgb(np.ones((_BAR_HEIGHT, width, 1)), values, 1.0)
    bar[[0, -1], :] = 0
    bar[:, [0, -1]] = 0
    bar.flags.writeable = False
    return bar


def _tick(value: float) -> str:
    return "0" if value == 0 else f"{value:.2g}"


class _Canvas:
    """A white page that panels, titles and a colour bar are placed on, then written as one PNG.

    An upscaled panel repeats each of its rows ``factor`` times, and a page of them (a 10-image grid
    is 2593 x 2608) is mostly rows equal to the one above. The page keeps a row's pixels only where
    it may differ from the row above: ``repeats[r]`` says row r equals row r - 1, and such a row is
    never written nor read. A panel first keeps the rows where its blocks start and the row below
    its end (each copied from the last kept row above, what it showed until now), then writes the
    kept rows it covers; text and ticks keep every row they touch and the one below. The PNG writer
    sends a repeated row as zeros (PNG's Up filter), so the picture is, pixel for pixel, the one
    every row written out would give, in a seventh of the memory traffic."""

    def __init__(self, width: int, height: int) -> None:
        self.pixels = np.empty((height, width, 3), np.uint8)
        self.pixels[0] = 255
        self.repeats = np.ones(height, bool)
        self.repeats[0] = False
        self.texts: list[tuple[tuple[int, int], str, int, str]] = []

    def _keep(self, rows: np.ndarray) -> None:
        """Give ``rows`` (ascending, any may be past the page) their own pixels: each repeated one
        copied from the last kept row above it, as it is before any of them changes."""
        rows = rows[rows < len(self.repeats)]
        rows = rows[self.repeats[rows]]
        if rows.size:
            kept = np.flatnonzero(~self.repeats)
            self.pixels[rows] = self.pixels[kept[np.searchsorted(kept, rows) - 1]]
            self.repeats[rows] = False

    def region(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """The page's pixels in rows ``top:bottom`` and columns ``left:right``, to be written in place."""
        if self.repeats[top:bottom + 1].any():  # most text lands on rows kept already
            self._keep(np.arange(top, bottom + 1))
        return self.pixels[top:bottom, left:right]

    def panel(self, left: int, top: int, rgb: np.ndarray, factor: int = 1) -> None:
        """Place ``rgb`` with its top-left corner at (left, top), each pixel a ``factor`` x ``factor``
        block (nearest-neighbour upscaling): each row widened once, and written into the first row
        of its block (and any other row of it the page keeps)."""
        height = rgb.shape[0] * factor
        wide = np.repeat(rgb, factor, axis=1) if factor > 1 else rgb
        self._keep(np.append(np.arange(top, top + height, factor), top + height))
        rows = top + np.flatnonzero(~self.repeats[top:top + height])
        self.pixels[rows, left:left + wide.shape[1]] = wide[(rows - top) // factor]

    def text(self, centre_x: int, top: int, text: str, size: int) -> None:
        self.texts.append(((centre_x, top), text, size, "ma"))

    def colour_bar(self, left: int, top: int, width: int, limit: float, size: int = 11) -> None:
        self.panel(left, top, _colour_bar(width))
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            x = left + round(fraction * (width - 1))
            self.region(top + _BAR_HEIGHT, top + _BAR_HEIGHT + 4, x, x + 1)[:] = 0
            self.text(x, top + _BAR_HEIGHT + 5, _tick((2 * fraction - 1) * limit), size)
        self.text(left + width // 2, top + _BAR_HEIGHT + 5 + size + 4, "SHAP value", size + 1)

    def png(self) -> bytes:
        for (x, y), text, size, anchor in self.texts:
            self._ink(x, y, *_text_mask(text, size, anchor))
        return png_bytes(self.pixels, self.repeats)

    def _ink(self, x: int, y: int, mask: np.ndarray, left: int, top: int) -> None:
        """Black text: each pixel darkened by the glyph mask's coverage (clipped to the page)."""
        x0, y0 = x + left, y + top
        y1, x1 = min(self.pixels.shape[0], y0 + mask.shape[0]), min(self.pixels.shape[1], x0 + mask.shape[1])
        cy, cx = max(0, -y0), max(0, -x0)
        if y1 <= y0 + cy or x1 <= x0 + cx:
            return
        coverage = mask[cy:y1 - y0, cx:x1 - x0, None].astype(np.uint16)
        region = self.region(y0 + cy, y1, x0 + cx, x1)
        region[:] = ((region.astype(np.uint16) * (255 - coverage) + 127) // 255).astype(np.uint8)


@lru_cache(maxsize=1024)
def _text_mask(text: str, size: int, anchor: str) -> tuple[np.ndarray, int, int]:
    """A text's glyph coverage (uint8) and its offset from the anchor point, drawn once: titles,
    ticks and labels repeat across a job's pages."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font, anchor=anchor)
    coverage = np.asarray(mask).copy()
    coverage.flags.writeable = False
    return coverage, left, top


#: The PNG writer filters and deflates this many bytes of rows at a time: a strip that stays in
#: the cache, not a copy of the whole page (a 2593 x 2608 grid is 20 MB).
PNG_STRIP_BYTES = 1 << 20


def png_bytes(pixels: np.ndarray, repeats: np.ndarray | None = None) -> bytes:
    """``H x W x 3`` (RGB) or ``H x W x 1`` (grey) uint8 as a PNG whose every row after the first is
    stored with the Up filter (the difference from the row above); ``repeats[r]``, where given, says
    row r equals row r - 1 (its pixels are then not read: the row is all zeros once filtered). The
    pages are upscaled panels, nearest-neighbour, on flat colour: most rows repeat the one above and
    filter to zeros, which zlib's fastest level packs almost for free; Pillow's encoder tries every
    filter on every row, which took 2.6 times as long for a page 13% smaller (a 10-class summary,
    2608 x 325), and its first save imports every image plugin Pillow has (10-15 ms). The rows are
    filtered and deflated in strips of about ``PNG_STRIP_BYTES``, by ISA-L at its level 1 where the
    ``isal`` package is installed (a dependency of the engine), else by zlib at level 1; either is a
    valid zlib stream, and each (in one version) gives the same bytes for the same pixels."""
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(height, width * channels)
    kept = np.flatnonzero(~repeats) if repeats is not None else np.arange(height)
    above = np.concatenate([[0], kept[:-1]])  # each kept row's last kept row above (row 0: none)
    step = max(1, PNG_STRIP_BYTES // (width * channels + 1))
    strip = np.zeros((min(step, height), width * channels + 1), np.uint8)
    deflate = _compressobj(1)
    parts = []
    for start in range(0, height, step):
        stop = min(height, start + step)
        filtered = strip[:stop - start]
        filtered[:, 1:] = 0
        filtered[:, 0] = 2  # Up
        first, last = np.searchsorted(kept, [start, stop])
        own, previous = kept[first:last], above[first:last]
        # modulo 256, as PNG's filters are
        filtered[own - start, 1:] = rows[own] - rows[previous]
        if start == 0:
            filtered[0, 0] = 0  # None: the first row has no row above
            filtered[0, 1:] = rows[0]
        parts.append(deflate.compress(filtered))
    parts.append(deflate.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour_type = {1: 0, 3: 2}[channels]  # grey or RGB
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)  # 8 bits, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


_TITLE = 16  # title line height above a panel
_BAR_BLOCK = _BAR_HEIGHT + 5 + 12 + 4 + 14 + _MARGIN  # bar, ticks, label


def _panels_page(rows: list[list[tuple[np.ndarray, str] | None]], limit: float, title_size: int) -> bytes:
    """A grid of upscaled panels, each under its title, and a colour bar under the value columns."""
    shapes = [cell[0].shape for row in rows for cell in row if cell is not None]
    factor = _factor(max(shapes, key=lambda s: max(s[0], s[1])))
    cell_w = max(s[1] for s in shapes) * factor
    cell_h = max(s[0] for s in shapes) * factor
    columns = max(len(row) for row in rows)
    width = _MARGIN + columns * (cell_w + _MARGIN)
    height = _MARGIN + len(rows) * (_TITLE + cell_h + _MARGIN) + _BAR_BLOCK
    canvas = _Canvas(width, height)
    for r, row in enumerate(rows):
        top = _MARGIN + r * (_TITLE + cell_h + _MARGIN)
        for c, cell in enumerate(row):
            if cell is None:
                continue
            rgb, title = cell
            left = _MARGIN + c * (cell_w + _MARGIN)
            canvas.text(left + cell_w // 2, top, title, title_size)
            canvas.panel(left, top + _TITLE, rgb, factor)
    bar_left = _MARGIN + (cell_w + _MARGIN if columns > 1 else 0)
    bar_width = width - bar_left - _MARGIN
    canvas.colour_bar(bar_left, height - _BAR_BLOCK, bar_width, limit)
    return canvas.png()


def _class_title(explanation: Explanation, k: int, digits: int = 3) -> str:
    return f"{explanation.class_names[k]} (p={explanation.probabilities()[k]:.{digits}f})"


def class_overlay_png(explanation: Explanation, k: int) -> bytes:
    """The overlay for the k-th explained class, with its own symmetric scale and a colour bar."""
    return class_overlay_pngs(explanation, [k])[0]


def class_overlay_pngs(explanation: Explanation, ks: list[int] | None = None) -> list[bytes]:
    """:func:`class_overlay_png` of each of the classes ``ks`` (default: every explained class),
    their panels coloured at once (the same bytes as one at a time)."""
    ks = list(range(len(explanation.classes))) if ks is None else ks
    pixel_values = explanation.pixel_values[:, :, ks]
    limits = np.array([_scale(pixel_values[:, :, j]) for j in range(len(ks))])
    rgbs = attribution_rgbs(explanation.image, pixel_values, limits)
    return [_panels_page([[(rgb, _class_title(explanation, k))]], limit, 13) for rgb, limit, k in zip(rgbs, limits, ks)]


def summary_png(explanation: Explanation) -> bytes:
    """The image, then one column per class on a shared symmetric scale (``shap.image_plot``)."""
    pixel_values = explanation.pixel_values
    limit = _scale(pixel_values)
    panels = attribution_rgbs(explanation.image, pixel_values, np.full(pixel_values.shape[2], limit))
    row = [(_image_rgb(explanation.image), "image")]
    row += [(panel, _class_title(explanation, k)) for k, panel in enumerate(panels)]
    return _panels_page([row], limit, 13)


def grid_png(explanations: list[Explanation]) -> bytes:
    """Many images in ``shap.image_plot``'s layout: a row per image, the image then a column per
    explained class, every overlay on one shared symmetric scale."""
    limit = _scale(np.concatenate([e.pixel_values.ravel() for e in explanations]))
    rows = []
    for index, explanation in enumerate(explanations):
        pixel_values = explanation.pixel_values
        panels = attribution_rgbs(explanation.image, pixel_values, np.full(pixel_values.shape[2], limit))
        rows.append([(_image_rgb(explanation.image), f"image {index}")] +
                    [(panel, _class_title(explanation, k, 2)) for k, panel in enumerate(panels)])
    return _panels_page(rows, limit, 12)


def artifact_name(k: int, class_index: int, class_name: str) -> str:
    """``class-<index>-<name>.png`` with the name reduced to safe characters."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in class_name.strip())[:40].strip("_")
    return f"class-{class_index}-{safe}.png" if safe else f"class-{class_index}.png"


def image_png(explanation: Explanation) -> bytes:
    """The image as the model saw it (after resize and crop, before normalisation), grey or RGB."""
    return png_bytes(np.clip(np.rint(explanation.image), 0, 255).astype(np.uint8))


def render_collection(explanations: list[Explanation]) -> dict[str, bytes]:
    """The artifacts of a many-image job, beside each image's own: ``attributions.npz`` with every
    image's values stacked (when the images share one size) and ``grid.png``."""
    from .result import collection_npz_bytes

    artifacts = {"grid.png": grid_png(explanations)}
    if len({e.image.shape for e in explanations}) == 1 and len({len(e.classes) for e in explanations}) == 1:
        artifacts["attributions.npz"] = collection_npz_bytes(explanations)
    return artifacts


def render_artifacts(explanation: Explanation) -> dict[str, bytes]:
    """Every artifact of a result: ``attributions.npz``, then its :func:`render_viewer_files`."""
    return {"attributions.npz": explanation.to_npz_bytes(), **render_viewer_files(explanation)}


def render_viewer_files(explanation: Explanation) -> dict[str, bytes]:
    """A result's files for people and viewers: ``summary.png``, ``image.png``, ``explanation.json``
    (label map, values and errors) and one PNG per explained class."""
    files = {"summary.png": summary_png(explanation), "image.png": image_png(explanation),
             "explanation.json": explanation.to_json_bytes()}
    for k, page in enumerate(class_overlay_pngs(explanation)):
        files[artifact_name(k, int(explanation.classes[k]), explanation.class_names[k])] = page
    return files
