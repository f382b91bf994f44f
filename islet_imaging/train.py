"""Train (or fine-tune) a segmentation model on datasets in the islet-imaging layout.

The structure follows the torchvision segmentation references: :func:`get_dataset`,
:func:`get_transform`, :func:`train_one_epoch`, :func:`evaluate` and :func:`main`, driven by a frozen
:class:`TrainConfig`. It is also the ``islet-imaging train`` subcommand (:data:`HELP`,
:func:`add_arguments`, :func:`run`); torch is imported inside the functions that need it, so
``islet-imaging --help`` stays fast.

Training data are dataset directories (``DIR/images``, ``DIR/labels/<name>_nuclei.tif``,
``DIR/labels/<name>_clusters.tif``, optional ``DIR/metadata.csv``), the layout ``islet-imaging
synth`` writes and the napari plugin saves corrections into. An image without cluster labels (or
without nuclei labels) trains only the other head: the missing head's loss is masked.

Reproducibility: every random choice comes from generators seeded by ``TrainConfig.seed`` and the
step number (``numpy.random.default_rng([seed, step])`` for the batch, a seeded
``torch.Generator``-equivalent fork for the initial weights); nothing seeds the global RNGs. A
checkpoint holds model, optimizer, scheduler, step, epoch, best score and both configs, so a
resumed run continues exactly as an uninterrupted one would (bit-identical on CPU).

Examples
--------
Train the default model (see ``scripts/train_default.sh`` for the exact shipped command)::

    islet-imaging train --train runs/data/synth_train runs/data/dsb_train \\
        --val runs/data/synth_val runs/data/dsb_val --output models/mymodel --steps 2000
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from islet_imaging._atomic import atomic_write, check_output_folder
from islet_imaging.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from islet_imaging.models._config import ModelConfig, Thresholds
    from islet_imaging.models._dataset import AugmentConfig, DatasetEntry, TrainingImage
    from islet_imaging.stages import StageProfile

__all__ = [
    "HELP",
    "TrainConfig",
    "TrainState",
    "add_arguments",
    "evaluate",
    "get_dataset",
    "get_transform",
    "main",
    "make_batch",
    "run",
    "train_one_epoch",
    "tune_thresholds",
]

log = logging.getLogger(__name__)

#: Errors a distance map can be trained with (``TrainConfig.distance_loss``), and their names.
_DISTANCE_LOSS_NAMES = {"l1": "L1", "bce": "BCE against the soft target", "mse": "squared error"}
DISTANCE_LOSSES: tuple[str, ...] = tuple(_DISTANCE_LOSS_NAMES)

HELP = "train or fine-tune a segmentation model on annotated datasets"
DESCRIPTION = """\
Fine-tune the default model (or train a new one, --init scratch) on annotated images.

Data are dataset directories with images/<name>.<ext> (any format `islet-imaging info` reads,
PNG too), labels/<name>_nuclei.tif and/or labels/<name>_clusters.tif (instance labels) and an
optional metadata.csv (name, stage, pixel_size_um, z_step_um, channel_names joined by "|") -- the
layout `islet-imaging synth` writes and the napari plugin saves corrections into. A missing label
file masks that head's loss. Images are rescaled to the model's pixel size; z-stacks are used
plane by plane.

Validation (--val DIR, or --val-fraction of the --data images) runs the full instance pipeline
every epoch; the checkpoint with the best AP@0.5 is kept, training stops early after --patience
epochs without improvement, and the post-processing thresholds are tuned on the validation images.

Writes MODEL_DIR/ (config.json, weights.safetensors, thresholds.json, README.md model card) and
MODEL_DIR.run/ (last.pt, best.pt, train_log.csv, split.json). --resume continues an interrupted
run exactly where it stopped.

Example (fine-tune on your corrections, 20 % held out for validation):
  islet-imaging train --data my_annotations --out models/my_lab --epochs 30
