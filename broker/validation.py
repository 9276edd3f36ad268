"""Every check a job submission passes before anything is stored or enqueued, in one place.

:func:`check_job` runs once per submission, from :func:`~shapfleet.broker.submission.submit_job`:
first the limits that cost nothing to check (images per job, budgets, superpixels asked for, the
background set's array header), then the settings against what is known of the model, then each
image decoded under the pixel limit and fitted to the model. Each failure is a
:class:`~shapfleet.errors.UserError` whose message names the limit or the field (the API answers 422).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from shapfleet.errors import ImageError, InvalidSettingsError, SubmissionError
from shapfleet.workers.engine.images import fit_to_model, load_image, npy_bytes, resized_size
from shapfleet.workers.engine.settings import ExplainSettings

from .settings import Limits


class LimitExceeded(SubmissionError):
    """Raised when a submission is over one of the service's limits (the message names it)."""

    title = "Limit exceeded"


class InvalidBackgroundSet(SubmissionError):
    """Raised when the background set does not fit the model."""

    title = "Invalid background set"


#: The channel counts of pixel arrays any model reads (greyscale is repeated for colour models, colour
#: turned to luma for greyscale ones, alpha dropped: ``engine.images.as_pixel_array``).
READABLE_CHANNELS = (1, 3, 4)


def check_job(settings: ExplainSettings, images: list[bytes], background: bytes | None, model: dict,
              limits: Limits, segments: list[bytes | None] | None = None,
              reference: bytes | None = None) -> list[bytes | None] | None:
    """Check a submission; ``model`` is what validation learnt of the model (``height``, ``width``,
    ``channels``, ``n_classes``; absent keys are not checked). ``segments`` holds each image's own label
    map (or None), ``reference`` the ``image:`` masker's reference image.

    Returns the label maps the job is to use (``segments`` with those computed here filled in), or
    None when there are none: quickshift and Felzenszwalb give a superpixel count that nothing but
    running them tells, so they run here, on each image as the model will see it, and the labels
    (checked against the superpixel limit) go with the job instead of being computed again."""
    if segments is not None and len(segments) != len(images):
        raise SubmissionError(f"{len(segments)} label maps for {len(images)} images: give one per image, or none")
    if segments is not None and any(s is not None for s in segments) and settings.method == "partition":
        raise InvalidSettingsError("segments apply to method kernel; method partition refines shap's hierarchy of "
                                   "pixel boxes")
    shape = _check_limits(settings, len(images), limits, background, reference)
    height, width = model.get("height"), model.get("width")
    if shape is not None and isinstance(height, int) and isinstance(width, int) and tuple(shape[1:3]) != (height, width):
        raise InvalidBackgroundSet(f"the background images are {shape[1]}x{shape[2]}; the model takes {height}x{width} images")
    _check_classes(settings, model.get("n_classes"), limits)
    channels = model.get("channels", 3)
    if shape is not None:
        background_channels = shape[3] if len(shape) == 4 else 1
        if background_channels not in READABLE_CHANNELS:
            raise InvalidBackgroundSet(f"the background images have {background_channels} channels; the model takes "
                                       f"{channels}")

    def fitted(data: bytes, name: str) -> np.ndarray:
        pixels = check_image(data, limits, name, channels)
        if settings.resize is not None:
            target = resized_size(pixels.shape[:2], settings.resize)
            if target[0] * target[1] > limits.max_image_pixels:
                raise LimitExceeded(f"resize {settings.resize!r} makes {name} {target[0]}x{target[1]} = "
                                    f"{target[0] * target[1]} pixels; the limit is {limits.max_image_pixels}")
        return fit_to_model(pixels, (height, width), settings.resize, settings.center_crop, name)

    fitted_reference = fitted(reference, "the reference image") if reference is not None else None
    label_maps = list(segments) if segments is not None else [None] * len(images)
    for n, data in enumerate(images):
        name = f"image {n}"
        image = fitted(data, name)
        labels = segments[n] if segments is not None else None
        if labels is not None:
            check_label_map(labels, image.shape[:2], limits, f"the segments of {name}")
        elif settings.method == "kernel" and settings.segmenter == "slic" \
                and settings.n_segments > image.shape[0] * image.shape[1]:
            raise InvalidSettingsError(
                f"n_segments={settings.n_segments} exceeds {name}'s {image.shape[0] * image.shape[1]} pixels")
        elif settings.method == "kernel" and settings.segmenter in ("quickshift", "felzenszwalb"):
            label_maps[n] = _segment_now(image, settings, limits, name)
        if shape is not None and tuple(shape[1:3]) != image.shape[:2]:
            raise InvalidBackgroundSet(f"the background images are {shape[1]}x{shape[2]}; {name} is "
                                       f"{image.shape[0]}x{image.shape[1]} after resizing and cropping: they must match")
        if fitted_reference is not None and fitted_reference.shape != image.shape:
            raise ImageError(f"the reference image is {fitted_reference.shape[1]}x{fitted_reference.shape[0]} after "
                             f"fitting, {name} is {image.shape[1]}x{image.shape[0]}: they must fit to the same size")
    return label_maps if any(m is not None for m in label_maps) else None


