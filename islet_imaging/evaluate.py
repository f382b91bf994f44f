"""``islet-imaging evaluate``: segmentation accuracy of one or more models against truth labels.

Each image of one or more dataset directories (the layout :mod:`islet_imaging.synth` writes:
``DIR/images/<name>.ome.tif``, ``DIR/labels/<name>_nuclei.tif``, ``DIR/labels/<name>_clusters.tif``,
``DIR/metadata.csv``) is read at its native pixel grid, segmented by every model
(:func:`islet_imaging.segment.segment_field`: ``"default"``, ``"classical"`` or a model
directory) and its nuclei and clusters are matched one-to-one to the truth
(:func:`islet_imaging.metrics.match`) at several IoU thresholds (default 0.5, 0.55, ..., 0.9).

Metrics, per threshold ``t`` (``tp`` matched pairs, ``fp`` unmatched predictions, ``fn``
unmatched true objects; see :mod:`islet_imaging.metrics` for the empty-image convention):

- ``ap@t`` = tp / (tp + fp + fn), the DSB 2018 / StarDist "average precision";
- ``precision@t``, ``recall@t``, ``f1@t``;
- ``pq@t`` = panoptic quality = sum of matched IoUs / (tp + fp / 2 + fn / 2);
- ``tp@t``, ``fp@t``, ``fn@t``;
- ``mean_ap``: the mean of ``ap@t`` over the thresholds used (the COCO-style 0.5:0.95 average,
  over 0.5:0.9 by default);
- at the lowest threshold ``t0`` only, why objects went unmatched
  (:func:`islet_imaging.metrics.error_kinds`): ``fn_missed@t0``, ``fn_split@t0``,
  ``fn_merged@t0``, ``fn_outline@t0`` (true objects) and ``fp_spurious@t0``, ``fp_merged@t0``,
  ``fp_fragment@t0``, ``fp_outline@t0`` (predictions); they add up to ``fn@t0`` and ``fp@t0``;
- at ``t0`` too, how far the sizes are off (:func:`islet_imaging.metrics.diameter_errors`: the
  true objects away from the image edge that a prediction matches): ``n_sized``, the number of
  such objects, ``diameter_bias``, the mean of ``d_pred / d_true − 1`` (equivalent diameters;
  what moves totals such as IEQ), and ``diameter_error``, the mean of its absolute value
  (``null`` when there is none).

*Pooled* results add tp, fp, fn and matched-IoU sums over the images before taking the ratios
(large images weigh more); *per-image* results are the same metrics of each image alone.

Which images count
------------------
A head (nuclei or clusters) is scored on an image only when that image has the matching label
file. An image that cannot be read, whose labels do not fit it, or that some model fails to
segment is recorded as a failure and left out for *every* model, so the models are always
compared on the same images; evaluation goes on with the next image and the command exits
with 1 at the end. A model that cannot be loaded, a data directory that is missing or holds no
labelled image, and bad options are refused up front (:class:`~islet_imaging.errors.InputError`,
exit code 2).

JSON schema (``--out``)
-----------------------
::

    {
      "schema": "islet-imaging-evaluate/1",
      "version": "<islet-imaging version>",
      "models": [{"name": "default", "path": "/.../models/default", "seconds": 12.3}, ...],
      "data": ["runs/data/synth_val", ...],
      "iou_thresholds": [0.5, 0.55, ..., 0.9],
      "pooled": {"<model>": {"nuclei": {<metrics>}, "clusters": {<metrics>}}},
      "by_stage": {"<model>": {"<kind>": {"<stage>": {<metrics>}, ...}}},
      "per_image": [{"data": ..., "image": ..., "stage": ..., "model": ..., "kind": ...,
                     "seconds": ..., <metrics>}, ...],
      "failures": [{"data": ..., "image": ..., "model": <name or null>, "reason": ...}, ...]
    }

``<metrics>`` is a flat mapping: ``n_images``, ``n_true``, ``n_pred``, ``mean_ap`` and, for each
threshold ``t`` written as ``f"{t:g}"`` (``0.5``, ``0.55``, ...), ``ap@t``, ``precision@t``,
``recall@t``, ``f1@t``, ``pq@t``, ``tp@t``, ``fp@t``, ``fn@t``, and the error kinds and size
figures at the lowest threshold (above). A kind that no image has truth for is absent from ``pooled``; ``by_stage``
pools the images of each stage on their own. ``path`` is
``null`` for the classical baseline; ``seconds`` is the model's total segmentation time. The
``--csv`` table has one row per (data, image, model, kind) with the same columns as ``per_image``.

Examples
--------
>>> import numpy as np
>>> truth = np.zeros((1, 20, 20), np.int32); truth[0, :10, :10] = 1; truth[0, 10:, 10:] = 2
>>> pred = np.zeros_like(truth); pred[0, :10, :10] = 5
>>> s = score_pairs([(truth, pred)], thresholds=(0.5,))
>>> s["ap@0.5"], s["precision@0.5"], s["recall@0.5"], s["n_true"], s["n_pred"]
(0.5, 1.0, 0.5, 2, 1)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from islet_imaging.errors import InputError, logged_warnings
from islet_imaging.metrics import pool_matchings

if TYPE_CHECKING:
    from islet_imaging.io import Field
    from islet_imaging.metrics import Matching
    from islet_imaging.models._dataset import DatasetEntry
    from islet_imaging.stages import StageProfile

__all__ = [
    "DESCRIPTION",
    "HELP",
    "OBJECT_KINDS",
    "Evaluation",
    "Failure",
    "ImageScore",
    "add_arguments",
    "evaluate_dataset",
    "parse_thresholds",
    "run",
    "score_matchings",
    "score_pairs",
]

log = logging.getLogger(__name__)

#: The object kinds scored, in table order.
OBJECT_KINDS: tuple[str, ...] = ("nuclei", "clusters")
SCHEMA = "islet-imaging-evaluate/1"
CLASSICAL = "classical"
_PER_THRESHOLD = ("ap", "precision", "recall", "f1", "pq", "tp", "fp", "fn")
#: Thresholds whose AP the summary table shows (those of them in use).
_TABLE_AP = (0.5, 0.75, 0.9)

HELP = "accuracy (AP, precision, recall, F1, PQ) of segmentation models against truth labels"

DESCRIPTION = """\
Segment every labelled image of one or more dataset directories (images/, labels/, metadata.csv:
the layout `islet-imaging synth` writes) with each --model, match nuclei and clusters one-to-one
to the truth at IoU thresholds 0.5, 0.55, ..., 0.9, and print per object kind a table: AP
(tp / (tp + fp + fn)) at 0.5, 0.75 and 0.9, the mean AP over the thresholds, precision, recall,
F1 and panoptic quality at 0.5, and object counts, pooled over the images; then, per model, why
objects went unmatched at the lowest threshold: true objects missed, split, merged with another or
loosely outlined, predictions spurious, merged, fragments or loose; how far the matched objects'
diameters are off (bias: the mean signed error, what moves totals such as IEQ; and the mean
absolute error); and, when the images span
two or more stages, AP@0.5 of each stage on its own. With two or more models a difference row
(model − first model) follows. --out writes everything (pooled, per stage and per image, every
threshold) as JSON, --csv the per-image table.

