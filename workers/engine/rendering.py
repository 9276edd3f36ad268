"""Pictures of an explanation, in ``shap.image_plot``'s convention.

The image is drawn in greyscale at low alpha; over it, each pixel's attribution in a map that runs from
blue (negative) through transparent (zero) to red (positive), on a symmetric scale whose limit is the
99.9th percentile of |value| (as shap does), with a colour bar. Functions return PNG bytes; nothing
here solves or stores anything.
"""

from __future__ import annotations

import io

import numpy as np

from .result import Explanation

_BLUE = (0.0, 0.545, 0.984)
_RED = (1.0, 0.0, 0.318)


def _colormap():
    from matplotlib.colors import LinearSegmentedColormap

    # Opaque blue at -1, transparent at 0, opaque red at +1.
    colors = [(*(_BLUE if p < 0 else _RED), abs(p)) for p in np.linspace(-1, 1, 101)]
    return LinearSegmentedColormap.from_list("red_transparent_blue", colors)


def _grey(image: np.ndarray) -> np.ndarray:
    if image.shape[2] == 1:
        return image[:, :, 0]
    return image[:, :, :3] @ np.array([0.2989, 0.5870, 0.1140])


def _scale(values: np.ndarray) -> float:
    limit = float(np.nanpercentile(np.abs(values), 99.9)) if values.size else 0.0
    return limit if limit > 0 else 1e-12


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _draw_image(ax, image: np.ndarray, title: str, fontsize: int) -> None:
    """The image as the model saw it (greyscale for one channel), untouched, with a title."""
    shown = image[:, :, 0] if image.shape[2] == 1 else image
    ax.imshow(np.clip(shown, 0, 255).astype(np.uint8), cmap="gray" if image.shape[2] == 1 else None)
    ax.axis("off")
    ax.set_title(title, fontsize=fontsize)


def _draw_attribution(ax, image: np.ndarray, pixel_values: np.ndarray, limit: float):
    ax.imshow(_grey(image), cmap="gray", alpha=0.15, extent=(-1, pixel_values.shape[1], pixel_values.shape[0], -1))
    mappable = ax.imshow(pixel_values, cmap=_colormap(), vmin=-limit, vmax=limit)
    ax.axis("off")
    return mappable


def class_overlay_png(explanation: Explanation, k: int) -> bytes:
    """The overlay for the k-th explained class, with its own symmetric scale and a colour bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pixel_values = explanation.pixel_values[:, :, k]
    fig, ax = plt.subplots(figsize=(4.2, 4.6))
    mappable = _draw_attribution(ax, explanation.image, pixel_values, _scale(pixel_values))
    probability = explanation.probabilities()[k]
    ax.set_title(f"{explanation.class_names[k]} (p={probability:.3f})", fontsize=10)
    bar = fig.colorbar(mappable, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04)
    bar.set_label("SHAP value")
    return _figure_bytes(fig)


def summary_png(explanation: Explanation) -> bytes:
    """The image, then one column per class on a shared symmetric scale (``shap.image_plot``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(explanation.classes)
    pixel_values = explanation.pixel_values
    limit = _scale(pixel_values)
    fig, axes = plt.subplots(1, n + 1, figsize=(3 * (n + 1), 3.6), squeeze=False)
    image = explanation.image
    _draw_image(axes[0, 0], image, "image", 10)
    probabilities = explanation.probabilities()
    mappable = None
    for k in range(n):
        mappable = _draw_attribution(axes[0, k + 1], image, pixel_values[:, :, k], limit)
        axes[0, k + 1].set_title(f"{explanation.class_names[k]} (p={probabilities[k]:.3f})", fontsize=10)
    bar = fig.colorbar(mappable, ax=list(axes[0]), orientation="horizontal", fraction=0.05, pad=0.05, aspect=40)
    bar.set_label("SHAP value")
    return _figure_bytes(fig)


def grid_png(explanations: list[Explanation]) -> bytes:
    """Many images in ``shap.image_plot``'s layout: a row per image, the image then a column per
    explained class, every overlay on one shared symmetric scale."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_classes = max(len(e.classes) for e in explanations)
    limit = _scale(np.concatenate([e.pixel_values.ravel() for e in explanations]))
    fig, axes = plt.subplots(len(explanations), n_classes + 1, figsize=(2.6 * (n_classes + 1), 2.6 * len(explanations) + 0.8),
                             squeeze=False)
    mappable = None
    for row, explanation in enumerate(explanations):
        image = explanation.image
        _draw_image(axes[row, 0], image, f"image {row}", 9)
        probabilities = explanation.probabilities()
        pixel_values = explanation.pixel_values
        for k in range(n_classes):
            ax = axes[row, k + 1]
            if k >= len(explanation.classes):
                ax.axis("off")
                continue
            mappable = _draw_attribution(ax, image, pixel_values[:, :, k], limit)
            ax.set_title(f"{explanation.class_names[k]} (p={probabilities[k]:.2f})", fontsize=9)
    bar = fig.colorbar(mappable, ax=list(axes[-1]), orientation="horizontal", fraction=0.05, pad=0.05, aspect=40)
    bar.set_label("SHAP value")
    return _figure_bytes(fig)


def artifact_name(k: int, class_index: int, class_name: str) -> str:
    """``class-<index>-<name>.png`` with the name reduced to safe characters."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in class_name.strip())[:40].strip("_")
    return f"class-{class_index}-{safe}.png" if safe else f"class-{class_index}.png"


def image_png(explanation: Explanation) -> bytes:
    """The image as the model saw it (after resize and crop, before normalisation)."""
    from PIL import Image

    pixels = np.clip(np.rint(explanation.image), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def render_collection(explanations: list[Explanation]) -> dict[str, bytes]:
    """The artifacts of a many-image job, beside each image's own: ``attributions.npz`` with every
    image's values stacked (when the images share one size) and ``grid.png``."""
    from .result import collection_npz_bytes

    artifacts = {"grid.png": grid_png(explanations)}
    if len({e.image.shape for e in explanations}) == 1 and len({len(e.classes) for e in explanations}) == 1:
        artifacts["attributions.npz"] = collection_npz_bytes(explanations)
    return artifacts


def render_artifacts(explanation: Explanation) -> dict[str, bytes]:
    """Every artifact of a result: ``attributions.npz``, ``summary.png``, one PNG per class, and for
    viewers ``image.png`` and ``explanation.json`` (label map, values and errors)."""
    artifacts = {"attributions.npz": explanation.to_npz_bytes(), "summary.png": summary_png(explanation),
                 "image.png": image_png(explanation), "explanation.json": explanation.to_json_bytes()}
    for k, c in enumerate(explanation.classes):
        artifacts[artifact_name(k, int(c), explanation.class_names[k])] = class_overlay_png(explanation, k)
    return artifacts