def _segment_now(image: np.ndarray, settings: ExplainSettings, limits: Limits, name: str) -> bytes:
    """Run the job's quickshift or Felzenszwalb segmentation on a fitted image (at most
    ``max_segmenter_pixels``, which bounds its time) and return the labels as ``.npy`` bytes."""
    from shapfleet.workers.engine.segmentation import segment

    pixels = image.shape[0] * image.shape[1]
    if pixels > limits.max_segmenter_pixels:
        raise LimitExceeded(f"segmenter {settings.segmenter} runs at submission, on images of at most "
                            f"{limits.max_segmenter_pixels} pixels; {name} is {image.shape[1]}x{image.shape[0]} after "
                            "fitting: resize it, or use segmenter slic or grid")
    labels = segment(image, settings)
    count = int(labels.max()) + 1
    if count > limits.max_superpixels:
        raise LimitExceeded(f"segmenter {settings.segmenter} gives {name} {count} superpixels; the limit is "
                            f"{limits.max_superpixels} (raise its scale or kernel size)")
    return npy_bytes(labels.astype(np.int32))


def check_label_map(data: bytes, shape: tuple[int, int] | None, limits: Limits, name: str) -> int:
    """Check an uploaded label map (``.npy`` integers, or a PNG whose pixel values or colours are labels)
    and return its superpixel count: its header first (size against ``shape`` when given, and the
    pixel limit, before anything is decoded), then the labels (at most ``max_superpixels``)."""
    if data[:6] == b"\x93NUMPY":
        try:
            stream = io.BytesIO(data)
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            size, _, dtype = read_header(stream)
        except (OSError, ValueError, EOFError) as e:
            raise ImageError(f"{name} is not a readable .npy label map: {e}") from None
        if not np.issubdtype(dtype, np.integer) or len(size) != 2:
            raise ImageError(f"{name} must be a 2-D integer label image, got {dtype} of shape {list(size)}")
        height, width = size
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as e:
            raise ImageError(f"{name} is neither a .npy label array nor a readable label image: {e}") from None
    if height * width > limits.max_image_pixels:
        raise LimitExceeded(f"{name} has {width}x{height} labels; the limit is {limits.max_image_pixels} pixels")
    if shape is not None and (height, width) != tuple(shape):
        raise ImageError(f"{name} is {width}x{height} but the image is {shape[1]}x{shape[0]} after resizing and "
                         "cropping: give the labels of the image as the model sees it")
    from shapfleet.workers.engine.segmentation import load_segments

    count = int(load_segments(data, (height, width), name).max()) + 1
    if count > limits.max_superpixels:
        raise LimitExceeded(f"{name} has {count} superpixels; the limit is {limits.max_superpixels}")
    return count