"""

#: Columns of ``train_log.csv``.
LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "step",
    "lr",
    "loss",
    "loss_nuclei_fg",
    "loss_nuclei_dist",
    "loss_clusters_fg",
    "loss_clusters_dist",
    "val_nuclei_ap50",
    "val_clusters_ap50",
    "val_score",
    "seconds",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored in checkpoints and the model card).

    Parameters
    ----------
    data : tuple of str
        Training dataset directories.
    val : tuple of str
        Validation dataset directories (AP each epoch, early stopping, best checkpoint,
        threshold tuning). Empty: ``val_fraction`` of the training images are held out.
    val_fraction : float
        Share of the annotated training images held out for validation when ``val`` is empty
        (whole images, chosen by ``seed``; 0 = no validation: no early stopping, no tuning).
    out : str
        Model directory to write (config.json, weights.safetensors, thresholds.json, README.md).
    run_dir : str
        Checkpoints and ``train_log.csv`` (default ``<out>.run``).
    data_weights : tuple of float
        Sampling weight of each training directory (default: equal weight per image).
    stage : str
        Stage for images whose metadata.csv names none.
    init : str
        ``"default"`` (fine-tune the shipped default model), ``"scratch"`` (a new network), or
        a model name / directory to fine-tune from (its architecture and weights).
    model_config : dict
        Overrides of :class:`~islet_imaging.models._config.ModelConfig` fields for a new network
        (``init="scratch"`` only; e.g. ``{"base_channels": 16}``).
    add_context_blocks : int
        With an ``init`` model: grow its network by this many context blocks (dilated
        residual blocks at the deepest level, which start as the identity: see
        :func:`~islet_imaging.models.add_context_blocks`) before fine-tuning.
    patch_size, batch_size : int
        Training patch side (px, at the model scale) and patches per step.
    epochs : int
        Number of epochs; the learning-rate schedule spans ``epochs * steps_per_epoch`` steps.
    steps_per_epoch : int
        Steps between validations / checkpoints; 0 = about one pass over the training pixels
        (resolved by :func:`resolve_steps_per_epoch` once the data are read).
    lr, weight_decay : float
        AdamW peak learning rate and weight decay.
    schedule : {"onecycle", "cosine", "constant"}
    loss weights : float
        ``w_foreground``, ``w_dice``, ``w_distance``, ``w_clusters`` (the cluster head's share).
    distance_loss : {"l1", "bce", "mse"}
        How ``sigmoid(logit)`` of a distance map is compared with its target inside objects.
        ``"l1"`` (absolute error) is median-seeking: where the network cannot tell whether a
        contact between two objects is there, it predicts no valley until it is more than half
        sure. ``"bce"`` (binary cross-entropy against the soft target) and ``"mse"`` are
        mean-seeking: an uncertain contact leaves a valley as deep as the network's belief in
        it, which the post-processing's split level (``clusters_saddle``, ``nuclei_seed``) then
        thresholds.
    touch_weight, touch_weight_distance : float
        Pixel weight, relative to 1, of the contact zone between two touching objects in the
        foreground loss and in the distance loss (see :func:`touching_boundaries`).
    cluster_touch_band_px : int
        Half-width (px at the model scale) of the contact zone between touching clusters; for
        nuclei it is 1 px.
    ema : float
        Decay of an exponential moving average of the weights, updated after every step (0 =
        none; e.g. 0.999 averages over roughly the last 1000 steps). When on, the averaged
        network is the one validated, kept as the best checkpoint and written; BatchNorm
        statistics are averaged with the weights.
    seed : int
        Seeds weight initialisation, the validation split and every batch.
    threads : int
        torch intra-op threads (CPU).
    device : {"auto", "cpu", "cuda"}
        Where to train; ``"auto"`` = CUDA when available.
    scale_jitter, augment : ...
        Augmentation strength (see :class:`~islet_imaging.models._dataset.AugmentConfig`).
    max_val_images : int
        Validation images used per epoch (all of them for threshold tuning).
    patience : int
        Early stopping: stop when the validation AP@0.5 has not improved for this many epochs
        (0 = never stop early).
    tune : bool
        Tune post-processing thresholds on the validation set after training.
    relabel_binary : bool
        Accept binary masks as labels (connected components).
    missing_labels : {"error", "skip"}
        Images with neither nuclei nor cluster labels: refuse the data (listing them) or skip them.
    max_minutes : float
        Safety limit on the wall time of the training loop (0 = none): after the epoch that
        crosses it, training stops early (the schedule is then not finished; the model card says
        so). A run that stops this way is not reproduced exactly by the same command.
    """

    data: tuple[str, ...]
    val: tuple[str, ...] = ()
    val_fraction: float = 0.2
    out: str = "models/trained"
    run_dir: str = ""
    data_weights: tuple[float, ...] = ()
    stage: str = "S4"
    init: str = "default"
    model_config: dict[str, Any] = field(default_factory=dict)
    patch_size: int = 256
    batch_size: int = 8
    epochs: int = 20
    steps_per_epoch: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    w_foreground: float = 1.0
    w_dice: float = 1.0
    w_distance: float = 2.0
    w_clusters: float = 0.5
    distance_loss: str = "l1"
    touch_weight: float = 3.0
    touch_weight_distance: float = 1.0
    cluster_touch_band_px: int = 1
    ema: float = 0.0
    add_context_blocks: int = 0
    seed: int = 0
    threads: int = 2
    device: str = "auto"
    scale_jitter: float = 0.2
    augment: bool = True
    max_val_images: int = 24
    patience: int = 5
    tune: bool = True
    max_minutes: float = 0.0
    relabel_binary: bool = False
    missing_labels: str = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        object.__setattr__(self, "val", tuple(str(p) for p in self.val))
        object.__setattr__(self, "data_weights", tuple(float(w) for w in self.data_weights))
        if not self.data:
            raise InputError("give at least one training dataset directory (--data DIR)")
        if self.data_weights and len(self.data_weights) != len(self.data):
            raise InputError(
                f"{len(self.data_weights)} --data-weights for {len(self.data)} --data directories"
            )
        if any(not (w > 0 and math.isfinite(w)) for w in self.data_weights):
            raise InputError("--data-weights must be positive numbers")
        for key in (
            "patch_size",
            "batch_size",
            "epochs",
            "threads",
            "max_val_images",
            "cluster_touch_band_px",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        for key in ("steps_per_epoch", "patience"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{key} must be a non-negative integer, got {value!r}")
        if self.patch_size % 16:
            raise InputError(f"patch_size {self.patch_size} must be a multiple of 16")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise InputError(f"schedule {self.schedule!r} is not onecycle, cosine or constant")
        for key in ("w_foreground", "w_dice", "w_distance", "w_clusters"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(
                    f"--{key.replace('_', '-')} {value:g} must be a number >= 0 (a loss weight)"
                )
        if self.distance_loss not in DISTANCE_LOSSES:
            raise InputError(
                f"--distance-loss {self.distance_loss!r} is not one of {', '.join(DISTANCE_LOSSES)}"
            )
        if not (self.touch_weight >= 1 and self.touch_weight_distance >= 1):
            raise InputError(
                f"--touch-weight {self.touch_weight:g} and --touch-weight-distance "
                f"{self.touch_weight_distance:g} must be >= 1 (1: contact pixels weigh as any other)"
            )
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise InputError("lr must be > 0 and weight_decay >= 0")
        if not 0 <= self.ema < 1:
            raise InputError(
                f"--ema {self.ema:g} must be in [0, 1): the weight of the old average per step "
                "(e.g. 0.999), or 0 for none"
            )
        if not 0 <= self.scale_jitter < 1:
            raise InputError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"device {self.device!r} is not auto, cpu or cuda")
        if self.missing_labels not in ("error", "skip"):
            raise InputError(f"missing_labels {self.missing_labels!r} is not error or skip")
        if not self.init:
            raise InputError("init must be 'default', 'scratch' or a model directory")
        if self.model_config and self.init != "scratch":
            raise InputError(
                "--model-config sets the architecture of a new network; it needs --init scratch "
                f"(fine-tuning keeps the architecture of the --init model {self.init!r})"
            )
        if self.add_context_blocks < 0:
            raise InputError(
                f"--add-context-blocks {self.add_context_blocks} must be >= 0 (0: keep the "
                "architecture)"
            )
        if self.add_context_blocks and self.init == "scratch":
            raise InputError(
                "--add-context-blocks grows the --init model; for a new network give "
                "--model-config '{\"context_blocks\": N}'"
            )
        if not self.run_dir:
            object.__setattr__(self, "run_dir", str(Path(self.out).with_suffix(".run")))

    @property
    def steps(self) -> int:
        """Total optimizer steps (needs a resolved ``steps_per_epoch``)."""
        if not self.steps_per_epoch:
            raise RuntimeError("steps_per_epoch is not resolved yet (resolve_steps_per_epoch)")
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        )


#: Bounds of the automatic epoch length (steps).
AUTO_STEPS_PER_EPOCH: tuple[int, int] = (16, 300)


def resolve_steps_per_epoch(config: TrainConfig, train_set: TrainingSet) -> TrainConfig:
    """``config`` with ``steps_per_epoch`` set: about one pass over the training pixels.

    An epoch samples ``batch_size`` patches of ``patch_size``² per step; the automatic length
    covers the summed area of the training planes once, within :data:`AUTO_STEPS_PER_EPOCH`.
    """
    if config.steps_per_epoch:
        return config
    pixels = sum(int(np.prod(it.shape)) for it in train_set.images)
    per_step = config.batch_size * config.patch_size**2
    lo, hi = AUTO_STEPS_PER_EPOCH
    return dataclasses.replace(config, steps_per_epoch=int(np.clip(-(-pixels // per_step), lo, hi)))


# -- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Training or validation images at the model scale, with per-image sampling weights."""

    images: tuple[TrainingImage, ...]
    weights: np.ndarray  # (N,) float64, sums to 1

    def __len__(self) -> int:
        return len(self.images)


def get_dataset(
    dirs: Sequence[str | Path],
    model_config: ModelConfig,
    *,
    stage: str = "S4",
    weights: Sequence[float] = (),
    relabel_binary: bool = False,
    missing_labels: str = "error",
) -> TrainingSet:
    """Read dataset directories into 2D training images at the model's scale.

    Parameters
    ----------
    dirs : sequence of path
        Dataset directories (see the module docstring).
    model_config : ModelConfig
        Gives the input channels, normalisation and pixel size.
    stage : str
        Stage of images whose metadata names none.
    weights : sequence of float
        Sampling weight per directory, split evenly over its images (default: each image weighs
        the same).
    relabel_binary : bool
        Accept binary masks (connected components).
    missing_labels : {"error", "skip"}
        What to do with images that have no label file (see :func:`scan_data`).

    Returns
    -------
    TrainingSet

    Raises
    ------
    InputError
        A directory that is not a dataset, images without labels or pixel size, bad labels.
    """
    entries = scan_data(dirs, missing_labels=missing_labels)
    return load_training_set(
        entries, dirs, model_config, stage=stage, weights=weights, relabel_binary=relabel_binary
    )


def scan_data(
    dirs: Sequence[str | Path], *, missing_labels: str = "error"
) -> list[tuple[int, DatasetEntry]]:
    """The annotated images of dataset directories, as ``(directory index, entry)`` pairs.

    Images with neither ``labels/<name>_nuclei.tif`` nor ``labels/<name>_clusters.tif`` are
    refused with the list of their names (``missing_labels="error"``) or skipped with a warning
    that lists them (``"skip"``).
    """
    from islet_imaging.models._dataset import scan_dataset

    out: list[tuple[int, DatasetEntry]] = []
    for k, d in enumerate(dirs):
        entries = scan_dataset(d, require_labels=False)
        missing = [e.name for e in entries if not e.has_labels]
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        if missing and (missing_labels == "error" or len(missing) == len(entries)):
            if len(missing) == len(entries):
                raise InputError(
                    "no image has labels (labels/<name>_nuclei.tif or labels/<name>_clusters.tif); "
                    "annotate some images first (e.g. with the napari plugin)",
                    d,
                )
            raise InputError(
                f"{len(missing)} image(s) have no labels (labels/<name>_nuclei.tif or "
                f"labels/<name>_clusters.tif): {shown}. Annotate them, move them out of images/, "
                "or pass --missing-labels skip to train on the annotated images only",
                d,
            )
        if missing:
            log.warning("%s: skipping %d image(s) without labels: %s", d, len(missing), shown)
        out.extend((k, e) for e in entries if e.has_labels)
    return out


def split_validation(
    entries: Sequence[tuple[int, DatasetEntry]],
    fraction: float,
    *,
    seed: int = 0,
    where: Sequence[str | Path] = (),
) -> tuple[list[tuple[int, DatasetEntry]], list[tuple[int, DatasetEntry]]]:
    """Hold out ``fraction`` of the images (whole images, at least one) for validation.

    The choice is a seeded permutation, so the same data and seed give the same split.

    Raises
    ------
    InputError
        Fewer than two images: nothing would be left to train or to validate on.
    """
    n = len(entries)
    n_val = max(1, round(fraction * n))
    if n - n_val < 1:
        raise InputError(
            f"{n} annotated image(s): too few to hold out a validation fraction of {fraction} "
            "and still train. Add images, give a separate validation set with --val DIR, or "
            "pass --val-fraction 0 to train without validation (no early stopping, no "
            "threshold tuning)" + (f" (data: {', '.join(str(w) for w in where)})" if where else "")
        )
    order = np.random.default_rng([seed, 7]).permutation(n)
    val = sorted(int(i) for i in order[:n_val])
    keep = sorted(int(i) for i in order[n_val:])
    return [entries[i] for i in keep], [entries[i] for i in val]


def load_training_set(
    entries: Sequence[tuple[int, DatasetEntry]],
    dirs: Sequence[str | Path],
    model_config: ModelConfig,
    *,
    stage: str = "S4",
    weights: Sequence[float] = (),
    relabel_binary: bool = False,
) -> TrainingSet:
    """Load ``(directory index, entry)`` pairs (:func:`scan_data`) at the model's scale."""
    from islet_imaging.models._dataset import load_entry

    per_dir: dict[int, list[TrainingImage]] = {}
    for k, entry in entries:
        loaded = load_entry(entry, stage=stage, relabel_binary=relabel_binary)
        name = Path(dirs[k]).name
        per_dir.setdefault(k, []).extend(
            prepare_training_images(loaded, model_config, dataset=name)
        )
    images: list[TrainingImage] = []
    w: list[float] = []
    for k, planes in sorted(per_dir.items()):
        share = float(weights[k]) if weights else float(len(planes))
        images.extend(planes)
        w.extend([share / len(planes)] * len(planes))
        log.info("%s: %d training planes", dirs[k], len(planes))
    if not images:
        raise InputError(f"no training image in {', '.join(str(d) for d in dirs)}")
    wa = np.asarray(w, np.float64)
    return TrainingSet(tuple(images), wa / wa.sum())


def prepare_training_images(
    loaded: Any, model_config: ModelConfig, *, dataset: str = ""
) -> list[TrainingImage]:
    """One :class:`TrainingImage` per z-plane: network input and labels at the model scale.

    The input is made exactly as inference makes it (:func:`~islet_imaging.models.inference.prepare_input`
    at the native resolution, then :func:`~islet_imaging.models.inference.resize_image` to the
    model's pixel size); labels are resized with nearest neighbour on the same pixel-centre grid.
    """
    from islet_imaging.models._dataset import TrainingImage
    from islet_imaging.models.inference import (
        prepare_input,
        rescale_factor,
        resize_image,
        resize_labels,
    )

    fld = loaded.field
    if fld.pixel_size is None:
        raise InputError(
            "training image has no pixel size; add pixel_size_um to the dataset's metadata.csv "
            "or write it into the image file",
            loaded.entry.image,
        )
    profile = _stage_profile(loaded.stage)
    inp = prepare_input(fld, profile, model_config)  # (C, Z, Y, X) float32, native resolution
    factor, _ = rescale_factor(fld, model_config)
    z, h, w = fld.spatial_shape
    shape = (max(1, round(h * factor)), max(1, round(w * factor)))
    out: list[TrainingImage] = []
    for k in range(z):
        img = resize_image(inp[:, k], shape)
        nuc, clu = (
            None if lab is None else resize_labels(lab[k], shape).astype(np.int32)
            for lab in (loaded.nuclei, loaded.clusters)
        )
        name = f"{dataset}/{loaded.entry.name}" + (f"_z{k}" if z > 1 else "")
        out.append(TrainingImage(name, img.astype(np.float32), nuc, clu, stage=profile.name))
    return out


def get_transform(config: TrainConfig, *, train: bool = True) -> AugmentConfig:
    """The augmentation for training (``train=True``) or none for validation."""
    from islet_imaging.models._dataset import NO_AUGMENT, AugmentConfig

    if not train or not config.augment:
        return NO_AUGMENT
    return AugmentConfig(scale_jitter=config.scale_jitter)


def make_batch(
    dataset: TrainingSet,
    *,
    step: int,
    config: TrainConfig,
    model_config: ModelConfig,
    augment: AugmentConfig,
) -> dict[str, np.ndarray]:
    """The batch of one step, fully determined by ``(config.seed, step)``.

    Returns
    -------
    dict
        ``"image"``: (N, C, P, P) float32; for each target map ``"<class>_<map>"``: (N, P, P)
        float32; ``"<class>_weight"``: (N, P, P) float32 pixel weights; ``"<class>_present"``:
        (N,) float32, 0 where that class is not annotated (its loss is masked).
    """
    from islet_imaging.models._dataset import random_patch
    from islet_imaging.models._targets import make_targets

    rng = np.random.default_rng([config.seed, step])
    idx = rng.choice(len(dataset), size=config.batch_size, p=dataset.weights)
    context = target_context_px(model_config)
    inner = slice(context, context + config.patch_size)
    images, targets = [], []
    for i in idx:
        item = dataset.images[int(i)]
        patch, (nuc, clu) = random_patch(
            item.image,
            [item.nuclei, item.clusters],
            size=config.patch_size,
            rng=rng,
            augment=augment,
            context=context,
        )
        images.append(patch)
        maps = _targets_for(nuc, clu, model_config, make_targets, config)
        targets.append({k: v if v.ndim == 0 else v[inner, inner] for k, v in maps.items()})
    batch: dict[str, np.ndarray] = {"image": np.stack(images)}
    for key in targets[0]:
        batch[key] = np.stack([t[key] for t in targets])
    return batch


def target_context_px(model_config: ModelConfig) -> int:
    """Label context (px) around a training patch that its targets need.

    A distance target near a patch's edge depends on the labels beyond it: up to the distance
    cap for a capped class, the whole object for a per-object normalised one (taken as three
    typical nucleus diameters; clusters are always capped in practice). Targets are made on the
    patch plus this context and then cut to the patch, so the patch's edge is never an object's
    edge: the network is not taught a distance dip at the edge of its input, which at inference
    is the field's edge.
    """
    from islet_imaging.models._targets import DEFAULT_DISTANCE_CAP_PX

    nucleus_px = model_config.typical_nucleus_diameter_um / model_config.pixel_size_um
    caps = {**DEFAULT_DISTANCE_CAP_PX, **model_config.distance_cap_px}
    needed = [
        3.0 * nucleus_px if caps.get(cls_name) is None else float(caps[cls_name])
        for cls_name, maps in model_config.heads.items()
        if "distance" in maps
    ]
    return math.ceil(max(needed, default=0.0))


def _targets_for(
    nuclei: np.ndarray | None,
    clusters: np.ndarray | None,
    model_config: ModelConfig,
    make_targets: Any,
    config: TrainConfig,
) -> dict[str, np.ndarray]:
    """Target maps, pixel weights and presence flags of one patch.

    Pixel weights are the target's own (0 where a class is not annotated) times a contact term:
    pixels where two touching objects meet weigh ``config.touch_weight`` times more in the
    foreground loss (``<class>_weight``) and ``config.touch_weight_distance`` times more in the
    distance loss (``<class>_distance_weight``), so the network learns the thin gaps that
    separate touching objects.
    """
    ref = nuclei if nuclei is not None else clusters
    assert ref is not None
    nuc = nuclei if nuclei is not None else np.zeros(ref.shape, np.int32)
    maps = make_targets(nuc, clusters, distance_cap_px=model_config.distance_cap_px)
    out: dict[str, np.ndarray] = {}
    for cls_name, head_maps in model_config.heads.items():
        labels = nuclei if cls_name == "nuclei" else clusters
        present = labels is not None
        for m in head_maps:
            out[f"{cls_name}_{m}"] = np.asarray(maps[f"{cls_name}_{m}"], np.float32)
        base = np.asarray(maps[f"{cls_name}_weight"], np.float32)
        if present:
            band = config.cluster_touch_band_px if cls_name == "clusters" else 1
            touch = touching_boundaries(labels, radius=band)
            weight = base * (1.0 + (config.touch_weight - 1.0) * touch)
            d_weight = base * (1.0 + (config.touch_weight_distance - 1.0) * touch)
        else:
            weight = d_weight = np.zeros(ref.shape, np.float32)
        out[f"{cls_name}_weight"] = weight.astype(np.float32)
        out[f"{cls_name}_distance_weight"] = d_weight.astype(np.float32)
        out[f"{cls_name}_present"] = np.float32(present)
    return out


#: ModelConfig fields that define the network's tensors (a checkpoint must agree on them).
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "inputs",
    "base_channels",
    "depth",
    "max_channels",
    "context_blocks",
    "norm",
    "activation",
    "heads",
)


def touching_boundaries(labels: np.ndarray, *, radius: int = 1) -> np.ndarray:
    """Pixels within ``radius`` pixels of two different objects (the gaps between touching objects).

    Parameters
    ----------
    labels : (Y, X) ndarray of int
    radius : int
        Half-width of the band (1: the pixels next to the contact line).

    Returns
    -------
    (Y, X) ndarray of float32
        1 on such pixels, 0 elsewhere.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    if not lab.any():
        return np.zeros(lab.shape, np.float32)
    big = np.iinfo(np.int32).max
    size = 2 * int(radius) + 1
    hi = ndi.maximum_filter(lab, size=size)
    lo = ndi.minimum_filter(np.where(lab > 0, lab, big), size=size)
    return ((lo < big) & (hi != lo)).astype(np.float32)


# -- model, loss, steps --------------------------------------------------------------------------
@dataclass
class TrainState:
    """Mutable state of a run: what a checkpoint holds besides the configs."""

    model: Any
    optimizer: Any
    scheduler: Any
    step: int = 0
    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of ``model`` (``--ema``), or None

    def net(self) -> Any:
        """The network that is validated, kept and written: the moving average when there is one."""
        return self.model if self.ema is None else self.ema.module


def build_model_config(config: TrainConfig) -> tuple[ModelConfig, dict[str, Any] | None]:
    """The model config (new, or the ``--init`` model's) and the ``--init`` model's weights."""
    from islet_imaging.models._config import ModelConfig

    if config.init != "scratch":
        from islet_imaging.models._modeldir import load_model

        loaded = load_model(config.init, device="cpu")
        network = loaded.network
        if config.add_context_blocks:
            from islet_imaging.models._network import add_context_blocks

            network = add_context_blocks(network, config.add_context_blocks)
        # start from the init model's tuned thresholds; the network is copied by init_state
        return network.config.replace(thresholds=loaded.thresholds), network.state_dict()
    return ModelConfig(**config.model_config), None


def training_device(config: TrainConfig) -> str:
    """``config.device`` resolved: ``"auto"`` is CUDA when available, else CPU."""
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {config.device}: no CUDA device is available; use cpu")
    return config.device


def init_state(
    config: TrainConfig, model_config: ModelConfig, state_dict: Any = None
) -> TrainState:
    """Network (initialised from ``config.seed`` without touching the global RNG), AdamW, schedule."""
    import torch

    from islet_imaging.models._network import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_network(model_config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    device = training_device(config)
    model = model.to(device=device, memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.15
        )
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    ema = None
    if config.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # use_buffers: BatchNorm's running statistics are averaged with the weights
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, device=device, ema=ema)


def compute_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    config: TrainConfig,
    model_config: ModelConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked loss over all heads.

    Foreground: pixel-weighted BCE (weights from :func:`make_targets`: class and boundary
    balancing) + soft Dice. Distance: ``config.distance_loss`` (L1, BCE or squared error) between
    ``sigmoid(logit)`` and the target inside the true foreground. A class not annotated in a
    sample (``<class>_present == 0``) adds nothing.
    """
    import torch
    from torch.nn import functional as F

    names = model_config.output_names
    total = logits.new_zeros(())
    parts: dict[str, float] = {}
    for cls_name, head_maps in model_config.heads.items():
        present = batch[f"{cls_name}_present"].reshape(-1, 1, 1)
        n_present = present.sum()
        cls_weight = config.w_clusters if cls_name == "clusters" else 1.0
        if float(n_present) == 0:
            parts[f"loss_{cls_name}_fg"] = float("nan")
            parts[f"loss_{cls_name}_dist"] = float("nan")
            continue
        fg_logit = logits[:, names.index(f"{cls_name}_foreground")]
        fg_t = batch[f"{cls_name}_foreground"]
        w = batch[f"{cls_name}_weight"] * present
        bce = F.binary_cross_entropy_with_logits(fg_logit, fg_t, reduction="none")
        bce = (bce * w).sum() / w.sum().clamp_min(1.0)
        prob = torch.sigmoid(fg_logit) * present
        inter = (prob * fg_t).sum(dim=(1, 2))
        denom = prob.sum(dim=(1, 2)) + (fg_t * present).sum(dim=(1, 2))
        dice_per = 1.0 - (2 * inter + 1.0) / (denom + 1.0)
        dice = (dice_per * present.reshape(-1)).sum() / n_present
        loss_fg = config.w_foreground * bce + config.w_dice * dice
        loss_d = logits.new_zeros(())
        if "distance" in head_maps:
            d_logit = logits[:, names.index(f"{cls_name}_distance")]
            d_t = batch[f"{cls_name}_distance"]
            inside = (fg_t > 0.5).float() * batch[f"{cls_name}_distance_weight"] * present
            if config.distance_loss == "bce":
                err = F.binary_cross_entropy_with_logits(d_logit, d_t, reduction="none")
                # minus its floor (the target's own entropy): 0 at a perfect prediction, as L1
                err = err - F.binary_cross_entropy(d_t, d_t, reduction="none")
            elif config.distance_loss == "mse":
                err = (torch.sigmoid(d_logit) - d_t).square()
            else:
                err = (torch.sigmoid(d_logit) - d_t).abs()
            loss_d = config.w_distance * (err * inside).sum() / inside.sum().clamp_min(1.0)
        total = total + cls_weight * (loss_fg + loss_d)
        parts[f"loss_{cls_name}_fg"] = float(loss_fg.detach())
        parts[f"loss_{cls_name}_dist"] = float(loss_d.detach())
    parts["loss"] = float(total.detach())
    return total, parts


def _to_torch(batch: dict[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
    import torch

    out = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
    out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def train_one_epoch(
    state: TrainState,
    dataset: TrainingSet,
    *,
    config: TrainConfig,
    model_config: ModelConfig,
    augment: AugmentConfig,
    n_steps: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Run ``config.steps_per_epoch`` optimizer steps (fewer at the end of training).

    Returns the mean of each loss part over the epoch.
    """
    import torch

    end = min(config.steps, state.step + (n_steps or config.steps_per_epoch))
    state.model.train()
    sums: dict[str, list[float]] = {}
    bar = _progress(range(state.step, end), progress, desc=f"epoch {state.epoch + 1}")
    for step in bar:
        batch = _to_torch(
            make_batch(
                dataset, step=step, config=config, model_config=model_config, augment=augment
            ),
            state.device,
        )
        logits = state.model(batch["image"])
        loss, parts = compute_loss(logits, batch, config=config, model_config=model_config)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {float(loss)} at step {step}; lower the learning rate")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), 5.0)
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        state.step = step + 1
        for k, v in parts.items():
            if not math.isnan(v):
                sums.setdefault(k, []).append(v)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
    state.epoch += 1
    means = {k: float(np.mean(v)) for k, v in sums.items()}
    means["lr"] = float(state.optimizer.param_groups[0]["lr"])
    return means


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, mininterval=5.0)


# -- evaluation ----------------------------------------------------------------------------------
def predict_images(
    model: Any, images: Sequence[TrainingImage], model_config: ModelConfig
) -> list[dict[str, np.ndarray]]:
    """The network's maps of model-scale images, through the inference code path.

    Uses :func:`~islet_imaging.models.inference.predict_maps` (BatchNorm folded, tiled) on a
    :class:`~islet_imaging.models._modeldir.Model` wrapping the network being trained. Leaves
    the network in eval mode.
    """
    from islet_imaging.models._modeldir import Model
    from islet_imaging.models.inference import predict_maps

    device = next(model.parameters()).device
    wrapped = Model.from_network(model, model_config, device=device)
    return [predict_maps(it.image, wrapped, device=device) for it in images]


def instances_of(
    maps: dict[str, np.ndarray],
    item: TrainingImage,
    thresholds: Thresholds,
    model_config: ModelConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and cluster instances of one model-scale image, with its stage's size filters."""
    from islet_imaging.models.inference import stage_instances

    px = model_config.pixel_size_um  # as segment_cnn post-processes, at the model scale
    profile = _stage_profile(item.stage)
    return stage_instances(maps, (px, px), profile, model_config, thresholds)


def _stage_profile(stage: str | None) -> StageProfile:
    """The stage profile of a training image; one that names no stage is taken as S4, the
    default of ``--stage``."""
    from islet_imaging.stages import get_stage

    return get_stage(stage or "S4")


def evaluate(
    model: Any,
    dataset: TrainingSet,
    *,
    model_config: ModelConfig,
    thresholds: Thresholds | None = None,
    predictions: Sequence[dict[str, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Pooled AP (StarDist definition) of each class on whole validation images.

    The maps go through the same post-processing as inference (at the model scale, with each
    image's stage size filters).

    Returns
    -------
    dict
        ``nuclei_ap50``, ``nuclei_ap75``, ``nuclei_map`` (mean AP over IoU 0.5–0.9), the same for
        ``clusters`` (NaN when no validation image has such labels) and ``score`` (mean of the
        available AP@0.5).
    """
    from islet_imaging.metrics import DEFAULT_THRESHOLDS, match_dataset

    thresholds = thresholds or model_config.thresholds
    images = list(dataset.images)
    if predictions is None:
        predictions = predict_images(model, images, model_config)
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"nuclei": [], "clusters": []}
    for item, maps in zip(images, predictions, strict=True):
        nuc, clu = instances_of(maps, item, thresholds, model_config)
        if item.nuclei is not None:
            pairs["nuclei"].append((item.nuclei, nuc))
        if item.clusters is not None and "clusters" in model_config.heads:
            pairs["clusters"].append((item.clusters, clu))
    out: dict[str, float] = {}
    scores = []
    for cls_name, pr in pairs.items():
        if not pr:
            for k in ("ap50", "ap75", "map"):
                out[f"{cls_name}_{k}"] = float("nan")
            continue
        res = match_dataset(pr, thresholds=DEFAULT_THRESHOLDS)
        aps = [r.ap for r in res]
        out[f"{cls_name}_ap50"] = float(aps[0])
        out[f"{cls_name}_ap75"] = float(aps[DEFAULT_THRESHOLDS.index(0.75)])
        out[f"{cls_name}_map"] = float(np.mean(aps))
        scores.append(aps[0])
    out["score"] = float(np.mean(scores)) if scores else float("nan")
    return out


#: Threshold search: split levels (seed levels, or :data:`TUNE_SADDLES`) tried at the current
#: foreground level, then foreground levels at the best split level (a coordinate search: 7-9
#: post-processings per class).
TUNE_SEEDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
TUNE_FOREGROUNDS: tuple[float, ...] = (0.35, 0.5, 0.65)
#: Candidates of ``nuclei_min_section`` (the nucleus floor of 2D sections through aggregates).
TUNE_SECTIONS: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.85, 1.0)
#: Candidates of ``clusters_outline`` below the cluster foreground level (besides ``None``, the
#: foreground level's own outline).
TUNE_OUTLINES: tuple[float, ...] = (0.5, 0.4, 0.3)
#: ``clusters_saddle`` candidates for models that split clusters at saddles (``"combined"``, the
#: default model's split): how deep a valley between two touching clusters must be to keep them
#: apart, which is how an annotator draws touching colonies and aggregates.
TUNE_SADDLES: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3)
#: ``clusters_shape_h`` candidates for models that split clusters by their shape alone.
TUNE_SHAPE_H: tuple[float, ...] = (0.15, 0.3, 0.45)


def tune_thresholds(
    model: Any,
    dataset: TrainingSet,
    *,
    model_config: ModelConfig,
    max_images: int = 48,
    progress: bool = True,
) -> tuple[Thresholds, dict[str, float]]:
    """Tune the post-processing thresholds of each class on validation images.

    A coordinate search maximising the class's mean AP over IoU 0.5–0.9: the level that splits
    touching objects (:func:`_split_level`: the seed level over :data:`TUNE_SEEDS`, or for
    clusters split at saddles ``clusters_saddle`` over :data:`TUNE_SADDLES`) at the current
    foreground level, then the foreground level over :data:`TUNE_FOREGROUNDS` at the best split
    level (ties keep the current values); then, on the images of aggregate stages
    (2D sections through aggregates), ``nuclei_min_section`` over :data:`TUNE_SECTIONS`, and
    ``clusters_outline`` over :data:`TUNE_OUTLINES` by the bias of the clusters' sizes
    (:func:`_tune_outline`: the annotators' outlines decide where clusters end). The search
    uses up to ``max_images`` images spread over the set; the returned metrics are on the whole
    set.

    Returns
    -------
    thresholds : Thresholds
    metrics : dict
        :func:`evaluate` output on all of ``dataset`` at the tuned thresholds.
    """
    from islet_imaging.models._config import Thresholds

    preds = predict_images(model, dataset.images, model_config)
    idx = _spread_indices(len(dataset), max_images)
    subset = TrainingSet(tuple(dataset.images[i] for i in idx), dataset.weights[idx])
    sub_preds = [preds[i] for i in idx]
    nuclei_only = [{k: v for k, v in p.items() if k.startswith("nuclei_")} for p in sub_preds]
    best = model_config.thresholds
    for cls_name in model_config.heads:
        if all(getattr(it, cls_name) is None for it in subset.images):
            continue
        maps = nuclei_only if cls_name == "nuclei" else sub_preds
        best, value = _tune_class(model, subset, maps, best, cls_name, model_config)
        log.info(
            "tuned %s thresholds: %s (mean AP %.3f on %d images)",
            cls_name,
            best.for_class(cls_name),
            value,
            len(subset),
        )
        if cls_name == "nuclei":
            best = _tune_section(model, subset, nuclei_only, best, model_config)
        else:
            best = _tune_outline(subset, sub_preds, best, model_config)
    assert isinstance(best, Thresholds)
    return best, evaluate(
        model, dataset, model_config=model_config, thresholds=best, predictions=preds
    )


def _tune_class(
    model: Any,
    subset: TrainingSet,
    maps: Sequence[dict[str, np.ndarray]],
    start: Thresholds,
    cls_name: str,
    model_config: ModelConfig,
) -> tuple[Thresholds, float]:
    """Coordinate search of one class's split level (:func:`_split_level`), then its foreground
    level; returns the best and its score. Ties keep the current value."""
    tried: dict[tuple[float, float], float] = {}
    split_name, candidates = _split_level(cls_name, model_config)

    def thresholds(fg: float, split: float) -> Thresholds:
        return dataclasses.replace(start, **{f"{cls_name}_foreground": fg, split_name: split})

    def score(fg: float, split: float) -> float:
        if (fg, split) not in tried:
            tried[(fg, split)] = evaluate(
                model,
                subset,
                model_config=model_config,
                thresholds=thresholds(fg, split),
                predictions=maps,
            )[f"{cls_name}_map"]
        return tried[(fg, split)]

    fg0 = float(getattr(start, f"{cls_name}_foreground"))
    split0 = float(getattr(start, split_name))
    split = max((*candidates, split0), key=lambda v: (score(fg0, v), v == split0))
    fg = max((*TUNE_FOREGROUNDS, fg0), key=lambda f: (score(f, split), f == fg0))
    return thresholds(fg, split), tried[(fg, split)]


def _split_level(cls_name: str, model_config: ModelConfig) -> tuple[str, tuple[float, ...]]:
    """The threshold that decides where touching objects of a class are split, and its candidates.

    Nuclei and clusters split from seeds of the distance map (``"distance"``): the seed level
    (:data:`TUNE_SEEDS`). Clusters split at saddles (``"combined"``): ``clusters_saddle``
    (:data:`TUNE_SADDLES`); by their shape alone (``"shape"``): ``clusters_shape_h``
    (:data:`TUNE_SHAPE_H`). Unsplit clusters (``"none"``) still get their seed level tuned,
    which then changes nothing.
    """
    if cls_name == "clusters" and model_config.cluster_split == "combined":
        return "clusters_saddle", TUNE_SADDLES
    if cls_name == "clusters" and model_config.cluster_split == "shape":
        return "clusters_shape_h", TUNE_SHAPE_H
    return f"{cls_name}_seed", TUNE_SEEDS


def _tune_section(
    model: Any,
    subset: TrainingSet,
    maps: Sequence[dict[str, np.ndarray]],
    start: Thresholds,
    model_config: ModelConfig,
) -> Thresholds:
    """``nuclei_min_section`` over :data:`TUNE_SECTIONS` on the images of aggregate stages with
    nuclei (none: ``start`` unchanged); ties keep the current value, then the higher floor."""
    keep = [
        i
        for i, it in enumerate(subset.images)
        if it.nuclei is not None and _stage_profile(it.stage).cluster_kind == "aggregate"
    ]
    if not keep:
        return start
    sections = TrainingSet(tuple(subset.images[i] for i in keep), subset.weights[keep])
    current = start.nuclei_min_section

    def score(value: float) -> tuple[float, bool, float]:
        th = dataclasses.replace(start, nuclei_min_section=value)
        ap = evaluate(
            model,
            sections,
            model_config=model_config,
            thresholds=th,
            predictions=[maps[i] for i in keep],
        )["nuclei_map"]
        return round(ap, 4), value == current, value

    scores = {value: score(value) for value in {*TUNE_SECTIONS, current}}
    best = max(scores, key=scores.__getitem__)
    log.info(
        "tuned nuclei_min_section: %g (mean AP %.3f on %d images of aggregate stages)",
        best,
        scores[best][0],
        len(keep),
    )
    return dataclasses.replace(start, nuclei_min_section=best)


def _tune_outline(
    subset: TrainingSet,
    maps: Sequence[dict[str, np.ndarray]],
    start: Thresholds,
    model_config: ModelConfig,
) -> Thresholds:
    """``clusters_outline`` over ``None`` and :data:`TUNE_OUTLINES` (the levels below the
    cluster foreground level) on the images with clusters: the smallest
    :func:`~islet_imaging.metrics.size_bias` of the matched clusters' diameters, per stage.
    Ties (within 0.1 %, and no matched cluster away from the edge) keep the current value, then
    the higher level."""
    from islet_imaging.metrics import diameter_errors, size_bias

    keep = [i for i, it in enumerate(subset.images) if it.clusters is not None]
    if not keep:
        return start
    current = start.clusters_outline
    candidates = {None, current, *(v for v in TUNE_OUTLINES if v < start.clusters_foreground)}

    def bias(level: float | None) -> float:
        th = dataclasses.replace(start, clusters_outline=level)
        errors: dict[str, list[float]] = {}
        for i in keep:
            item = subset.images[i]
            _, clusters = instances_of(maps[i], item, th, model_config)
            errors.setdefault(_stage_profile(item.stage).name, []).extend(
                diameter_errors(item.clusters, clusters)
            )
        return size_bias(errors)

    scores = {level: bias(level) for level in candidates}
    if all(np.isnan(v) for v in scores.values()):
        return start
    best = min(
        scores,
        key=lambda v: (
            math.inf if np.isnan(scores[v]) else round(scores[v], 3),  # 0.1 %: noise
            v != current,
            -(start.clusters_foreground if v is None else v),
        ),
    )
    log.info(
        "tuned clusters_outline: %s (mean size bias %.2f %% on %d images; %.2f %% at %s)",
        best,
        100 * scores[best],
        len(keep),
        100 * scores[current],
        current,
    )
    return dataclasses.replace(start, clusters_outline=best)


def _spread_indices(n: int, k: int) -> np.ndarray:
    """Up to ``k`` indices spread evenly over ``range(n)``."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path, state: TrainState, config: TrainConfig, model_config: ModelConfig
) -> Path:
    """Write model, optimizer, scheduler, step, epoch, best score and configs (temp + rename)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": json.dumps(state.history),
        "train_config": json.dumps(config.to_dict()),
        "model_config": json.dumps(model_config.to_dict()),
        "torch_rng": torch.get_rng_state(),
    }
    if state.ema is not None:
        payload["ema"] = state.ema.state_dict()
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read_checkpoint(path: Path, *, missing: str, map_location: str = "cpu") -> dict[str, Any]:
    """A :func:`save_checkpoint` payload, its two configs decoded into dicts.

    Raises :class:`InputError` naming the file: ``missing`` when there is none, "cannot read
    checkpoint" when it is corrupt or not a checkpoint.
    """
    import torch

    if not path.is_file():
        raise InputError(missing, path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        for key in ("model_config", "train_config"):
            payload[key] = json.loads(payload[key])
    except Exception as exc:  # corrupt or foreign file
        raise InputError(f"cannot read checkpoint: {exc}", path) from exc
    return payload


def load_checkpoint(path: str | Path, state: TrainState) -> TrainState:
    """Restore a :class:`TrainState` in place from :func:`save_checkpoint` output."""
    path = Path(path)
    payload = _read_checkpoint(
        path,
        missing="checkpoint not found; give the run's last.pt to --resume",
        map_location=state.device,
    )
    stored = payload["model_config"]
    current = json.loads(json.dumps(state.model.config.to_dict()))
    _refuse_differences(
        stored,
        current,
        ARCHITECTURE_KEYS,
        "the checkpoint is of another architecture",
        "resume with the options (--init, --model-config, --add-context-blocks) of the run that "
        "wrote it",
        path,
    )
    state.model.load_state_dict(payload["model"])
    if state.ema is not None:
        if "ema" not in payload:
            raise InputError(
                "the checkpoint has no moving average of the weights; resume without --ema", path
            )
        state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.step = int(payload["step"])
    state.epoch = int(payload["epoch"])
    state.best_score = float(payload["best_score"])
    state.best_epoch = int(payload.get("best_epoch", 0))
    state.history = json.loads(payload["history"])
    return state


def export_checkpoint(
    path: str | Path, out: str | Path, *, average: bool = True, overwrite: bool = False
) -> Path:
    """Write a checkpoint's network as a model directory (config, weights, thresholds, card).

    For a run whose kept model is not the one wanted: an interrupted run, an intermediate
    epoch, or the last step of a run that kept its starting model because no epoch beat it on
    validation. The config and thresholds are those the checkpoint stores (the run's model
    config: its ``--init`` model's thresholds, not tuned for these weights; tune them with
    ``scripts/tune_postprocess.py --write``).

    Parameters
    ----------
    path : path
        A ``best.pt`` or ``last.pt`` written by :func:`save_checkpoint`.
    out : path
        The model directory to write.
    average : bool
        The moving average of the weights when the run kept one (``--ema``), else the raw
        weights; ``False``: always the raw weights.
    overwrite : bool
        Replace an existing model directory.
    """
    from islet_imaging.models._config import ModelConfig
    from islet_imaging.models._modeldir import save_model, write_model_card
    from islet_imaging.models._network import build_network

    path = Path(path)
    payload = _read_checkpoint(
        path, missing="checkpoint not found; give a run's best.pt or last.pt"
    )
    model_config = ModelConfig.from_dict(payload["model_config"], where=str(path))
    config = TrainConfig.from_dict(payload["train_config"])
    averaged = average and "ema" in payload
    if averaged:
        state = {
            k.removeprefix("module."): v for k, v in payload["ema"].items() if k != "n_averaged"
        }
    else:
        state = payload["model"]
    network = build_network(model_config)
    network.load_state_dict(state)
    step = int(payload["step"])
    out = save_model(out, network, model_config, model_config.thresholds, overwrite=overwrite)
    which = f"the moving average (decay {config.ema:g})" if averaged else "the raw weights"
    write_model_card(
        out,
        training_data=f"Exported from {path} (step {step} of {config.epochs * config.steps_per_epoch}"
        f"), {which}, by islet_imaging.train.export_checkpoint. The run's data and options: "
        f"{path.parent / 'train_config.json'}. Thresholds are the run's starting model's, "
        "not tuned for these weights.",
        command="islet-imaging train " + " ".join(_config_to_argv(config)),
    )
    log.info("wrote %s from %s (step %d, %s)", out, path, step, which)
    return out


def checkpoint_configs(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The train config and model-config dict stored in a checkpoint."""
    payload = _read_checkpoint(Path(path), missing="checkpoint not found")
    return TrainConfig.from_dict(payload["train_config"]), payload["model_config"]


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


# -- main ----------------------------------------------------------------------------------------
def main(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    train_set: TrainingSet | None = None,
    val_set: TrainingSet | None = None,
) -> Path:
    """Train, keep the best checkpoint by validation AP@0.5, tune thresholds, write the model.

    Parameters
    ----------
    config : TrainConfig
    resume : path, optional
        A ``last.pt`` to continue from (the run's configs must match ``config``'s).
    progress : bool
        Show tqdm progress bars.
    overwrite : bool
        Replace an existing model directory at ``config.out`` (refused otherwise, before any
        training).
    train_set, val_set : TrainingSet, optional
        Pre-loaded data (tests); read from ``config.train`` / ``config.val`` otherwise.

    Returns
    -------
    Path
        The written model directory.
    """
    import torch

    check_output(config, overwrite=overwrite or resume is not None)
    torch.set_num_threads(config.threads)
    t_start = time.perf_counter()
    model_config, base_weights = build_model_config(config)
    if config.init != "scratch":  # the fine-tuned model is named after its directory
        model_config = model_config.replace(name=Path(config.out).name)
    run_dir = Path(config.run_dir)
    if train_set is None:
        entries = scan_data(config.data, missing_labels=config.missing_labels)
        val_entries: list[tuple[int, DatasetEntry]] = []
        if not config.val and config.val_fraction > 0 and val_set is None:
            entries, val_entries = split_validation(
                entries, config.val_fraction, seed=config.seed, where=config.data
            )
        read = functools.partial(
            load_training_set,
            model_config=model_config,
            stage=config.stage,
            relabel_binary=config.relabel_binary,
        )
        train_set = read(entries, config.data, weights=config.data_weights)
        if val_entries:
            val_set = read(val_entries, config.data)
            run_dir.mkdir(parents=True, exist_ok=True)
            split = {
                "train": [f"{config.data[k]}/{e.name}" for k, e in entries],
                "val": [f"{config.data[k]}/{e.name}" for k, e in val_entries],
            }
            (run_dir / "split.json").write_text(json.dumps(split, indent=2))
    if val_set is None and config.val:
        val_set = get_dataset(
            config.val,
            model_config,
            stage=config.stage,
            relabel_binary=config.relabel_binary,
            missing_labels=config.missing_labels,
        )
    config = resolve_steps_per_epoch(config, train_set)
    log.info(
        "training on %d images, validating on %d; %d epochs of %d steps of %d × %d² patches",
        len(train_set),
        0 if val_set is None else len(val_set),
        config.epochs,
        config.steps_per_epoch,
        config.batch_size,
        config.patch_size,
    )
    state = init_state(config, model_config, base_weights)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train_log.csv"
    if resume is not None:
        load_checkpoint(resume, state)
        check_resume_config(resume, config)
        log.info("resumed from %s at step %d", resume, state.step)
    elif log_path.exists():
        log_path.unlink()
    (run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    augment = get_transform(config, train=True)
    val_subset = None
    if val_set is not None:
        val_subset = _spread_subset(val_set, config.max_val_images)
    elapsed_before = state.history[-1]["seconds"] if state.history else 0.0
    if val_subset is not None and resume is None and config.init != "scratch":
        # epoch 0: the --init model as it is; fine-tuning must beat it to replace it
        metrics = evaluate(state.net(), val_subset, model_config=model_config)
        state.model.train()
        row0 = {
            "epoch": 0,
            "step": 0,
            "val_nuclei_ap50": metrics.get("nuclei_ap50", float("nan")),
            "val_clusters_ap50": metrics.get("clusters_ap50", float("nan")),
            "val_score": metrics["score"],
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        state.history.append({k: float(v) for k, v in row0.items()})
        _append_log(log_path, row0)
        log.info(
            "before training (%s): val nuclei AP50 %s clusters AP50 %s",
            config.init,
            _fmt(row0["val_nuclei_ap50"]),
            _fmt(row0["val_clusters_ap50"]),
        )
        if math.isfinite(metrics["score"]):
            state.best_score = metrics["score"]
            save_checkpoint(run_dir / "best.pt", state, config, model_config)
    while state.step < config.steps:
        parts = train_one_epoch(
            state,
            train_set,
            config=config,
            model_config=model_config,
            augment=augment,
            progress=progress,
        )
        row: dict[str, Any] = {"epoch": state.epoch, "step": state.step, **parts}
        if val_subset is not None:
            metrics = evaluate(state.net(), val_subset, model_config=model_config)
            state.model.train()
            row["val_nuclei_ap50"] = metrics.get("nuclei_ap50", float("nan"))
            row["val_clusters_ap50"] = metrics.get("clusters_ap50", float("nan"))
            row["val_score"] = metrics["score"]
            score = metrics["score"]
        else:
            score = -parts["loss"]
        row["seconds"] = round(elapsed_before + time.perf_counter() - t_start, 1)
        state.history.append({k: float(v) for k, v in row.items()})
        _append_log(log_path, row)
        log.info(
            "epoch %d step %d loss %.4f val nuclei AP50 %s clusters AP50 %s",
            state.epoch,
            state.step,
            parts.get("loss", float("nan")),
            _fmt(row.get("val_nuclei_ap50")),
            _fmt(row.get("val_clusters_ap50")),
        )
        if math.isfinite(score) and score > state.best_score:
            state.best_score = score
            state.best_epoch = state.epoch
            save_checkpoint(run_dir / "best.pt", state, config, model_config)
        save_checkpoint(run_dir / "last.pt", state, config, model_config)
        if (
            val_subset is not None
            and config.patience
            and state.epoch - state.best_epoch >= config.patience
            and state.step < config.steps
        ):
            log.warning(
                "early stopping at epoch %d: validation AP@0.5 has not improved for %d epochs "
                "(best %.4f at epoch %d)",
                state.epoch,
                config.patience,
                state.best_score,
                state.best_epoch,
            )
            break
        if (
            config.max_minutes
            and row["seconds"] > 60.0 * config.max_minutes
            and state.step < config.steps
        ):
            log.warning(
                "stopping early at step %d of %d: the %.0f-minute limit (--max-minutes) is reached",
                state.step,
                config.steps,
                config.max_minutes,
            )
            break
    return finish(
        config,
        state,
        model_config,
        val_set,
        seconds=time.perf_counter() - t_start + elapsed_before,
        progress=progress,
    )


#: TrainConfig fields that may change when a run is resumed (they do not change the result).
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"threads", "device", "max_minutes", "max_val_images", "patience", "tune"}
)


def check_output(config: TrainConfig, *, overwrite: bool = False) -> None:
    """Refuse to replace the ``--init`` model, or an existing model without ``overwrite``.

    ``--out`` and the run directory (checkpoints, ``<out>.run`` by default) must be directories
    or not exist yet: a file of either name is the user's and is never replaced.
    """
    out = Path(config.out)
    fix = "move the file or choose another --out or --run-dir"
    check_output_folder(out, "--out", fix)
    check_output_folder(
        Path(config.run_dir), "the run directory (--run-dir; default: the --out path + .run)", fix
    )
    if config.init != "scratch":
        from islet_imaging.models._modeldir import resolve_model_dir

        if out.exists() and out.resolve() == resolve_model_dir(config.init):
            raise InputError(
                "--out is the --init model itself; write the fine-tuned model to a new directory",
                out,
            )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(
            "the model directory already exists; choose another --out or pass --overwrite to "
            "replace it",
            out,
        )


def check_resume_config(path: str | Path, config: TrainConfig) -> None:
    """A resumed run must have the options of the run that wrote the checkpoint.

    Raises
    ------
    InputError
        Listing the options that differ (only those in :data:`RESUMABLE_CHANGES` may).
    """
    stored, _ = checkpoint_configs(path)
    a = stored.to_dict()
    _refuse_differences(
        a,
        config.to_dict(),
        [k for k in a if k not in RESUMABLE_CHANGES],
        "the checkpoint was written by a run with other options",
        "resume with the same options",
        path,
    )


def _refuse_differences(
    stored: dict[str, Any],
    current: dict[str, Any],
    keys: Sequence[str],
    what: str,
    todo: str,
    path: str | Path,
) -> None:
    """InputError listing the ``keys`` whose values differ between a checkpoint and this run."""
    differ = sorted(k for k in keys if k in stored and stored[k] != current.get(k))
    if differ:
        listed = "; ".join(f"{k}: {stored[k]!r} there, {current.get(k)!r} now" for k in differ)
        raise InputError(f"{what} ({listed}); {todo}", path)


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"


def _spread_subset(dataset: TrainingSet, n: int) -> TrainingSet:
    """Up to ``n`` images spread evenly over the dataset (all datasets and stages represented)."""
    if len(dataset) <= n:
        return dataset
    idx = _spread_indices(len(dataset), n)
    w = dataset.weights[idx]
    return TrainingSet(tuple(dataset.images[i] for i in idx), w / w.sum())


def finish(
    config: TrainConfig,
    state: TrainState,
    model_config: ModelConfig,
    val_set: TrainingSet | None,
    *,
    seconds: float,
    progress: bool = True,
) -> Path:
    """Load the best weights, tune thresholds, write the model directory and its card."""
    from islet_imaging.models._modeldir import save_model

    run_dir = Path(config.run_dir)
    best = run_dir / "best.pt"
    if best.is_file():  # its weights only: the history and optimizer stay the last epoch's
        payload = _read_checkpoint(best, missing="", map_location=state.device)
        state.model.load_state_dict(payload["model"])
        if state.ema is not None:
            state.ema.load_state_dict(payload["ema"])
        best_step = int(payload["step"])
    else:
        best_step = state.step
    net = state.net()
    thresholds = model_config.thresholds
    metrics: dict[str, float] = {}
    if val_set is not None:
        if config.tune:
            thresholds, metrics = tune_thresholds(
                net, val_set, model_config=model_config, progress=progress
            )
        else:
            metrics = evaluate(net, val_set, model_config=model_config)
    model_config = model_config.replace(thresholds=thresholds)
    net.config = model_config
    out = save_model(config.out, net, model_config, thresholds, overwrite=True)
    write_card(
        out, config, metrics=metrics, seconds=seconds, best_step=best_step, history=state.history
    )
    summary = {
        "best_step": best_step,
        "seconds": round(seconds, 1),
        "validation": metrics,
        "thresholds": thresholds.to_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s (validation: %s)", out, {k: round(v, 3) for k, v in metrics.items()})
    return out


def write_card(
    directory: str | Path,
    config: TrainConfig,
    *,
    metrics: dict[str, float],
    seconds: float,
    best_step: int,
    history: Sequence[dict[str, float]] = (),
) -> Path:
    """The model card (README.md) of a trained model: data, command, time, validation, limits.

    The command is ``$ISLET_TRAIN_COMMAND`` when set (``scripts/train_default.sh`` sets it to
    itself), else the equivalent ``islet-imaging train`` line; ``$ISLET_TRAIN_DATA`` may hold a
    fuller description of the training data.
    """
    from islet_imaging.models._modeldir import write_model_card

    command = os.environ.get("ISLET_TRAIN_COMMAND") or "islet-imaging train " + " ".join(
        _config_to_argv(config)
    )
    data = os.environ.get("ISLET_TRAIN_DATA") or (
        "Training directories: "
        + ", ".join(f"`{d}`" for d in config.data)
        + (
            "; validation: " + ", ".join(f"`{d}`" for d in config.val)
            if config.val
            else f"; validation: {config.val_fraction:.0%} of the training images held out "
            f"(seed {config.seed}; list in {config.run_dir}/split.json)"
            if config.val_fraction
            else "; no validation set"
        )
        + f". Started from: {'a new network' if config.init == 'scratch' else config.init}."
    )
    done = int(history[-1]["step"]) if history else config.steps
    if done >= config.steps:
        steps_done = f"{config.steps}"
    elif config.max_minutes and history and history[-1]["seconds"] > 60 * config.max_minutes:
        steps_done = f"{done} of {config.steps} (stopped by --max-minutes {config.max_minutes:g})"
    else:
        steps_done = f"{done} of {config.steps} (early stopping, patience {config.patience})"
    training: dict[str, Any] = {
        "initial weights": "new network" if config.init == "scratch" else config.init,
        "epochs × steps": f"{config.epochs} × {config.steps_per_epoch}",
        "best checkpoint (step)": (
            f"{best_step} (the initial model: fine-tuning did not improve validation AP@0.5)"
            if best_step == 0
            else best_step
        ),
        "batch size × patch": f"{config.batch_size} × {config.patch_size}²",
        "optimizer": f"AdamW lr {config.lr} wd {config.weight_decay}, {config.schedule}"
        + (f"; weights: moving average, decay {config.ema:g}" if config.ema else ""),
        "loss": "weighted BCE + Dice (foreground), "
        f"{_DISTANCE_LOSS_NAMES[config.distance_loss]} inside objects (distance, "
        f"× {config.w_distance:g}); "
        f"contact weight {config.touch_weight:g} (foreground), "
        f"{config.touch_weight_distance:g} (distance), cluster contact band "
        f"±{config.cluster_touch_band_px} px; cluster head × {config.w_clusters}; "
        "heads without labels masked",
        "augmentation": (
            f"scale ±{config.scale_jitter:.0%}, flips, 90° rotations, gain, gamma, noise, blur"
            if config.augment
            else "none"
        ),
        "seed": config.seed,
        "wall time": f"{seconds / 60:.1f} min, "
        + (f"{config.threads} CPU threads" if config.device in ("auto", "cpu") else config.device),
        "steps done": steps_done,
    }
    if history and int(history[0]["epoch"]) == 0:
        training["validation AP@0.5 of the initial model (nuclei / clusters)"] = (
            f"{_fmt(history[0].get('val_nuclei_ap50'))} / {_fmt(history[0].get('val_clusters_ap50'))}"
        )
    if history and "loss" in history[-1]:
        training["final training loss"] = round(float(history[-1].get("loss", float("nan"))), 4)
    shown = {
        f"validation {k.replace('_', ' ')}": round(v, 4)
        for k, v in metrics.items()
        if k != "score" and not math.isnan(v)
    }
    limitations = os.environ.get("ISLET_TRAIN_LIMITATIONS") or (
        "Validation figures are on the validation set the thresholds were tuned on (optimistic); "
        "see benchmarks/ for held-out accuracy."
    )
    return write_model_card(
        directory,
        training_data=data,
        metrics=shown,
        command=command,
        training=training,
        limitations=limitations,
    )


def _config_to_argv(config: TrainConfig) -> list[str]:
    argv = ["--data", *config.data]
    argv += ["--val", *config.val] if config.val else ["--val-fraction", f"{config.val_fraction:g}"]
    argv += ["--out", config.out, "--init", config.init, "--epochs", str(config.epochs)]
    argv += ["--steps-per-epoch", str(config.steps_per_epoch), "--lr", f"{config.lr:g}"]
    argv += ["--ema", f"{config.ema:g}"] if config.ema else []
    if config.distance_loss != TrainConfig.distance_loss:
        argv += ["--distance-loss", config.distance_loss]
    if config.w_distance != TrainConfig.w_distance:
        argv += ["--w-distance", f"{config.w_distance:g}"]
    if config.add_context_blocks:
        argv += ["--add-context-blocks", str(config.add_context_blocks)]
    argv += ["--seed", str(config.seed)]
    return argv


# -- command line --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``islet-imaging train``."""
    d = TrainConfig(data=("x",))
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", nargs="+", required=True, metavar="DIR", help="training dataset directories"
    )
    data.add_argument(
        "--data-weights",
        nargs="+",
        type=float,
        default=[],
        metavar="W",
        help="sampling weight of each --data directory (default: each image equally)",
    )
    held_out = data.add_mutually_exclusive_group()
    held_out.add_argument(
        "--val", nargs="+", default=[], metavar="DIR", help="validation dataset directories"
    )
    held_out.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        metavar="F",
        help=f"without --val: hold out this share of the --data images (default {d.val_fraction};"
        " 0 = no validation)",
    )
    data.add_argument(
        "--stage", default=d.stage, help="stage of images whose metadata.csv names none"
    )
    data.add_argument(
        "--missing-labels",
        choices=("error", "skip"),
        default=d.missing_labels,
        help="images without label files: refuse the data (default) or skip them",
    )
    data.add_argument(
        "--relabel-binary",
        action="store_true",
        help="accept binary masks as labels (connected components; touching objects merge)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    model.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")
    model.add_argument(
        "--init",
        default=d.init,
        metavar="NAME|PATH",
        help="start from this model (default: the shipped 'default' model); 'scratch' = new network",
    )
    model.add_argument(
        "--model-config",
        default="",
        help="with --init scratch: JSON object of ModelConfig fields, e.g. '{\"depth\": 4}'",
    )
    model.add_argument(
        "--add-context-blocks",
        type=int,
        default=0,
        metavar="N",
        help="grow the --init model by N dilated residual blocks at its deepest level (a wider "
        "receptive field; they start as the identity) before fine-tuning (default 0)",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    opt.add_argument(
        "--steps-per-epoch",
        type=int,
        default=d.steps_per_epoch,
        help="optimizer steps per epoch (default 0: about one pass over the training pixels)",
    )
    opt.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"patches per step (default {d.batch_size})",
    )
    opt.add_argument(
        "--patch-size",
        type=int,
        default=d.patch_size,
        help=f"patch side in px at the model scale, a multiple of 16 (default {d.patch_size})",
    )
    opt.add_argument(
        "--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default {d.lr:g})"
    )
    opt.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay"
    )
    opt.add_argument(
        "--ema",
        type=float,
        default=d.ema,
        metavar="DECAY",
        help="keep an exponential moving average of the weights with this decay per step and "
        "validate, keep and write it instead of the raw weights (e.g. 0.999; default 0 = off)",
    )
    opt.add_argument(
        "--schedule",
        choices=("onecycle", "cosine", "constant"),
        default=d.schedule,
        help="learning-rate schedule over all epochs",
    )
    opt.add_argument(
        "--distance-loss",
        choices=DISTANCE_LOSSES,
        default=d.distance_loss,
        help="error of the distance maps: l1 (median-seeking), bce or mse (mean-seeking: an "
        f"uncertain contact leaves a shallow valley) (default {d.distance_loss})",
    )
    for flag, key, kind, what in (
        ("--w-clusters", "w_clusters", float, "weight of the cluster head's loss"),
        ("--w-distance", "w_distance", float, "weight of the distance maps' loss"),
        ("--touch-weight", "touch_weight", float, "foreground-loss weight of contact pixels"),
        (
            "--touch-weight-distance",
            "touch_weight_distance",
            float,
            "distance-loss weight of contact pixels",
        ),
        (
            "--cluster-touch-band",
            "cluster_touch_band_px",
            int,
            "half-width (px at model scale) of the contact zone between touching clusters",
        ),
    ):
        default = getattr(d, key)
        opt.add_argument(flag, type=kind, default=default, help=f"{what} (default {default:g})")
    opt.add_argument(
        "--scale-jitter", type=float, default=d.scale_jitter, help="±relative scale augmentation"
    )
    opt.add_argument("--no-augment", action="store_true", help="no augmentation")
    opt.add_argument(
        "--seed", type=int, default=d.seed, help="seeds weights, validation split and batches"
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--device",
        default=d.device,
        help="auto (CUDA when available), cpu or cuda[:N] (default auto)",
    )
    run.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    run.add_argument(
        "--run-dir", default="", help="checkpoints and train_log.csv (default MODEL_DIR.run)"
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run exactly (default: RUN_DIR/last.pt)",
    )
    run.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop when validation AP@0.5 has not improved for this many epochs (0 = never; "
        f"default {d.patience})",
    )
    run.add_argument(
        "--max-val-images", type=int, default=d.max_val_images, help="validation images per epoch"
    )
    run.add_argument(
        "--no-tune", action="store_true", help="do not tune thresholds on the validation set"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop training after the epoch that passes this wall time (0 = no limit)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed ``islet-imaging train`` arguments."""
    overrides: dict[str, Any] = {}
    if args.model_config:
        try:
            overrides = json.loads(args.model_config)
        except json.JSONDecodeError as exc:
            raise InputError(f"--model-config is not valid JSON: {exc}") from None
        if not isinstance(overrides, dict):
            raise InputError("--model-config must be a JSON object")
    return TrainConfig(
        data=tuple(args.data),
        val=tuple(args.val),
        val_fraction=args.val_fraction,
        out=args.out,
        run_dir=args.run_dir,
        data_weights=tuple(args.data_weights),
        stage=args.stage,
        init=args.init,
        model_config=overrides,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        ema=args.ema,
        add_context_blocks=args.add_context_blocks,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        w_clusters=args.w_clusters,
        w_distance=args.w_distance,
        distance_loss=args.distance_loss,
        touch_weight=args.touch_weight,
        touch_weight_distance=args.touch_weight_distance,
        cluster_touch_band_px=args.cluster_touch_band,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        scale_jitter=args.scale_jitter,
        augment=not args.no_augment,
        max_val_images=args.max_val_images,
        patience=args.patience,
        max_minutes=args.max_minutes,
        tune=not args.no_tune,
        relabel_binary=args.relabel_binary,
        missing_labels=args.missing_labels,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``islet-imaging train``."""
    config = config_from_args(args)
    resume = args.resume
    if resume == "last":
        resume = Path(config.run_dir) / "last.pt"
    out = main(config, resume=resume, progress=not args.no_progress, overwrite=args.overwrite)
    log.info("model written to %s", out)
    return 0