Images are read at their own pixel grid; pixel size, channel names and stage come from
metadata.csv, else from the file (--pixel-size, --channel-names override; --stage is used for
images that name none). A head is scored only on images that have its label file. Images without a
pixel size: give --nucleus-diameter in pixels, or the CNN estimates it itself and the classical
baseline from the image (Otsu).

Exit code: 0 if every image was scored, 1 if some failed (they are listed and left out for every
model), 2 for bad options, a missing or empty dataset, or a model that cannot be loaded.

Examples:
  islet-imaging evaluate --model default --data runs/data/synth_val
  islet-imaging evaluate --model default --model classical --data runs/data/synth_val \\
      --out eval.json --csv eval_per_image.csv
  islet-imaging evaluate --model models/my_model --data dsb/ --stage S1 --iou 0.5,0.75
"""


# -- scores ---------------------------------------------------------------------------------------
def _key(threshold: float) -> str:
    return f"{threshold:g}"


def score_matchings(matchings: Sequence[Matching]) -> dict[str, Any]:
    """The flat metrics record of one matching result per threshold.

    Parameters
    ----------
    matchings : sequence of Matching
        One per threshold (from :func:`islet_imaging.metrics.match`, or pooled), same objects.

    Returns
    -------
    dict
        ``n_images``, ``n_true``, ``n_pred``, ``mean_ap`` and per threshold ``t``: ``ap@t``,
        ``precision@t``, ``recall@t``, ``f1@t``, ``pq@t``, ``tp@t``, ``fp@t``, ``fn@t``
        (``t`` formatted with ``:g``).
    """
    if not matchings:
        raise InputError("no matching results to score; give at least one threshold")
    first = matchings[0]
    out: dict[str, Any] = {
        "n_images": int(first.n_images),
        "n_true": int(first.n_true),
        "n_pred": int(first.n_pred),
        "mean_ap": float(np.mean([m.ap for m in matchings])),
    }
    for m in matchings:
        k = _key(m.threshold)
        out[f"ap@{k}"] = float(m.ap)
        out[f"precision@{k}"] = float(m.precision)
        out[f"recall@{k}"] = float(m.recall)
        out[f"f1@{k}"] = float(m.f1)
        out[f"pq@{k}"] = float(m.panoptic_quality)
        out[f"tp@{k}"] = int(m.tp)
        out[f"fp@{k}"] = int(m.fp)
        out[f"fn@{k}"] = int(m.fn)
    return out


def score_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    thresholds: float | Iterable[float] | None = None,
) -> dict[str, Any]:
    """Pooled metrics of (truth, prediction) label image pairs.

    Parameters
    ----------
    pairs : iterable of (truth, pred)
        ``(Y, X)`` or ``(Z, Y, X)`` integer label images, 0 = background; each pair the same
        shape. Give one pair for the metrics of a single image.
    thresholds : float or iterable of float, optional
        IoU thresholds in (0, 1]; default 0.5, 0.55, ..., 0.9.

    Returns
    -------
    dict
        See :func:`score_matchings`; counts are added over the pairs before the ratios.

    Raises
    ------
    InputError
        No pairs, labels of different shapes, non-integer labels or bad thresholds.

    Examples
    --------
    >>> t = np.zeros((8, 8), np.int32); t[:4, :4] = 1
    >>> score_pairs([(t, t)], thresholds=0.5)["ap@0.5"]
    1.0
    """
    from islet_imaging.metrics import DEFAULT_THRESHOLDS, match_dataset

    ths = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    pooled = match_dataset(list(pairs), thresholds=ths)
    return score_matchings(pooled)  # type: ignore[arg-type]


def parse_thresholds(text: str | Iterable[float] | None) -> tuple[float, ...]:
    """IoU thresholds from ``"0.5,0.75"``, a range ``"0.5:0.9:0.05"`` (inclusive) or numbers.

    Returns them sorted, without duplicates, rounded to 6 decimals; ``None`` gives the default
    0.5, 0.55, ..., 0.9.

    Examples
    --------
    >>> parse_thresholds("0.75, 0.5")
    (0.5, 0.75)
    >>> parse_thresholds("0.5:0.7:0.1")
    (0.5, 0.6, 0.7)
    """
    from islet_imaging.metrics import DEFAULT_THRESHOLDS

    if text is None:
        return DEFAULT_THRESHOLDS
    values: list[float] = []
    if isinstance(text, str):
        try:
            if ":" in text:
                parts = [float(p) for p in text.split(":")]
                if len(parts) != 3 or not parts[2] > 0 or parts[1] < parts[0]:
                    raise ValueError
                n = math.floor((parts[1] - parts[0]) / parts[2] + 1e-9) + 1
                values = [parts[0] + i * parts[2] for i in range(n)]
            else:
                values = [float(p) for p in text.replace(";", ",").split(",") if p.strip()]
        except ValueError:
            raise InputError(
                f"IoU thresholds {text!r} are not understood; give numbers like 0.5,0.75 or a "
                "range START:STOP:STEP like 0.5:0.9:0.05"
            ) from None
    else:
        values = [float(v) for v in text]
    out = tuple(sorted({round(v, 6) for v in values}))
    if not out:
        raise InputError("give at least one IoU threshold, e.g. --iou 0.5")
    for t in out:
        if not (0.0 < t <= 1.0):
            raise InputError(f"IoU threshold {t:g} must be in (0, 1]")
    return out


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImageScore:
    """Matching of one model's prediction of one object kind on one image.

    Parameters
    ----------
    data : str
        The dataset directory.
    image : str
        The image name (``images/<name>.ome.tif``).
    stage : str
        The stage profile used to segment it.
    model : str
        The model name as given.
    kind : str
        ``"nuclei"`` or ``"clusters"``.
    matchings : tuple of Matching
        One per threshold (counts only).
    seconds : float
        Segmentation time of this image by this model (both kinds).
    errors : dict of str to int
        Why objects went unmatched at the lowest threshold
        (:func:`islet_imaging.metrics.error_kinds`); empty when not computed.
    sizes : tuple of float
        :func:`islet_imaging.metrics.diameter_errors` at the lowest threshold.
    """

    data: str
    image: str
    stage: str
    model: str
    kind: str
    matchings: tuple[Matching, ...]
    seconds: float = 0.0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    sizes: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The record of ``per_image`` in the JSON output."""
        return {
            "data": self.data,
            "image": self.image,
            "stage": self.stage,
            "model": self.model,
            "kind": self.kind,
            "seconds": round(self.seconds, 3),
            **score_matchings(self.matchings),
            **_error_columns(self.errors, self.matchings[0].threshold),
            **_size_columns(self.sizes),
        }