def _check_limits(settings: ExplainSettings, n_images: int, limits: Limits,
                  background: bytes | None, reference: bytes | None) -> tuple[int, ...] | None:
    """The job-level limits and what jobs cannot take (a reference-image file); returns the
    background set's array shape, or None without one."""
    if not n_images:
        raise SubmissionError("a job needs at least one image")
    if n_images > limits.max_images_per_job:
        raise LimitExceeded(f"{n_images} images; the limit is {limits.max_images_per_job} per job")
    if settings.nsamples is not None and settings.nsamples > limits.max_nsamples:
        raise LimitExceeded(f"nsamples={settings.nsamples}; the limit is {limits.max_nsamples}")
    if settings.max_evals is not None and settings.max_evals > limits.max_evals:
        raise LimitExceeded(f"max_evals={settings.max_evals}; the limit is {limits.max_evals}")
    if settings.batch_size is not None and settings.batch_size > limits.max_batch_size:
        raise LimitExceeded(f"batch_size={settings.batch_size}; the limit is {limits.max_batch_size}")
    segments = None if settings.method != "kernel" else settings.n_segments if settings.segmenter == "slic" else \
        (settings.grid_shape[0] * settings.grid_shape[1] if settings.segmenter == "grid" else None)
    if segments is not None and segments > limits.max_superpixels:
        raise LimitExceeded(f"{segments} superpixels requested; the limit is {limits.max_superpixels}")
    if (settings.masker_spec.kind == "image") != (reference is not None):
        raise SubmissionError("masker image: needs the reference image uploaded with the job (file field "
                              "'reference', or base64 'reference' in a JSON body), and a reference image needs masker image:")
    if (settings.masker_spec.kind == "dataset") != (background is not None):
        raise SubmissionError("masker dataset: needs the background set uploaded with the job (file field "
                              "'background', an .npz of N x H x W (x C) images), and a background set needs masker dataset:")
    return check_background_set(background, limits) if background is not None else None


def _check_classes(settings: ExplainSettings, n_classes: int | None, limits: Limits) -> None:
    explained = len(settings.labels) if settings.labels is not None else settings.top_k if settings.top_k is not None \
        else (n_classes if settings.all_classes else 1)
    if explained is not None and explained > limits.max_classes:
        raise LimitExceeded(f"{explained} classes to explain per image; the limit is {limits.max_classes} "
                            "(give labels or top_k)")
    if not n_classes:
        return
    if settings.labels is not None and max(settings.labels) >= n_classes:
        raise InvalidSettingsError(f"labels {list(settings.labels)} out of range: the model has {n_classes} classes "
                                   f"(0..{n_classes - 1})")
    if settings.top_k is not None and settings.top_k > n_classes:
        raise InvalidSettingsError(f"top_k={settings.top_k} exceeds the model's {n_classes} classes")
    if settings.class_names is not None and len(settings.class_names) != n_classes:
        raise InvalidSettingsError(f"{len(settings.class_names)} class names for a model with {n_classes} classes")


def check_image(data: bytes, limits: Limits, name: str, channels: int = 3) -> np.ndarray:
    """Decode fully (catches truncated files) under the pixel limit; returns the pixel array."""
    if not data:
        raise ImageError(f"{name} is empty")
    try:
        return load_image(data, channels, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from e


def check_background_set(data: bytes, limits: Limits) -> tuple[int, ...]:
    """Check the uploaded background set from its array header alone (nothing is decompressed, so a
    small upload cannot expand into a huge array here): an ``.npz`` whose ``images`` array (or only
    array) is N x H x W (x C) numbers, N within the limit. Returns the shape."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [member[:-4] for member in archive.namelist() if member.endswith(".npy")]
            name = "images" if "images" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise SubmissionError(f"the background set holds arrays {names}; name the image array 'images'")
            with archive.open(f"{name}.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SubmissionError(f"the background set is not a readable .npz of images: {e}") from None
    if len(shape) not in (3, 4) or shape[0] == 0 or not np.issubdtype(dtype, np.number):
        raise SubmissionError(f"the background set must be N x H x W (x C) numbers with N >= 1, got {dtype} {list(shape)}")
    if shape[0] > limits.max_background_images:
        raise LimitExceeded(f"the background set holds {shape[0]} images; the limit is {limits.max_background_images}")
    return tuple(shape)
