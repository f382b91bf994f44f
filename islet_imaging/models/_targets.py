"""Training targets: what each output map of the network is trained to predict.

:func:`make_targets` turns instance labels (at the model's pixel size) into the maps the heads are
trained on; :func:`islet_imaging.models._postprocess.maps_to_instances` inverts them. Feeding the
targets of known labels to ``maps_to_instances`` gives the labels back (the contract's key test).

For each object class (``"nuclei"``, ``"clusters"``):

``<class>_foreground``
    1 inside any object, 0 outside. Trained with a binary cross-entropy on the logit.
``<class>_distance``
    Euclidean distance from each object pixel to the nearest pixel *outside that object*
    (background or another object, so touching objects are separated by a valley), then either
    divided by the object's own maximum (``cap=None``: every object peaks at exactly 1) or
    clipped at ``cap`` pixels and divided by it (``cap=c``: ``min(d, c) / c``, a local map for
    objects larger than the network's field of view). 0 outside objects. Trained e.g. with a
    binary cross-entropy or MSE on ``sigmoid(logit)``, inside the foreground or everywhere.
``<class>_weight``
    Per-pixel loss weight: 1 where the class is annotated, 0 where it is not (``clusters=None``:
    a dataset with nuclei only, such as DSB2018, trains the nuclei head alone). Multiply every
    loss term of that class by it.

3D labels ``(Z, Y, X)`` are handled slice by slice (the network is 2D; z-stacks are predicted
slice-wise and post-processed in 3D).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

from islet_imaging.errors import InputError

__all__ = ["DEFAULT_DISTANCE_CAP_PX", "distance_map", "make_targets", "target_names"]

#: Default distance caps per class (pixels at model scale); see ModelConfig.distance_cap_px.
DEFAULT_DISTANCE_CAP_PX: dict[str, float | None] = {"nuclei": None, "clusters": 12.0}


def target_names(classes: tuple[str, ...] = ("nuclei", "clusters")) -> tuple[str, ...]:
    """The keys :func:`make_targets` returns for these classes."""
    return tuple(f"{c}_{m}" for c in classes for m in ("foreground", "distance", "weight"))


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise InputError(
            f"{name} labels have dtype {labels.dtype}; labels must be integers "
            "(use skimage.measure.label(mask) for a binary mask)"
        )
    if labels.ndim not in (2, 3):
        raise InputError(f"{name} labels must be (Y, X) or (Z, Y, X), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{name} labels contain negative values")
    return labels


def _distance_2d(labels: np.ndarray, cap: float | None) -> np.ndarray:
    out = np.zeros(labels.shape, np.float32)
    for index, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        # pad by one pixel so the object's own bounding box edge counts as outside
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mask = labels[padded] == index
        crop = np.pad(mask, 1)
        d = ndi.distance_transform_edt(crop)[1:-1, 1:-1]
        if cap is None:
            dmax = d[mask].max()
            values = d[mask] / dmax
        else:
            values = np.minimum(d[mask], cap) / cap
        out[padded][mask] = values.astype(np.float32)
    return out


def distance_map(labels: np.ndarray, *, cap: float | None = None) -> np.ndarray:
    """The distance target of one class.

    Parameters
    ----------
    labels : (Y, X) or (Z, Y, X) ndarray of int
        Instance labels; 3D is handled slice by slice.
    cap : float, optional
        ``None``: per-object normalised distance (each object peaks at 1). A number: distance
        clipped at ``cap`` pixels, divided by ``cap``.

    Returns
    -------
    (Y, X) or (Z, Y, X) ndarray of float32
        In [0, 1]; 0 outside objects, > 0 inside every object.
    """
    labels = _check_labels(labels, "the")
    if cap is not None and not cap > 0:
        raise InputError(f"distance cap {cap} must be positive")
    if labels.ndim == 3:
        return np.stack([_distance_2d(s, cap) for s in labels])
    return _distance_2d(labels, cap)


def make_targets(
    nuclei: np.ndarray,
    clusters: np.ndarray | None = None,
    *,
    distance_cap_px: Mapping[str, float | None] | None = None,
) -> dict[str, np.ndarray]:
    """The training targets of one image.

    Parameters
    ----------
    nuclei : (Y, X) or (Z, Y, X) ndarray of int
        Nucleus instance labels at the model's pixel size.
    clusters : ndarray of int, optional
        Cluster instance labels, same shape; ``None`` when the image has no cluster annotation
        (then ``clusters_weight`` is 0 everywhere and the cluster maps are 0).
    distance_cap_px : dict, optional
        ``ModelConfig.distance_cap_px``; default :data:`DEFAULT_DISTANCE_CAP_PX`.

    Returns
    -------
    dict of str to ndarray of float32
        ``nuclei_foreground``, ``nuclei_distance``, ``nuclei_weight``, ``clusters_foreground``,
        ``clusters_distance``, ``clusters_weight``; each the shape of ``nuclei``.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((7, 7), np.int32); lab[1:6, 1:6] = 1
    >>> t = make_targets(lab)
    >>> float(t["nuclei_distance"][3, 3]), float(t["clusters_weight"].max())
    (1.0, 0.0)
    """
    caps = dict(DEFAULT_DISTANCE_CAP_PX)
    if distance_cap_px is not None:
        caps.update(distance_cap_px)
    nuclei = _check_labels(nuclei, "nuclei")
    out: dict[str, np.ndarray] = {}
    for name, labels in (("nuclei", nuclei), ("clusters", clusters)):
        if labels is None:
            zeros = np.zeros(nuclei.shape, np.float32)
            out[f"{name}_foreground"] = zeros
            out[f"{name}_distance"] = zeros.copy()
            out[f"{name}_weight"] = zeros.copy()
            continue
        labels = _check_labels(labels, name)
        if labels.shape != nuclei.shape:
            raise InputError(
                f"{name} labels {labels.shape} and nuclei labels {nuclei.shape} differ in shape"
            )
        out[f"{name}_foreground"] = (labels > 0).astype(np.float32)
        out[f"{name}_distance"] = distance_map(labels, cap=caps.get(name))
        out[f"{name}_weight"] = np.ones(nuclei.shape, np.float32)
    return out