def _error_columns(errors: dict[str, int], threshold: float) -> dict[str, int]:
    return {f"{k}@{_key(threshold)}": int(v) for k, v in errors.items()}


def _size_columns(sizes: Sequence[float]) -> dict[str, Any]:
    """``n_sized``, ``diameter_bias`` and ``diameter_error`` (None without sized objects)."""
    values = np.asarray(sizes, dtype=np.float64)
    return {
        "n_sized": int(values.size),
        "diameter_bias": float(values.mean()) if values.size else None,
        "diameter_error": float(np.abs(values).mean()) if values.size else None,
    }


@dataclass(frozen=True)
class Failure:
    """An image left out of the evaluation, and why (``model`` is ``None`` for read errors)."""

    data: str
    image: str
    reason: str
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"data": self.data, "image": self.image, "model": self.model, "reason": self.reason}


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The result of :func:`evaluate_dataset`: per-image matchings of every model, and failures.

    Parameters
    ----------
    models : tuple of str
        Model names as given, in order (the first is the reference of difference rows).
    data : tuple of str
        The dataset directories.
    thresholds : tuple of float
        IoU thresholds.
    per_image : tuple of ImageScore
        One per scored (image, model, kind).
    failures : tuple of Failure
        Images left out.
    model_paths : tuple of (str or None)
        Each model's directory (``None`` for the classical baseline).
    """

    models: tuple[str, ...]
    data: tuple[str, ...]
    thresholds: tuple[float, ...]
    per_image: tuple[ImageScore, ...]
    failures: tuple[Failure, ...] = ()
    model_paths: tuple[str | None, ...] = ()

    def kinds(self) -> tuple[str, ...]:
        """The object kinds scored on at least one image, in :data:`OBJECT_KINDS` order."""
        present = {s.kind for s in self.per_image}
        return tuple(k for k in OBJECT_KINDS if k in present)

    def stages(self) -> tuple[str, ...]:
        """The stages of the scored images, in the order they were first scored."""
        return tuple(dict.fromkeys(s.stage for s in self.per_image))

    def _rows(self, model: str, kind: str, stage: str | None) -> list[ImageScore]:
        return [
            s
            for s in self.per_image
            if s.model == model and s.kind == kind and (stage is None or s.stage == stage)
        ]

    def pooled_matchings(
        self, model: str, kind: str, stage: str | None = None
    ) -> tuple[Matching, ...] | None:
        """One pooled :class:`~islet_imaging.metrics.Matching` per threshold (None: not scored).

        ``stage``: pool only the images of that stage (default all).
        """
        rows = self._rows(model, kind, stage)
        if not rows:
            return None
        return tuple(
            pool_matchings([s.matchings[k] for s in rows]) for k in range(len(self.thresholds))
        )

    def pooled(self, stage: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{model: {kind: metrics}}`` pooled over the images (see the module docstring).

        ``stage``: pool only the images of that stage (default all).
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for model in self.models:
            out[model] = {}
            for kind in self.kinds():
                pooled = self.pooled_matchings(model, kind, stage)
                if pooled is not None:
                    sizes = [v for s in self._rows(model, kind, stage) for v in s.sizes]
                    out[model][kind] = (
                        score_matchings(pooled)
                        | _error_columns(self.pooled_errors(model, kind, stage), self.thresholds[0])
                        | _size_columns(sizes)
                    )
        return out

    def by_stage(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """``{model: {kind: {stage: metrics}}}``: the images of each stage pooled on their own."""
        per_stage = {stage: self.pooled(stage) for stage in self.stages()}
        return {
            model: {
                kind: {
                    stage: pooled[model][kind]
                    for stage, pooled in per_stage.items()
                    if kind in pooled[model]
                }
                for kind in self.kinds()
            }
            for model in self.models
        }

    def pooled_errors(self, model: str, kind: str, stage: str | None = None) -> dict[str, int]:
        """The error kinds at the lowest threshold, added over the images (of ``stage``)."""
        from islet_imaging.metrics import pool_error_kinds

        return pool_error_kinds(s.errors for s in self._rows(model, kind, stage))

    def seconds(self, model: str) -> float:
        """Total segmentation time of ``model`` over the scored images."""
        done: dict[tuple[str, str], float] = {}
        for s in self.per_image:
            if s.model == model:
                done[(s.data, s.image)] = s.seconds
        return float(sum(done.values()))

    def per_image_table(self) -> list[dict[str, Any]]:
        """One record per (data, image, model, kind), as in ``per_image`` of the JSON."""
        return [s.as_dict() for s in self.per_image]

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable (schema in the module docstring)."""
        from islet_imaging import __version__

        paths = self.model_paths or (None,) * len(self.models)
        return {
            "schema": SCHEMA,
            "version": __version__,
            "models": [
                {"name": m, "path": p, "seconds": round(self.seconds(m), 3)}
                for m, p in zip(self.models, paths, strict=True)
            ],
            "data": list(self.data),
            "iou_thresholds": list(self.thresholds),
            "pooled": self.pooled(),
            "by_stage": self.by_stage(),
            "per_image": self.per_image_table(),
            "failures": [f.as_dict() for f in self.failures],
        }

    def _error_lines(self, models: Sequence[str], kind: str, width: int) -> list[str]:
        """Lines of the table: why objects went unmatched at the lowest threshold, per model."""
        from islet_imaging.metrics import FN_KINDS, FP_KINDS

        t = _key(self.thresholds[0])
        lines = []
        for m in models:
            e = self.pooled_errors(m, kind)
            if not e:
                continue
            fn = ", ".join(f"{e.get(f'fn_{k}', 0)} {k}" for k in FN_KINDS)
            fp = ", ".join(f"{e.get(f'fp_{k}', 0)} {k}" for k in FP_KINDS)
            lines.append(f"{m.ljust(width)}  unmatched at IoU {t}: true {fn}; predicted {fp}")
        pooled = self.pooled()
        for m in models:
            size = pooled[m][kind]
            if size["n_sized"]:
                lines.append(
                    f"{m.ljust(width)}  diameters of {size['n_sized']} matched objects away from "
                    f"the edge: bias {100 * size['diameter_bias']:+.1f} %, mean |error| "
                    f"{100 * size['diameter_error']:.1f} %"
                )
        return lines

    def _stage_lines(
        self,
        by_stage: dict[str, dict[str, dict[str, dict[str, Any]]]],
        models: Sequence[str],
        kind: str,
        k: str,
    ) -> list[str]:
        """Lines of the table: AP at ``k`` of each stage on its own (``by_stage`` empty: none)."""
        if not by_stage:
            return []
        header = ["stage", "images", *(f"{m} AP@{k}" for m in models)]
        rows = []
        for stage in self.stages():
            metrics = [by_stage[m][kind].get(stage) for m in models]
            if all(v is None for v in metrics):
                continue
            n_img = next(v for v in metrics if v is not None)["n_images"]
            rows.append(
                [stage, str(n_img), *("-" if v is None else _fmt(v[f"ap@{k}"]) for v in metrics)]
            )
        if len(rows) < 2:
            return []
        lines, _ = _align([header, *rows])
        return [f"by stage ({kind}):", *("  " + line for line in lines)]

    def table(self) -> str:
        """The pooled summary as plain text: one block per object kind, one row per model."""
        ths = self.thresholds
        ap_ths = [t for t in _TABLE_AP if t in ths] or sorted({ths[0], ths[-1]})
        at = 0.5 if 0.5 in ths else ths[0]
        k = _key(at)
        span = f"{ths[0]:g}:{ths[-1]:g}" if len(ths) > 1 else f"{ths[0]:g}"
        columns: list[tuple[str, str]] = [(f"AP@{_key(t)}", f"ap@{_key(t)}") for t in ap_ths]
        columns += [
            (f"mAP@{span}", "mean_ap"),
            (f"P@{k}", f"precision@{k}"),
            (f"R@{k}", f"recall@{k}"),
            (f"F1@{k}", f"f1@{k}"),
            (f"PQ@{k}", f"pq@{k}"),
            ("n_true", "n_true"),
            ("n_pred", "n_pred"),
        ]
        pooled = self.pooled()
        by_stage = self.by_stage() if len(self.stages()) > 1 else {}
        blocks: list[str] = []
        for kind in self.kinds():
            rows: list[list[str]] = []
            scored = [m for m in self.models if kind in pooled[m]]
            for m in scored:
                rows.append([m, *(_fmt(pooled[m][kind][key]) for _, key in columns)])
            ref = scored[0] if scored else None
            for m in scored[1:]:
                assert ref is not None
                rows.append(
                    [
                        f"{m} − {ref}",
                        *(
                            _fmt(pooled[m][kind][key] - pooled[ref][kind][key], signed=True)
                            for _, key in columns
                        ),
                    ]
                )
            n_img = pooled[scored[0]][kind]["n_images"] if scored else 0
            header = ["model", *(c for c, _ in columns)]
            aligned, widths = _align([header, *rows])
            lines = [f"{kind} ({n_img} image{'s' if n_img != 1 else ''}, IoU {span})", *aligned]
            lines += self._error_lines(scored, kind, widths[0])
            lines += self._stage_lines(by_stage, scored, kind, k)
            blocks.append("\n".join(lines))
        if not blocks:
            blocks.append("no image was scored")
        if self.failures:
            blocks.append(f"{len(self.failures)} image(s) failed and were left out (see the log)")
        return "\n\n".join(blocks)


