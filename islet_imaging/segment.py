"""One entry point for segmentation: a Field in, nuclei and cluster instance labels out.

The classical baseline (:mod:`islet_imaging.models.classical`, scikit-image only, no weights) and the
CNN (:mod:`islet_imaging.models`) sit behind the same function and return the same :class:`Labels`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from islet_imaging.errors import InputError, MissingZStepWarning
from islet_imaging.io import Field
from islet_imaging.stages import StageProfile, get_stage

__all__ = ["CLASSICAL", "Labels", "segment_field"]

#: Model name that selects the classical (scikit-image) baseline.
CLASSICAL = "classical"


@dataclass(frozen=True, eq=False)
class Labels:
    """Instance labels of one field, on the field's (Z, Y, X) grid.

    Parameters
    ----------
    nuclei : (Z, Y, X) ndarray of int32
        0 = background, 1..N = nuclei. 3D objects for a z-stack.
    clusters : (Z, Y, X) ndarray of int32
        0 = background, 1..M = clusters (colonies, patches, aggregates).
    probabilities : dict of str to (Z, Y, X) float32 ndarray
        The network's maps (e.g. ``"nuclei_foreground"``), when asked for; empty otherwise.
    method : str
        Which segmenter made them (``"classical"`` or the model name).
    """

    nuclei: np.ndarray
    clusters: np.ndarray
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    method: str = ""

    def __post_init__(self) -> None:
        for name in ("nuclei", "clusters"):
            arr = np.asarray(getattr(self, name))
            if arr.ndim == 2:
                arr = arr[np.newaxis]
            if arr.ndim != 3:
                raise InputError(
                    f"{name} labels must be (Z, Y, X) or (Y, X), got shape {arr.shape}"
                )
            if arr.dtype.kind not in "iu":
                raise InputError(
                    f"{name} labels have dtype {arr.dtype}; labels must be integers "
                    "(use skimage.measure.label(mask) for a binary mask)"
                )
            object.__setattr__(self, name, arr.astype(np.int32, copy=False))
        if self.nuclei.shape != self.clusters.shape:
            raise InputError(
                f"nuclei labels {self.nuclei.shape} and cluster labels {self.clusters.shape} differ in shape"
            )


def segment_field(
    field: Field,
    *,
    stage: str | StageProfile,
    model: str | Path = CLASSICAL,
    device: str | None = None,
    nucleus_diameter_um: float | None = None,
    return_probabilities: bool = False,
    augment: bool = False,
) -> Labels:
    """Segment one field into nuclei and clusters.

    Parameters
    ----------
    field : Field
        The image; its nuclear channel is found through the stage profile's nuclear stain aliases.
    stage : str or StageProfile
        Stage name or alias; sets size filters and which channels outline clusters.
    model : str or path
        ``"classical"`` for the scikit-image baseline, otherwise a shipped model name
        (``"default"``) or a model directory.
    device : str, optional
        ``"cpu"``, ``"cuda"``; default CUDA when available.
    nucleus_diameter_um : float, optional
        Overrides the typical nucleus diameter (for images without pixel size, give the diameter
        in pixels and no pixel size).
    return_probabilities : bool
        Keep the network's probability maps in ``Labels.probabilities``.
    augment : bool
        CNN models: test-time augmentation (maps averaged over mirror images, 4× the network
        time; see :func:`islet_imaging.models.inference.predict_maps`).
    """
    profile = get_stage(stage)
    if str(model) == CLASSICAL:
        if augment:
            raise InputError("augment needs a CNN model; the classical baseline has no network")
        from islet_imaging.models.classical import segment_classical

        return segment_classical(field, profile, nucleus_diameter_um=nucleus_diameter_um)
    from islet_imaging.models.inference import segment_cnn

    return segment_cnn(
        field,
        profile,
        model=model,
        device=device,
        nucleus_diameter_um=nucleus_diameter_um,
        return_probabilities=return_probabilities,
        augment=augment,
    )


def warn_missing_z_step(field: Field) -> None:
    """Warn (:class:`~islet_imaging.errors.MissingZStepWarning`) for a z-stack without a z step.

    Its planes are then taken as one pixel apart (:attr:`PixelSize.zyx
    <islet_imaging.io.PixelSize.zyx>`), which is rarely true of a microscope's z-stack.
    """
    size = field.pixel_size
    if field.shape[1] > 1 and size is not None and size.z is None:
        warnings.warn(
            MissingZStepWarning(
                f"{field.origin.path or field.name}: a z-stack of {field.shape[1]} planes without a "
                "z step; its planes "
                f"are taken as {size.x:g} µm apart (the pixel size), which sets the objects' "
                "volumes and sizes and how touching ones are split in 3D. Give the z step "
                "(--z-step UM; in Python read_field(..., z_step=UM))"
            ),
            stacklevel=3,
        )
