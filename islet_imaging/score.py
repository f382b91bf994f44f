"""Score images on one machine: read → segment → measure → threshold → aggregate → write tables.

The steps are separate functions so that other drivers (the Dask batch runner, napari) reuse them:

* :func:`measure_field` — one Field and its Labels → a :class:`FieldResult` (cells with intensities,
  clusters with geometry; no positivity yet, because thresholds may pool cells over a plate);
* :func:`score_image` — read one file (all its series), segment and measure each field;
* :func:`finalize` — thresholds, positivity calls, cluster composition, field / well / plate /
  stage summaries → :class:`ScoreTables`;
* :func:`write_tables` — CSV + Parquet, written atomically;
* :func:`score_path` — all of the above over an image or a folder, with failures recorded.

The table schema is documented in ``docs/tables.md``.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from islet_imaging._atomic import atomic_write, check_output_folder
from islet_imaging.errors import (
    CoarseImageWarning,
    EmptyImageWarning,
    InputError,
    MissingZStepWarning,
    SmallImageWarning,
    logged_warnings,
)
from islet_imaging.io._plate import PlateMap, discover_images, parse_plate_name
from islet_imaging.measure._cells import BackgroundMethod, measure_cells
from islet_imaging.measure._clusters import cluster_composition, measure_clusters
from islet_imaging.measure._positivity import (
    MIN_CELLS,
    Threshold,
    ThresholdSpec,
    call_positive,
    control_threshold,
    find_threshold,
    population_names,
    thresholds_table,
)
from islet_imaging.stages import StageProfile, get_stage

if TYPE_CHECKING:
    from islet_imaging.io import Field
    from islet_imaging.segment import Labels

__all__ = [
    "DEFAULT_MODEL",
    "TABLE_NAMES",
    "FieldResult",
    "ScoreOptions",
    "ScoreRun",
    "ScoreTables",
    "finalize",
    "measure_field",
    "resolve_stage",
    "score_image",
    "score_path",
    "write_tables",
]

log = logging.getLogger(__name__)
#: Segmentation warnings recorded in the fields table's ``flags`` (each is also logged).
WARNING_FLAGS: dict[type[Warning], str] = {
    EmptyImageWarning: "empty_image",
    SmallImageWarning: "small_image",
    CoarseImageWarning: "coarse_image",
    MissingZStepWarning: "no_z_step",
}

#: The segmentation model ``score`` uses when none is given (one place to change it): the shipped
#: CNN. On the sample plate it finds 44 of the 46 whole clusters (classical baseline: 37), with a
#: smaller median-diameter error (1.7 % vs 4.2 %) and marker-fraction error (0.98 vs 1.75 pp):
#: ``benchmarks/sample_plate.py``; benchmarks/README.md has the held-out comparison.
DEFAULT_MODEL = "default"

#: Tables written by :func:`write_tables`, in order.
TABLE_NAMES: tuple[str, ...] = (
    "cells",
    "clusters",
    "fields",
    "wells",
    "plates",
    "stages",
    "thresholds",
)

_ID_COLUMNS = ("image", "plate", "well", "field", "stage")


@dataclass(frozen=True)
class ScoreOptions:
    """How to score.

    Parameters
    ----------
    stage : str, optional
        Stage for every image; otherwise the plate map's stage of each well.
    model : str
        Segmentation model (``"classical"``, a shipped model name or a model directory).
    threshold : ThresholdSpec
        Positivity method (and fixed values).
    threshold_scope : {"image", "plate"}
        Threshold each image on its own cells (``"image"``, default; an image with fewer than 20
        cells uses the threshold pooled over its stage's images), or pool the cells of all images
        of a stage for one threshold per marker (``"plate"``). Per-image thresholds follow
        field-to-field differences in staining and illumination; pooled ones need comparable
        intensities across the plate.
    cytoplasm_um : float, optional
        Cytoplasm reach beyond the nucleus, µm; default half the stage's typical nucleus diameter.
    background : {"ring", "global", "none"}
        Background correction (see :func:`islet_imaging.measure.background_levels`).
    statistic : {"mean", "median", "integrated"}
        Per-cell value thresholded for positivity.
    on_unimodal : {"sbr", "keep", "nan"}
        What to do when a marker's intensities are unimodal (see
        :func:`islet_imaging.measure.find_threshold`).
    stages_file : str, optional
        A TOML file with extra stage profiles (``--stages``).
    min_cells, min_clusters : int
        Low-count flags.
    augment : bool
        CNN models: test-time augmentation (maps averaged over mirror images; 4× the network
        time, see :func:`islet_imaging.models.inference.predict_maps`). The ``fields`` table's
        ``segmentation`` column then reads ``<model>+augment``.
    """

    stage: str | None = None
    model: str = DEFAULT_MODEL
    threshold: ThresholdSpec = field(default_factory=ThresholdSpec)
    threshold_scope: str = "image"
    cytoplasm_um: float | None = None
    background: BackgroundMethod = "ring"
    statistic: str = "mean"
    on_unimodal: str = "sbr"
    stages_file: str | None = None
    min_cells: int = 50
    min_clusters: int = 5
    augment: bool = False

    def __post_init__(self) -> None:
        if self.augment and self.model == "classical":
            raise InputError("--augment needs a CNN model; the classical baseline has no network")
        if self.threshold_scope not in ("plate", "image"):
            raise InputError(f"threshold scope {self.threshold_scope!r} is not 'plate' or 'image'")
        if self.statistic not in ("mean", "median", "integrated"):
            raise InputError(
                f"statistic {self.statistic!r} is not 'mean', 'median' or 'integrated'"
            )
        if self.on_unimodal not in ("sbr", "keep", "nan"):
            raise InputError(f"on_unimodal {self.on_unimodal!r} is not 'sbr', 'keep' or 'nan'")
        if self.cytoplasm_um is not None and not self.cytoplasm_um >= 0:
            raise InputError(f"cytoplasm_um={self.cytoplasm_um} must be >= 0")


@dataclass(eq=False)
class FieldResult:
    """Measurements of one field before positivity calls.

    Attributes
    ----------
    info : dict
        ``image``, ``plate``, ``well``, ``field``, ``stage``, ``path``, ``imaged_area_mm2``,
        ``n_planes``, ``pixel_size_x_um``, ``pixel_size_y_um``, ``z_step_um``, ``flags``, ``method``.
    cells, clusters : pandas.DataFrame
        From :func:`islet_imaging.measure.measure_cells` / ``measure_clusters`` with the id columns.
    profile : StageProfile
        The stage the field was measured as.
    """

    info: dict[str, Any]
    cells: pd.DataFrame
    clusters: pd.DataFrame
    profile: StageProfile


@dataclass(eq=False)
class ScoreTables:
    """All output tables (see ``docs/tables.md``)."""

    cells: pd.DataFrame
    clusters: pd.DataFrame
    fields: pd.DataFrame
    wells: pd.DataFrame
    plates: pd.DataFrame
    stages: pd.DataFrame
    thresholds: pd.DataFrame

    def items(self) -> Iterable[tuple[str, pd.DataFrame]]:
        for name in TABLE_NAMES:
            yield name, getattr(self, name)


@dataclass(eq=False)
class ScoreRun:
    """What :func:`score_path` produced: the tables and the images that failed."""

    tables: ScoreTables | None
    failures: list[tuple[str, str]]
    out: Path | None = None


def resolve_stage(
    *,
    stage: str | None,
    well: str | None,
    plate_map: PlateMap | None,
    field_stage: str | None,
    where: str,
    stages_file: str | Path | None = None,
) -> StageProfile:
    """The stage of one image: ``stage`` if given, else the plate map's, else the file's.

    Raises
    ------
    InputError
        When none of them gives a stage; the message says how to give one.
    """
    if stage:
        return get_stage(stage, stages_file=stages_file)
    if plate_map is not None and well is not None:
        s = plate_map.stage_of(well)
        if s:
            return get_stage(s, stages_file=stages_file)
    if field_stage:
        return get_stage(field_stage, stages_file=stages_file)
    hint = (
        f"well {well} is not in the plate map {plate_map.path}; add it, or"
        if plate_map is not None and well is not None
        else "give a plate map (--plate-map CSV with columns well,stage,...) or"
    )
    raise InputError(f"no stage for this image: {hint} give --stage (e.g. --stage S6)", where)


def _marker_channels(field: Field, profile: StageProfile) -> dict[str, int]:
    profile.nuclear_channel(field.channel_names, field.origin.path)
    mapping = profile.match_channels(field.channel_names)
    missing = [m for m in profile.marker_names if m not in mapping]
    if missing:
        raise InputError(
            f"marker(s) {missing} of stage {profile.name!r} are missing from this image "
            f"(channels {list(field.channel_names)}); name the channels with --channel-names "
            "or choose the right --stage",
            field.origin.path,
        )
    return mapping


def measure_field(
    field: Field,
    labels: Labels,
    *,
    stage: str | StageProfile,
    image: str | None = None,
    plate: str | None = None,
    well: str | None = None,
    cytoplasm_um: float | None = None,
    background: BackgroundMethod = "ring",
) -> FieldResult:
    """Measure the cells and clusters of one segmented field.

    Parameters
    ----------
    field : Field
        The image (its pixel size is required).
    labels : Labels
        Nuclei and clusters on the field's (Z, Y, X) grid.
    stage : str or StageProfile
        Decides the markers and their compartments.
    image, plate, well : str, optional
        Identifiers written into the tables (defaults from ``field.origin``; the well falls back
        to the file name's plate-style well, then to the image name).
    cytoplasm_um : float, optional
        Default: half the stage's typical nucleus diameter.
    background : {"ring", "global", "none"}

    Raises
    ------
    InputError
        No pixel size, labels of another shape, or a stage marker missing from the image.
    """
    profile = get_stage(stage)
    spacing_px = field.require_pixel_size()
    if tuple(labels.nuclei.shape) != tuple(field.spatial_shape):
        raise InputError(
            f"labels {labels.nuclei.shape} are not on the image's grid {field.spatial_shape}",
            field.origin.path,
        )
    mapping = _marker_channels(field, profile)
    zyx = spacing_px.zyx
    if cytoplasm_um is None:
        cytoplasm_um = 0.25 * sum(profile.nucleus_diameter_um)
    intensities = {profile.nuclear_stain: field.data[mapping["nuclear"]]}
    compartments = {profile.nuclear_stain: "nuclear"}
    for marker in profile.markers:
        intensities[marker.name] = field.data[mapping[marker.name]]
        compartments[marker.name] = marker.compartment
    cells = measure_cells(
        labels.nuclei,
        labels.clusters,
        intensities,
        spacing=zyx,
        compartments=compartments,
        cytoplasm_um=cytoplasm_um,
        background=background,
    )
    clusters = measure_clusters(labels.clusters, spacing=zyx)
    name = image or field.name
    if well is None:
        well = field.origin.well or parse_plate_name(field.origin.path or name).well or name
    fld = field.origin.field
    if fld is None and field.origin.path is not None:
        fld = parse_plate_name(field.origin.path).field
    Z, Y, X = field.spatial_shape
    info = {
        "image": name,
        "plate": plate or field.origin.plate or "",
        "well": well,
        "field": fld,
        "stage": profile.name,
        "path": "" if field.origin.path is None else str(field.origin.path),
        "n_planes": Z,
        "height_px": Y,
        "width_px": X,
        "pixel_size_x_um": spacing_px.x,
        "pixel_size_y_um": spacing_px.y,
        "z_step_um": spacing_px.z,
        "imaged_area_mm2": Y * X * spacing_px.x * spacing_px.y * 1e-6,
        "segmentation": labels.method,
        "cytoplasm_um": cytoplasm_um,
        "flags": "",
    }
    ids = {k: info[k] for k in _ID_COLUMNS}
    cells = cells.assign(**ids)[[*_ID_COLUMNS, *cells.columns]]
    clusters = clusters.assign(**ids)[[*_ID_COLUMNS, *clusters.columns]]
    return FieldResult(info=info, cells=cells, clusters=clusters, profile=profile)


def score_image(
    path: str | Path,
    *,
    options: ScoreOptions,
    plate_map: PlateMap | None = None,
    plate: str | None = None,
    channel_names: Sequence[str] | None = None,
    pixel_size: float | None = None,
    z_step: float | None = None,
    labels_dir: Path | None = None,
    overwrite: bool = False,
) -> list[FieldResult]:
    """Read one image file (every series), segment and measure each field.

    With ``labels_dir``, the nuclei and cluster labels are written there as
    ``<image>_nuclei.tif`` and ``<image>_clusters.tif`` on the image's grid.
    """
    from islet_imaging.io import read_fields
    from islet_imaging.segment import segment_field

    kwargs: dict[str, Any] = {}
    if channel_names:
        kwargs["channel_names"] = tuple(channel_names)
    if pixel_size is not None:
        kwargs["pixel_size"] = pixel_size
    if z_step is not None:
        kwargs["z_step"] = z_step
    fields = read_fields(path, **kwargs)
    results = []
    for fld in fields:
        well = fld.origin.well or parse_plate_name(path).well
        profile = resolve_stage(
            stage=options.stage,
            well=well,
            plate_map=plate_map,
            field_stage=fld.origin.stage,
            where=str(path),
            stages_file=options.stages_file,
        )
        _marker_channels(fld, profile)  # fail before segmenting
        fld.require_pixel_size()
        with logged_warnings(log) as caught:
            labels = segment_field(fld, stage=profile, model=options.model, augment=options.augment)
        flags = [
            f for w in caught for cls, f in WARNING_FLAGS.items() if issubclass(w.category, cls)
        ]
        result = measure_field(
            fld,
            labels,
            stage=profile,
            plate=fld.origin.plate or plate,
            well=well,
            cytoplasm_um=options.cytoplasm_um,
            background=options.background,
        )
        if plate_map is not None and well is not None and well not in plate_map:
            flags.append("not_in_plate_map")
        result.info["flags"] = ";".join(
            dict.fromkeys(f for f in (*result.info["flags"].split(";"), *flags) if f)
        )
        if labels_dir is not None:
            from islet_imaging.io import write_labels

            labels_dir.mkdir(parents=True, exist_ok=True)
            name = result.info["image"]
            write_labels(
                labels_dir / f"{name}_nuclei.tif",
                labels.nuclei,
                like=fld,
                name="nuclei",
                overwrite=overwrite,
            )
            write_labels(
                labels_dir / f"{name}_clusters.tif",
                labels.clusters,
                like=fld,
                name="clusters",
                overwrite=overwrite,
            )
        results.append(result)
    return results


def _thresholds_for(
    cells: pd.DataFrame,
    profile: StageProfile,
    *,
    spec: ThresholdSpec,
    statistic: str,
    scope: str,
    control_cells: Mapping[str, pd.DataFrame],
    on_unimodal: str = "sbr",
) -> dict[str, Threshold]:
    out: dict[str, Threshold] = {}
    fixed = {}
    for name, value in spec.fixed.items():
        try:
            fixed[profile.marker(name).name] = value
        except InputError:  # a fixed value for another stage's marker
            continue
    auto = spec.method if spec.method in ("otsu", "gmm") else "gmm"

    def automatic(marker: str, values: np.ndarray, fallback_note: str = "") -> Threshold:
        bg_col = f"background_{marker}"
        # the fold-over-background rule compares per-voxel levels: mean or median only
        bg = (
            cells[bg_col].to_numpy(float) if bg_col in cells and statistic != "integrated" else None
        )
        t = find_threshold(
            values,
            marker=marker,
            method=auto,
            statistic=statistic,
            scope=scope,
            background=bg,
            on_unimodal=on_unimodal,
        )
        if fallback_note:
            log.warning("%s %s: %s", scope, marker, fallback_note)
            t = replace(t, note=f"{fallback_note}; {t.note}" if t.note else fallback_note)
        return t

    for marker in profile.marker_names:
        col = f"{statistic}_{marker}"
        values = cells[col].to_numpy(float) if col in cells else np.zeros(0)
        if spec.method == "fixed" and marker in fixed:
            n = int(np.isfinite(values).sum())
            out[marker] = Threshold(marker, fixed[marker], "fixed", statistic, scope, n)
        elif spec.method == "fixed":
            out[marker] = automatic(marker, values, f"no fixed value for this marker; {auto} used")
        elif spec.method == "control":
            ctrl = control_cells.get(marker)
            if ctrl is not None and len(ctrl):
                out[marker] = control_threshold(
                    ctrl[col].to_numpy(float), marker=marker, statistic=statistic, scope=scope
                )
            else:
                note = f"no negative-control well for this marker in the plate map; {auto} used"
                out[marker] = automatic(marker, values, note)
        else:
            out[marker] = automatic(marker, values)
    return out


def finalize(
    results: Sequence[FieldResult],
    *,
    options: ScoreOptions | None = None,
    plate_map: PlateMap | None = None,
) -> ScoreTables:
    """Thresholds, positivity calls, cluster composition and every summary table.

    Parameters
    ----------
    results : sequence of FieldResult
        Every measured field (of one or several stages and plates).
    options : ScoreOptions, optional
    plate_map : PlateMap, optional
        Supplies negative controls, conditions, seeded cells and well areas.
    """
    from islet_imaging import aggregate

    options = options or ScoreOptions()
    fields = pd.DataFrame([r.info for r in results])
    if fields.empty:
        fields = pd.DataFrame(columns=[*_ID_COLUMNS, "imaged_area_mm2", "flags"])
    all_cells = [r.cells for r in results]
    cells = (
        pd.concat(all_cells, ignore_index=True)
        if all_cells
        else pd.DataFrame(columns=[*_ID_COLUMNS, "cell_id", "cluster_id"])
    )
    profiles = {r.profile.name: r.profile for r in results}
    stages = list(dict.fromkeys(fields["stage"].dropna()))
    threshold_list: list[Threshold] = []
    threshold_stages: list[str] = []
    called: list[pd.DataFrame] = []
    for stage in stages:
        profile = profiles[stage]
        stage_cells = cells[cells["stage"] == stage]
        control_cells: dict[str, pd.DataFrame] = {}
        if plate_map is not None:
            for marker in profile.marker_names:
                wells = set(plate_map.negative_controls(marker))
                control_cells[marker] = stage_cells[stage_cells["well"].isin(wells)]
        kwargs = {
            "spec": options.threshold,
            "statistic": options.statistic,
            "control_cells": control_cells,
            "on_unimodal": options.on_unimodal,
        }
        pooled_scope = "plate" if len(stages) == 1 else f"plate:{profile.name}"
        pooled_cache: dict[str, dict[str, Threshold]] = {}

        def pooled(
            stage_cells: pd.DataFrame = stage_cells,
            profile: StageProfile = profile,
            pooled_scope: str = pooled_scope,
            cache: dict[str, dict[str, Threshold]] = pooled_cache,
            kwargs: dict[str, Any] = kwargs,
        ) -> dict[str, Threshold]:
            if "t" not in cache:
                cache["t"] = _thresholds_for(stage_cells, profile, scope=pooled_scope, **kwargs)
            return cache["t"]

        if options.threshold_scope == "plate":
            groups = [(pooled_scope, stage_cells, pooled())]
        else:
            groups = []
            images = fields.loc[fields["stage"] == stage, "image"]
            for image in images:
                group = stage_cells[stage_cells["image"] == image]
                thr = _thresholds_for(group, profile, scope=str(image), **kwargs)  # type: ignore[arg-type]
                for marker, t in thr.items():
                    if t.n_cells < MIN_CELLS and math.isfinite(pooled()[marker].value):
                        note = (
                            f"only {t.n_cells} cells in this image; the threshold pooled over the "
                            f"{profile.name} images is used"
                        )
                        thr[marker] = replace(pooled()[marker], scope=str(image), note=note)
                groups.append((str(image), group, thr))
        for _, group, thr in groups:
            threshold_list.extend(thr.values())
            threshold_stages.extend([profile.name] * len(thr))
            called.append(call_positive(group, thr, double_positives=profile.double_positives))
    cells = pd.concat(called, ignore_index=True) if called else cells
    thresholds = thresholds_table(threshold_list)
    thresholds.insert(0, "stage", threshold_stages)
    unimodal = thresholds[thresholds["unimodal"].astype(bool)] if len(thresholds) else thresholds
    if len(unimodal):
        flag_by_image: dict[str, list[str]] = {}
        for _, t in unimodal.iterrows():
            images = (
                fields.loc[fields["stage"] == t["stage"], "image"]
                if options.threshold_scope == "plate"
                else [t["scope"]]
            )
            for im in images:
                flag_by_image.setdefault(im, []).append(f"unimodal_{t['marker']}")
        fields["flags"] = [
            ";".join(x for x in [f, *flag_by_image.get(im, [])] if x)
            for f, im in zip(fields["flags"].fillna(""), fields["image"], strict=True)
        ]

    clusters_out = []
    for r in results:
        profile = r.profile
        pops = population_names(profile.marker_names, profile.double_positives)
        img_cells = cells[cells["image"] == r.info["image"]]
        clusters_out.append(cluster_composition(r.clusters, img_cells, pops))
    clusters = (
        pd.concat(clusters_out, ignore_index=True)
        if clusters_out
        else pd.DataFrame(
            columns=[
                *_ID_COLUMNS,
                "cluster_id",
                "touches_border",
                "equivalent_diameter_um",
                "ieq",
                "ieq_ricordi",
                "edge_weight",
                "n_cells",
            ]
        )
    )
    cells = _order_cells(cells)
    clusters = _order_clusters(clusters)
    kw = {
        "min_cells": options.min_cells,
        "min_clusters": options.min_clusters,
        "profiles": profiles,
    }
    if len(fields):
        field_table = aggregate.summarize_fields(cells, clusters, fields, **kw)
        extra = fields.drop(
            columns=[
                c
                for c in ("plate", "well", "field", "stage", "flags", "imaged_area_mm2")
                if c in fields
            ]
        )
        field_table = field_table.merge(extra, on="image", how="left")
        wells = aggregate.summarize_wells(cells, clusters, fields, plate_map=plate_map, **kw)
        plates = aggregate.summarize_plates(cells, clusters, fields, **kw)
        stage_table = aggregate.summarize_stages(wells, cells, clusters, fields, **kw)
    else:
        field_table = wells = plates = stage_table = pd.DataFrame()
    return ScoreTables(cells, clusters, field_table, wells, plates, stage_table, thresholds)


def _order_cells(cells: pd.DataFrame) -> pd.DataFrame:
    first = [*_ID_COLUMNS, "cell_id", "cluster_id"]
    pos = [c for c in cells.columns if c.startswith("positive_")]
    rest = [c for c in cells.columns if c not in first and c not in pos]
    return cells[[c for c in first if c in cells] + pos + rest]


def _order_clusters(clusters: pd.DataFrame) -> pd.DataFrame:
    first = [
        *_ID_COLUMNS,
        "cluster_id",
        "equivalent_diameter_um",
        "ieq",
        "ieq_ricordi",
        "touches_border",
        "n_cells",
    ]
    head = [c for c in first if c in clusters]
    return clusters[head + [c for c in clusters.columns if c not in head]]


def _for_parquet(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in out.columns:
        if out[col].dtype == object:
            values = out[col].dropna()
            if len(values) and not all(isinstance(v, str) for v in values):
                out[col] = out[col].map(
                    lambda v: v if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                )
    return out


def write_tables(
    tables: ScoreTables, out: str | Path, *, formats: Sequence[str] = ("csv", "parquet")
) -> list[Path]:
    """Write every table as ``<out>/<name>.csv`` and ``<out>/<name>.parquet`` (atomically)."""
    out = Path(out)
    written = []
    for name, table in tables.items():
        if "csv" in formats:
            p = out / f"{name}.csv"
            atomic_write(p, lambda t, table=table: table.to_csv(t, index=False))
            written.append(p)
        if "parquet" in formats:
            p = out / f"{name}.parquet"
            atomic_write(p, lambda t, table=table: _for_parquet(table).to_parquet(t, index=False))
            written.append(p)
    return written


def score_path(
    input: str | Path,
    out: str | Path,
    *,
    options: ScoreOptions | None = None,
    plate_map: PlateMap | None = None,
    channel_names: Sequence[str] | None = None,
    pixel_size: float | None = None,
    z_step: float | None = None,
    save_labels: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ScoreRun:
    """Score one image or a folder of images and write the tables to ``out``.

    A field that fails (unreadable file, missing marker, no stage, ...) is logged and listed in
    ``<out>/failures.csv`` (``image,error``); the others are scored.

    Raises
    ------
    InputError
        If ``input`` has no images, or ``out`` exists, is not empty and ``overwrite`` is False.
    """
    from tqdm.auto import tqdm

    options = options or ScoreOptions()
    input = Path(input)
    out = Path(out)
    paths = discover_images(input)
    check_output_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            "output folder is not empty; choose another --out or pass --overwrite", out
        )
    out.mkdir(parents=True, exist_ok=True)
    plate = input.name if input.is_dir() else input.parent.name
    if plate_map is not None:
        unknown = plate_map.check_wells(parse_plate_name(p).well for p in paths)
        if unknown:
            log.warning("image wells not in the plate map (flagged): %s", ", ".join(unknown))
    results: list[FieldResult] = []
    failures: list[tuple[str, str]] = []
    labels_dir = out / "labels" if save_labels else None
    for path in tqdm(paths, desc="scoring", unit="image", disable=not progress):
        try:
            results.extend(
                score_image(
                    path,
                    options=options,
                    plate_map=plate_map,
                    plate=plate,
                    channel_names=channel_names,
                    pixel_size=pixel_size,
                    z_step=z_step,
                    labels_dir=labels_dir,
                    overwrite=overwrite,
                )
            )
        except InputError as exc:
            log.error("%s", exc)
            failures.append((path.name, exc.reason if exc.path is not None else str(exc)))
        except Exception as exc:
            log.error("%s: %s: %s", path, type(exc).__name__, exc)
            log.debug("%s", traceback.format_exc())
            failures.append((path.name, f"{type(exc).__name__}: {exc}"))
    tables = finalize(results, options=options, plate_map=plate_map) if results else None
    if tables is not None:
        write_tables(tables, out)
    atomic_write(
        out / "failures.csv",
        lambda t: pd.DataFrame(failures, columns=["image", "error"]).to_csv(t, index=False),
    )
    from islet_imaging import __version__

    run_info = {
        "islet_imaging_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": str(input),
        "plate_map": None if plate_map is None or plate_map.path is None else str(plate_map.path),
        "options": {**asdict(options), "threshold": asdict(options.threshold)},
        "n_images": len(paths),
        "n_fields": len(results),
        "n_failed": len(failures),
    }
    atomic_write(
        out / "run.json", lambda t: t.write_text(json.dumps(run_info, indent=2, default=str))
    )
    log.info("scored %d field(s), %d failure(s) → %s", len(results), len(failures), out)
    return ScoreRun(tables, failures, out)