def _align(rows: list[list[str]]) -> tuple[list[str], list[int]]:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned; and the
    column widths."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        ).rstrip()
        for r in rows
    ]
    return lines, widths


def _fmt(value: float | int, *, signed: bool = False) -> str:
    if isinstance(value, (int, np.integer)):
        return f"{value:+d}" if signed else f"{value:d}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


# -- evaluation of datasets -----------------------------------------------------------------------
@dataclass(frozen=True)
class _ModelSpec:
    name: str
    path: str | None  # the model directory; None for the classical baseline

    @property
    def classical(self) -> bool:
        return self.name == CLASSICAL


def _resolve_models(models: Sequence[str | Path], device: str | None) -> list[_ModelSpec]:
    names = [str(m) for m in models]
    if not names:
        raise InputError("give at least one model, e.g. --model default or --model classical")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"model(s) {dupes} given twice; give each model once")
    specs = []
    for name in names:
        if name == CLASSICAL:
            specs.append(_ModelSpec(name, None))
            continue
        from islet_imaging.models._modeldir import load_model  # imports torch

        mdl = load_model(name, device=device)  # ModelError (an InputError) for a bad model
        specs.append(_ModelSpec(name, None if mdl.path is None else str(mdl.path)))
    return specs


def _scan(data: Sequence[str | Path]) -> list[tuple[str, list[DatasetEntry]]]:
    from islet_imaging.models._dataset import scan_dataset

    if not data:
        raise InputError("give at least one dataset directory, e.g. --data runs/data/synth_val")
    out = []
    for root in data:
        path = Path(root)
        if not path.exists():
            raise InputError("dataset directory does not exist", path)
        if not path.is_dir():
            raise InputError(
                "not a directory; give a dataset directory with images/ and labels/", path
            )
        out.append((str(root), scan_dataset(path, require_labels=True)))
    return out


