"""Training data: read the dataset layout, validate labels, cut augmented patches.

The dataset layout is the one :mod:`islet_imaging.synth` writes and the napari plugin saves
corrections into, so a corrected field is training data without conversion::

    DIR/images/<name>.ome.tif | .tif | .png
    DIR/labels/<name>_nuclei.tif      (optional: without it the nuclei heads are not trained)
    DIR/labels/<name>_clusters.tif    (optional: without it the cluster heads are not trained)
    DIR/metadata.csv                  (optional: name, stage, pixel_size_um, z_step_um, channel_names)

:func:`scan_dataset` lists the images with their label files and metadata, :func:`load_entry`
reads one (a :class:`~islet_imaging.io.Field` plus validated labels, :func:`check_labels`).
:func:`islet_imaging.train.get_dataset` turns them into :class:`TrainingImage` planes at the
model's pixel size (one per z-plane: the network is 2D), and :func:`random_patch` cuts a patch
with paired augmentation (scale jitter, flips, 90° rotations on image and labels alike;
intensity changes on the image only). Labels are resampled with nearest neighbour only, so label
values stay instance ids.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from islet_imaging.errors import InputError

__all__ = [
    "AugmentConfig",
    "DatasetEntry",
    "TrainingImage",
    "check_labels",
    "load_entry",
    "random_patch",
    "scan_dataset",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png")
LABEL_KINDS: tuple[str, ...] = ("nuclei", "clusters")
#: A label image with one value over at least this many separate objects (none holding 30 % of
#: the foreground) is taken for a binary mask.
BINARY_MIN_PARTS = 4


@dataclass(frozen=True)
class DatasetEntry:
    """One image of a dataset directory and its (optional) label files and metadata.

    Parameters
    ----------
    name : str
        The image name without suffix (``B03_f1``).
    image : Path
        ``DIR/images/<name>.<suffix>``.
    nuclei, clusters : Path or None
        ``DIR/labels/<name>_nuclei.tif`` / ``_clusters.tif`` when present.
    stage : str or None
        The differentiation stage from ``metadata.csv``.
    pixel_size_um : float or None
        In-plane pixel size from ``metadata.csv`` (else the file's own metadata is used).
    channel_names : tuple of str or None
        Channel names from ``metadata.csv`` (``"DAPI|INS|GCG"``), else the file's.
    """

    name: str
    image: Path
    nuclei: Path | None = None
    clusters: Path | None = None
    stage: str | None = None
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    channel_names: tuple[str, ...] | None = None

    @property
    def has_labels(self) -> bool:
        return self.nuclei is not None or self.clusters is not None


@dataclass(frozen=True, eq=False)
class TrainingImage:
    """One 2D training image at the model's pixel size.

    Parameters
    ----------
    name : str
        ``<dataset name>/<image name>[_z<plane>]``.
    image : (C, Y, X) ndarray of float32
        The network input (channels as the model expects them, normalised).
    nuclei, clusters : (Y, X) ndarray of int32 or None
        Instance labels; ``None`` means "not annotated" (that head's loss is masked), not "empty".
    stage : str or None
        Stage name, for logging and per-stage validation.
    """

    name: str
    image: np.ndarray
    nuclei: np.ndarray | None
    clusters: np.ndarray | None
    stage: str | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise InputError(
                f"{self.name}: training image must be (C, Y, X), got {self.image.shape}"
            )
        for kind in LABEL_KINDS:
            lab = getattr(self, kind)
            if lab is not None and lab.shape != self.image.shape[1:]:
                raise InputError(
                    f"{self.name}: {kind} labels {lab.shape} do not match the image {self.image.shape[1:]}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.image.shape[1]), int(self.image.shape[2]))


@dataclass(frozen=True)
class AugmentConfig:
    """Paired augmentation settings.

    Parameters
    ----------
    scale_jitter : float
        Relative scale jitter: the patch is zoomed by a factor drawn log-uniformly from
        ``[1 / (1 + s), 1 + s]`` (0.2 → ±20 % pixel size).
    flips : bool
        Random horizontal / vertical flips and 90° rotations.
    gain : (float, float)
        Range of a multiplicative intensity gain per channel.
    gamma : (float, float)
        Range of a gamma applied to the (non-negative part of the) normalised image.
    noise : float
        Maximum standard deviation of added Gaussian noise (normalised units).
    blur_probability : float
        Probability of a Gaussian blur with sigma in ``[0.3, 1.5]`` px.
    """

    scale_jitter: float = 0.2
    flips: bool = True
    gain: tuple[float, float] = (0.7, 1.4)
    gamma: tuple[float, float] = (0.7, 1.4)
    noise: float = 0.05
    blur_probability: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.scale_jitter < 1:
            raise InputError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")
        for name in ("gain", "gamma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise InputError(f"{name} range must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.noise < 0 or not 0 <= self.blur_probability <= 1:
            raise InputError("noise must be >= 0 and blur_probability in [0, 1]")


#: No augmentation at all (validation, tests).
NO_AUGMENT = AugmentConfig(
    scale_jitter=0.0, flips=False, gain=(1, 1), gamma=(1, 1), noise=0.0, blur_probability=0.0
)


# -- reading the layout --------------------------------------------------------------------------
def _strip_suffix(filename: str) -> str | None:
    low = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise InputError(
                "metadata.csv needs a 'name' column (plus any of stage, pixel_size_um, "
                "z_step_um, channel_names)",
                path,
            )
        return {row["name"]: row for row in reader if row.get("name")}


def _float_or_none(value: str | None, what: str, path: Path) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        out = float(value)
    except ValueError:
        raise InputError(f"{what} {value!r} is not a number", path) from None
    if math.isnan(out):  # "nan" marks a missing value (e.g. no z step for a 2D image)
        return None
    if not (math.isfinite(out) and out > 0):
        raise InputError(f"{what} {value!r} must be a positive number", path)
    return out


def scan_dataset(root: str | Path, *, require_labels: bool = True) -> list[DatasetEntry]:
    """List the images of a dataset directory with their label files and metadata.

    Parameters
    ----------
    root : path
        A directory with ``images/`` and ``labels/`` (see the module docstring).
    require_labels : bool
        Skip (with a log message) images that have neither nuclei nor cluster labels; when
        ``False`` they are listed too (e.g. for prediction).

    Returns
    -------
    list of DatasetEntry
        Sorted by name.

    Raises
    ------
    InputError
        If ``root/images`` does not exist or holds no image, or metadata.csv is malformed.
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise InputError(
            "not a dataset directory: it needs images/<name>.ome.tif and labels/<name>_nuclei.tif "
            "(and/or labels/<name>_clusters.tif)",
            root,
        )
    meta_path = root / "metadata.csv"
    meta = _read_metadata(meta_path)
    labels_dir = root / "labels"
    entries: list[DatasetEntry] = []
    for path in sorted(images_dir.iterdir()):
        name = _strip_suffix(path.name)
        if name is None or path.name.startswith("."):
            continue
        lab = {
            kind: (labels_dir / f"{name}_{kind}.tif")
            if (labels_dir / f"{name}_{kind}.tif").is_file()
            else None
            for kind in LABEL_KINDS
        }
        row = meta.get(name, {})
        names = row.get("channel_names") or None
        entry = DatasetEntry(
            name=name,
            image=path,
            nuclei=lab["nuclei"],
            clusters=lab["clusters"],
            stage=(row.get("stage") or None),
            pixel_size_um=_float_or_none(row.get("pixel_size_um"), "pixel_size_um", meta_path),
            z_step_um=_float_or_none(row.get("z_step_um"), "z_step_um", meta_path),
            channel_names=tuple(names.split("|")) if names else None,
        )
        if require_labels and not entry.has_labels:
            log.info("%s: no labels/%s_nuclei.tif or _clusters.tif; skipped", root, name)
            continue
        entries.append(entry)
    if not entries:
        raise InputError(
            "no usable image in images/ (with labels in labels/<name>_nuclei.tif or "
            "labels/<name>_clusters.tif)",
            root,
        )
    return entries


def check_labels(
    labels: np.ndarray,
    *,
    shape: tuple[int, ...],
    path: str | Path | None = None,
    relabel_binary: bool = False,
) -> np.ndarray:
    """Validate one instance label image and return it as (Z, Y, X) int32.

    Parameters
    ----------
    labels : (Z, Y, X) or (Y, X) ndarray
        Instance labels: 0 = background, one positive integer per object.
    shape : tuple of int
        The image's ``(Z, Y, X)`` shape the labels must match.
    path : path, optional
        The label file, named in errors.
    relabel_binary : bool
        Turn a binary mask (a single foreground value over several separate objects) into
        instances by connected components instead of refusing it.

    Raises
    ------
    InputError
        Non-integer labels, negative values, a shape that differs from the image, or a binary
        mask (unless ``relabel_binary``).
    """
    lab = np.asarray(labels)
    if lab.ndim == 2:
        lab = lab[np.newaxis]
    if lab.dtype == bool or lab.dtype.kind not in "iu":
        raise InputError(
            f"labels have dtype {lab.dtype}; an instance label image must be integer with one "
            "value per object. For a binary mask use skimage.measure.label(mask) (connected "
            "components) or pass relabel_binary=True / --relabel-binary",
            path,
        )
    if lab.ndim != 3 or tuple(lab.shape) != tuple(shape):
        raise InputError(
            f"labels have shape {lab.shape} but the image is (Z, Y, X) = {tuple(shape)}; "
            "labels must be on the image's pixel grid",
            path,
        )
    if lab.size and lab.min() < 0:
        raise InputError("labels contain negative values; use 0 for background", path)
    values = np.unique(lab)
    values = values[values != 0]
    if values.size == 1:
        parts, n_parts = ndi.label(lab > 0)
        sizes = np.bincount(parts.ravel())[1:]
        # One value over many separate objects, none of them dominant: a binary mask. (A real
        # instance may have detached parts, e.g. a monolayer sheet cut by gaps, but then a few
        # large parts hold most of it.)
        if n_parts >= BINARY_MIN_PARTS and sizes.max() < 0.3 * sizes.sum():
            if not relabel_binary:
                raise InputError(
                    f"labels look like a binary mask: one value ({int(values[0])}) over "
                    f"{n_parts} separate objects. Convert it to instance labels with connected "
                    "components (skimage.measure.label(mask)) or pass relabel_binary=True / "
                    "--relabel-binary (touching objects then merge)",
                    path,
                )
            out = np.zeros(lab.shape, np.int32)
            for z in range(lab.shape[0]):
                plane, _ = ndi.label(lab[z] > 0)
                out[z] = plane
            return out
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise InputError("label values exceed int32", path)
    return lab.astype(np.int32, copy=False)


@dataclass(frozen=True, eq=False)
class LoadedEntry:
    """A dataset entry read from disk: the field and its validated (Z, Y, X) labels."""

    entry: DatasetEntry
    field: object  # islet_imaging.io.Field (kept loose so this module imports without io cost)
    nuclei: np.ndarray | None
    clusters: np.ndarray | None
    stage: str | None = None


def load_entry(
    entry: DatasetEntry, *, stage: str | None = None, relabel_binary: bool = False
) -> LoadedEntry:
    """Read one entry's image (as a Field) and its label images, validated against each other.

    Parameters
    ----------
    entry : DatasetEntry
        From :func:`scan_dataset`.
    stage : str, optional
        Stage used when metadata.csv gives none.
    relabel_binary : bool
        See :func:`check_labels`.

    Raises
    ------
    InputError
        Unreadable files, labels that do not match the image, binary masks.
    """
    from islet_imaging.io import PixelSize, read_field, read_labels

    pixel_size = None
    if entry.pixel_size_um is not None:
        pixel_size = PixelSize(entry.pixel_size_um, entry.pixel_size_um, entry.z_step_um)
    fld = read_field(
        entry.image,
        channel_names=entry.channel_names,
        pixel_size=pixel_size,
        z_step=entry.z_step_um if pixel_size is None else None,
    )
    labels: dict[str, np.ndarray | None] = {}
    for kind in LABEL_KINDS:
        path = getattr(entry, kind)
        if path is None:
            labels[kind] = None
            continue
        labels[kind] = check_labels(
            read_labels(path), shape=fld.spatial_shape, path=path, relabel_binary=relabel_binary
        )
    return LoadedEntry(
        entry=entry,
        field=fld,
        nuclei=labels["nuclei"],
        clusters=labels["clusters"],
        stage=entry.stage or stage,
    )


# -- rescaling and patches -----------------------------------------------------------------------
def _grid(
    out_shape: tuple[int, int], offset: tuple[float, float], step: tuple[float, float]
) -> np.ndarray:
    """Source coordinates (2, H, W) of output pixel centres: ``offset + (i + 0.5) * step - 0.5``."""
    yy = offset[0] + (np.arange(out_shape[0], dtype=np.float64) + 0.5) * step[0] - 0.5
    xx = offset[1] + (np.arange(out_shape[1], dtype=np.float64) + 0.5) * step[1] - 0.5
    return np.stack(np.meshgrid(yy, xx, indexing="ij"))


def random_patch(
    image: np.ndarray,
    labels: Sequence[np.ndarray | None],
    *,
    size: int,
    rng: np.random.Generator,
    augment: AugmentConfig = NO_AUGMENT,
    background: Iterable[float] | None = None,
    context: int = 0,
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Cut one ``size × size`` patch with paired augmentation.

    Parameters
    ----------
    image : (C, Y, X) ndarray
        Normalised network input at the model scale.
    labels : sequence of (Y, X) int ndarray or None
        Label images on the same grid (``None`` entries pass through as ``None``).
    size : int
        Output patch side in pixels.
    rng : numpy.random.Generator
        The only source of randomness (seeded by the caller).
    augment : AugmentConfig
        What to vary.
    background : sequence of float, optional
        Per-channel fill value where the patch leaves the image (default: each channel's 1st
        percentile), so padding looks like empty background rather than mirrored objects.
    context : int
        Pixels of label context returned on every side of the patch, so that targets made from
        the labels (distances to an object's edge) see the objects beyond the patch: the patch's
        edge is not an object's edge. Where the context leaves the image, the labels at the
        image's edge continue outwards (an object cut by the field's edge goes on beyond it);
        inside the patch, the parts beyond the image are background, as in the image patch.

    Returns
    -------
    patch : (C, size, size) ndarray of float32
    patch_labels : list of (size + 2 * context, size + 2 * context) int32 ndarray or None
        The patch's labels at ``[context:context + size, context:context + size]``.
    """
    c, h, w = image.shape
    scale = 1.0
    if augment.scale_jitter > 0:
        lim = math.log1p(augment.scale_jitter)
        scale = math.exp(rng.uniform(-lim, lim))
    span = size / scale  # source pixels covered by the patch
    y0 = rng.uniform(min(0.0, h - span), max(0.0, h - span))
    x0 = rng.uniform(min(0.0, w - span), max(0.0, w - span))
    coords = _grid((size, size), (y0, x0), (1.0 / scale, 1.0 / scale))
    if background is None:
        background = [
            float(np.percentile(ch[:: max(1, h // 64), :: max(1, w // 64)], 1)) for ch in image
        ]
    bg = list(background)
    patch = np.stack(
        [
            ndi.map_coordinates(
                image[i].astype(np.float32, copy=False),
                coords,
                order=1,
                mode="constant",
                cval=bg[i],
            )
            for i in range(c)
        ]
    )
    context = int(context)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if context:
        step = 1.0 / scale
        wide = _grid(
            (size + 2 * context,) * 2, (y0 - context * step, x0 - context * step), (step,) * 2
        )
    inner = slice(context, context + size)
    out_labels: list[np.ndarray | None] = []
    for lab in labels:
        if lab is None:
            out_labels.append(None)
            continue
        own = ndi.map_coordinates(lab, coords, order=0, mode="constant", cval=0).astype(np.int32)
        if context:
            full = ndi.map_coordinates(lab, wide, order=0, mode="nearest").astype(np.int32)
            full[inner, inner] = own
            own = full
        out_labels.append(own)
    if augment.flips:
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        patch = _orient(patch, k, flip)
        out_labels = [None if lab is None else _orient(lab[None], k, flip)[0] for lab in out_labels]
    patch = _intensity(patch, rng, augment)
    return np.ascontiguousarray(patch, dtype=np.float32), [
        None if lab is None else np.ascontiguousarray(lab) for lab in out_labels
    ]


def _orient(arr: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(arr, k=k, axes=(-2, -1))
    return out[..., ::-1] if flip else out


def _intensity(patch: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> np.ndarray:
    out = patch.astype(np.float32, copy=True)
    for i in range(out.shape[0]):
        ch = out[i]
        if augment.gamma != (1, 1):
            g = math.exp(rng.uniform(math.log(augment.gamma[0]), math.log(augment.gamma[1])))
            pos = np.clip(ch, 0, None)
            ch = np.where(ch > 0, pos**g, ch)
        if augment.gain != (1, 1):
            ch = ch * rng.uniform(*augment.gain)
        out[i] = ch
    if augment.blur_probability > 0 and rng.random() < augment.blur_probability:
        sigma = rng.uniform(0.3, 1.5)
        out = ndi.gaussian_filter(out, sigma=(0, sigma, sigma))
    if augment.noise > 0:
        std = rng.uniform(0, augment.noise)
        out = out + rng.normal(0.0, std, size=out.shape).astype(np.float32)
    return out