def _stage_of(
    entry_stage: str | None,
    fld: Field,
    default: str | None,
    stages_file: str | Path | None,
    cache: dict[str, StageProfile],
) -> StageProfile:
    from islet_imaging.stages import get_stage

    name = entry_stage or fld.origin.stage or default
    if not name:
        raise InputError(
            "the image names no stage (metadata.csv or file); pass --stage (e.g. --stage S6)",
            fld.origin.path,
        )
    if name not in cache:
        cache[name] = get_stage(name, stages_file=stages_file)
    return cache[name]


def _diameter_for(
    spec: _ModelSpec, fld: Field, profile: StageProfile, nucleus_diameter: float | None
) -> float | None:
    """The nucleus diameter given to the segmenter (px for fields without a pixel size)."""
    if nucleus_diameter is not None or fld.pixel_size is not None or not spec.classical:
        return nucleus_diameter  # the CNN estimates a missing one itself
    from islet_imaging.models.classical import estimate_nucleus_diameter

    channels = profile.match_channels(fld.channel_names)
    if "nuclear" not in channels:
        return None  # segment_classical names the missing channel
    image = fld.data[channels["nuclear"]]
    est = estimate_nucleus_diameter(image if fld.is_3d else image[0])
    if est is None:
        raise InputError(
            "no pixel size and no nucleus found to estimate the nucleus diameter from; "
            "pass --pixel-size or --nucleus-diameter",
            fld.origin.path,
        )
    log.info("%s: no pixel size; nucleus diameter estimated as %.1f px", fld.name, est)
    return est


def _segment(
    spec: _ModelSpec,
    fld: Field,
    profile: StageProfile,
    *,
    device: str | None,
    nucleus_diameter: float | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    from islet_imaging.segment import segment_field

    t0 = time.perf_counter()
    diameter = _diameter_for(spec, fld, profile, nucleus_diameter)
    with logged_warnings(log, f"{fld.name} ({spec.name}): "):
        labels = segment_field(
            fld,
            stage=profile,
            model=spec.path or spec.name,
            device=device,
            nucleus_diameter_um=diameter,
        )
    return labels.nuclei, labels.clusters, time.perf_counter() - t0


def _strip(matchings: Sequence[Matching]) -> tuple[Matching, ...]:
    """Counts only (drop the matched id arrays) to keep large evaluations small."""
    return tuple(pool_matchings([m]) for m in matchings)


def evaluate_dataset(
    models: Sequence[str | Path],
    data: Sequence[str | Path],
    *,
    thresholds: float | Iterable[float] | None = None,
    stage: str | None = None,
    stages_file: str | Path | None = None,
    device: str | None = None,
    pixel_size: float | None = None,
    z_step: float | None = None,
    nucleus_diameter: float | None = None,
    channel_names: Sequence[str] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Segment the labelled images of dataset directories with each model and match to truth.

    Parameters
    ----------
    models : sequence of str or path
        ``"default"`` (or another shipped model name), ``"classical"`` or model directories;
        distinct. The first is the reference of the table's difference rows.
    data : sequence of path
        Dataset directories (``images/``, ``labels/``, optional ``metadata.csv``).
    thresholds : float or iterable of float, optional
        IoU thresholds in (0, 1]; default 0.5, 0.55, ..., 0.9.
    stage : str, optional
        Stage of images that name none (in metadata.csv or the file).
    stages_file : path, optional
        Extra stage profiles (TOML).
    device : str, optional
        ``"cpu"`` or ``"cuda"`` for CNN models; default CUDA when available.
    pixel_size : float, optional
        x = y pixel size in µm for every image (overrides metadata.csv and the files).
    z_step : float, optional
        µm between the planes of z-stacks (overrides metadata.csv and the files).
    nucleus_diameter : float, optional
        Typical nucleus diameter: µm for images with a pixel size, pixels for images without.
        Without it, for images without pixel size the CNN estimates it and the classical
        baseline uses :func:`~islet_imaging.models.classical.estimate_nucleus_diameter`.
    channel_names : sequence of str, optional
        Channel names for every image (overrides metadata.csv and the files).
    progress : bool
        Show a progress bar (on a terminal only).

    Returns
    -------
    Evaluation
        Per-image matchings and failures; ``.pooled()``, ``.table()``, ``.to_dict()``.

    Raises
    ------
    InputError
        Bad options, a missing data directory or one without labelled images, or a model that
        cannot be loaded (:class:`~islet_imaging.errors.ModelError`). Unreadable images and
        segmentation failures are *not* raised: they are recorded in ``Evaluation.failures``.
    """
    from islet_imaging.metrics import diameter_errors, error_kinds, match
    from islet_imaging.models._dataset import load_entry

    ths = parse_thresholds(thresholds if not isinstance(thresholds, int | float) else [thresholds])
    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(f"pixel size {pixel_size} must be a positive number of µm")
    if nucleus_diameter is not None and not (
        math.isfinite(nucleus_diameter) and nucleus_diameter > 0
    ):
        raise InputError(f"nucleus diameter {nucleus_diameter} must be a positive number")
    if stage is not None:
        from islet_imaging.stages import get_stage

        get_stage(stage, stages_file=stages_file)  # fail early on an unknown stage
    datasets = _scan(data)
    specs = _resolve_models(models, device)
    profiles: dict[str, StageProfile] = {}
    scores: list[ImageScore] = []
    failures: list[Failure] = []
    jobs = [(root, e) for root, entries in datasets for e in entries]
    from tqdm.auto import tqdm

    for root, entry in tqdm(
        jobs, desc="evaluate", unit="image", disable=None if progress else True
    ):
        if pixel_size is not None:
            entry = dataclasses.replace(entry, pixel_size_um=float(pixel_size))
        if z_step is not None:
            entry = dataclasses.replace(entry, z_step_um=float(z_step))
        if channel_names is not None:
            entry = dataclasses.replace(entry, channel_names=tuple(channel_names))
        try:
            loaded = load_entry(entry, stage=stage)
            fld: Field = loaded.field  # type: ignore[assignment]
            profile = _stage_of(entry.stage, fld, stage, stages_file, profiles)
        except InputError as exc:
            log.error("%s", exc)
            failures.append(Failure(root, entry.name, str(exc)))
            continue
        truth = {"nuclei": loaded.nuclei, "clusters": loaded.clusters}
        image_scores: list[ImageScore] = []
        failed = False
        for spec in specs:
            try:
                nuclei, clusters, seconds = _segment(
                    spec, fld, profile, device=device, nucleus_diameter=nucleus_diameter
                )
            except InputError as exc:
                reason = str(exc)
            except (RuntimeError, MemoryError, OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                for kind, pred in (("nuclei", nuclei), ("clusters", clusters)):
                    true = truth[kind]
                    if true is None:
                        continue
                    image_scores.append(
                        ImageScore(
                            data=root,
                            image=entry.name,
                            stage=profile.name,
                            model=spec.name,
                            kind=kind,
                            matchings=_strip(match(true, pred, thresholds=ths)),
                            seconds=seconds,
                            errors=error_kinds(true, pred, threshold=ths[0]),
                            sizes=tuple(diameter_errors(true, pred, threshold=ths[0])),
                        )
                    )
                continue
            log.error("%s (%s): segmentation failed: %s", entry.image, spec.name, reason)
            failures.append(Failure(root, entry.name, reason, spec.name))
            failed = True
            break
        if not failed:
            scores.extend(image_scores)
    if failures:
        log.error(
            "%d image(s) left out:\n%s",
            len(failures),
            "\n".join(f"  {f.data}/{f.image}: {f.reason}" for f in failures),
        )
    return Evaluation(
        models=tuple(s.name for s in specs),
        data=tuple(root for root, _ in datasets),
        thresholds=ths,
        per_image=tuple(scores),
        failures=tuple(failures),
        model_paths=tuple(s.path for s in specs),
    )


# -- output ---------------------------------------------------------------------------------------
def write_json(path: str | Path, evaluation: Evaluation, *, overwrite: bool = False) -> Path:
    """Write :meth:`Evaluation.to_dict` as JSON, atomically; refuse an existing file."""
    from islet_imaging._atomic import atomic_write

    path = Path(path)
    _check_target(path, overwrite, "--out")
    text = json.dumps(evaluation.to_dict(), indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: str | Path, evaluation: Evaluation, *, overwrite: bool = False) -> Path:
    """Write the per-image table (one row per data, image, model, kind) as CSV, atomically."""
    from islet_imaging._atomic import atomic_write

    path = Path(path)
    _check_target(path, overwrite, "--csv")
    rows = evaluation.per_image_table()
    fields = list(rows[0]) if rows else ["data", "image", "stage", "model", "kind", "seconds"]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def _check_target(path: Path, overwrite: bool, option: str) -> None:
    if path.is_dir():
        raise InputError(f"{option} must be a file name, not a folder", path)
    if path.exists() and not overwrite:
        raise InputError(f"{option} file already exists; pass --overwrite to replace it", path)


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` options to ``parser``."""
    from islet_imaging.models._cli import add_device_option, add_image_overrides

    inp = parser.add_argument_group("input")
    inp.add_argument(
        "--data",
        nargs="+",
        required=True,
        type=Path,
        metavar="DIR",
        help="dataset directories (images/, labels/<name>_nuclei.tif, _clusters.tif, metadata.csv)",
    )
    inp.add_argument(
        "--stage", metavar="S", help="stage of images whose metadata names none (e.g. S6)"
    )
    add_image_overrides(inp, source="metadata.csv and the files")
    mod = parser.add_argument_group("models")
    mod.add_argument(
        "--model",
        action="append",
        metavar="NAME|PATH",
        help="'default', another shipped model name, a model directory or 'classical'; repeat "
        "to compare models side by side (default: default)",
    )
    add_device_option(mod)
    met = parser.add_argument_group("metrics")
    met.add_argument(
        "--iou",
        metavar="T",
        help="IoU thresholds: a list 0.5,0.75 or a range 0.5:0.9:0.05 (default 0.5:0.9:0.05)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="FILE.json", help="write all results as JSON")
    out.add_argument("--csv", type=Path, metavar="FILE.csv", help="write the per-image table")
    out.add_argument(
        "--overwrite", action="store_true", help="replace existing --out / --csv files"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate``; returns 0 if every image was scored, 1 if any failed."""
    from islet_imaging.io._cli import split_channel_names

    thresholds = parse_thresholds(args.iou)
    targets = [(p, o) for p, o in ((args.out, "--out"), (args.csv, "--csv")) if p is not None]
    for path, option in targets:
        _check_target(path, args.overwrite, option)  # fail before the long part
    if args.out is not None and args.csv is not None and args.out.resolve() == args.csv.resolve():
        raise InputError("--out and --csv name the same file", args.out)
    evaluation = evaluate_dataset(
        args.model or ["default"],
        args.data,
        thresholds=thresholds,
        stage=args.stage,
        stages_file=args.stages,
        device=args.device,
        pixel_size=args.pixel_size,
        z_step=args.z_step,
        nucleus_diameter=args.nucleus_diameter,
        channel_names=split_channel_names(args.channel_names),
        progress=True,
    )
    sys.stdout.write(evaluation.table() + "\n")
    if args.out is not None:
        log.info("wrote %s", write_json(args.out, evaluation, overwrite=args.overwrite))
    if args.csv is not None:
        log.info("wrote %s", write_csv(args.csv, evaluation, overwrite=args.overwrite))
    return 1 if evaluation.failures else 0
