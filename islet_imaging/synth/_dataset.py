"""Write synthetic fields in the dataset layout that training reads and napari corrections extend.

Layout (see the project brief)::

    DIR/images/<name>.ome.tif          the field (DAPI + markers), OME-TIFF with µm pixel size
    DIR/labels/<name>_nuclei.tif       nucleus instance labels
    DIR/labels/<name>_clusters.tif     cluster instance labels
    DIR/truth/<name>_cells.csv         one row per nucleus: cell_id, cluster_id, positive_<MARKER>, ...
    DIR/truth/<name>_clusters.csv      one row per cluster: cluster_id, area_um2 | volume_um3, ...
    DIR/metadata.csv                   name, stage, pixel_size_um, z_step_um, channel_names ("|"-joined)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from islet_imaging._atomic import atomic_write
from islet_imaging.errors import InputError
from islet_imaging.stages import StageProfile, get_stage, list_stages
from islet_imaging.synth._generate import SynthField, generate_field, parse_size

__all__ = [
    "METADATA_COLUMNS",
    "dataset_paths",
    "field_seed",
    "write_dataset",
    "write_synth_field",
]

log = logging.getLogger(__name__)

METADATA_COLUMNS = ("name", "stage", "pixel_size_um", "z_step_um", "channel_names")


def dataset_paths(out_dir: str | Path, name: str) -> dict[str, Path]:
    """The files one field occupies in the dataset layout."""
    out = Path(out_dir)
    return {
        "image": out / "images" / f"{name}.ome.tif",
        "nuclei": out / "labels" / f"{name}_nuclei.tif",
        "clusters": out / "labels" / f"{name}_clusters.tif",
        "cells": out / "truth" / f"{name}_cells.csv",
        "clusters_csv": out / "truth" / f"{name}_clusters.csv",
    }


def field_seed(seed: int, stage: StageProfile, index: int) -> int:
    """Seed of field ``index`` of ``stage`` in a dataset made with ``seed`` (stable across runs)."""
    words = [int(seed), int(stage.order), index, *(ord(c) for c in stage.name)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _write_csv(path: Path, df: pd.DataFrame, *, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise InputError("file already exists; refusing to overwrite it (use --overwrite)", path)
    atomic_write(
        path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    )
    return path


def write_synth_field(
    out_dir: str | Path,
    name: str,
    synth: SynthField,
    *,
    overwrite: bool = False,
    image_path: str | Path | None = None,
) -> dict[str, Path]:
    """Write one synthetic field and its truth in the dataset layout.

    Parameters
    ----------
    out_dir : path-like
        Dataset folder.
    name : str
        File stem (``<stage-short>_<seed>_<i>`` or a plate name such as ``B03_f1``).
    synth : SynthField
        The field and its truth.
    overwrite : bool, optional
        Replace existing files of the same names.
    image_path : path-like, optional
        Where the image goes instead of ``images/<name>.ome.tif`` (the sample plate keeps images
        at the top of its folder).

    Returns
    -------
    dict of str to Path
        The files written.
    """
    from islet_imaging.io import write_labels, write_ome_tiff

    paths = dataset_paths(out_dir, name)
    if image_path is not None:
        paths["image"] = Path(image_path)
    if not overwrite:
        existing = [p for p in paths.values() if p.exists()]
        if existing:
            raise InputError(
                f"{len(existing)} file(s) of field {name!r} already exist (e.g. {existing[0]}); "
                "refusing to overwrite. Choose an empty folder or pass --overwrite",
                out_dir,
            )
    write_ome_tiff(paths["image"], synth.field, overwrite=overwrite)
    write_labels(
        paths["nuclei"], synth.nuclei, like=synth.field, name="nuclei", overwrite=overwrite
    )
    write_labels(
        paths["clusters"], synth.clusters, like=synth.field, name="clusters", overwrite=overwrite
    )
    _write_csv(paths["cells"], synth.cells, overwrite=overwrite)
    _write_csv(paths["clusters_csv"], synth.clusters_table, overwrite=overwrite)
    return paths


def metadata_row(name: str, synth: SynthField) -> dict[str, object]:
    ps = synth.field.pixel_size
    assert ps is not None
    return {
        "name": name,
        "stage": synth.stage,
        "pixel_size_um": float(ps.x),
        "z_step_um": float(ps.z) if ps.z is not None else float("nan"),
        "channel_names": "|".join(synth.field.channel_names),
    }


def write_metadata(out_dir: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write or extend ``DIR/metadata.csv`` (rows of the same name are replaced)."""
    path = Path(out_dir) / "metadata.csv"
    new = pd.DataFrame(list(rows), columns=list(METADATA_COLUMNS))
    if path.exists():
        try:
            old = pd.read_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"cannot read the existing metadata table ({exc})", path) from exc
        missing = set(METADATA_COLUMNS) - set(old.columns)
        if missing:
            raise InputError(
                f"existing metadata table lacks columns {sorted(missing)}; "
                "is this folder a dataset made by islet-imaging?",
                path,
            )
        old = old[~old["name"].isin(new["name"])]
        new = pd.concat([old[list(METADATA_COLUMNS)], new], ignore_index=True)
    return _write_csv(path, new, overwrite=True)


def write_dataset(
    out_dir: str | Path,
    stage: str | StageProfile | Iterable[str | StageProfile],
    n: int,
    seed: int,
    size: int | str | tuple[int, int] = (512, 512),
    z: int = 1,
    pixel_size: float = 0.65,
    *,
    z_step_um: float = 2.0,
    overwrite: bool = False,
    progress: bool = False,
    stages_file: str | Path | None = None,
) -> list[str]:
    """Generate ``n`` fields per stage and write them in the dataset layout.

    Parameters
    ----------
    out_dir : path-like
        Dataset folder; created if missing.
    stage : str, StageProfile, ``"all"`` or a sequence of them
        Stage(s) to generate; ``"all"`` means every built-in stage.
    n : int
        Fields per stage.
    seed : int
        Master seed; field ``i`` of a stage uses :func:`field_seed(seed, stage, i)`.
    size : int, str or (int, int)
        Field size (see :func:`generate_field`).
    z : int
        Planes per field.
    pixel_size : float
        Lateral pixel size in µm.
    z_step_um : float
        Plane spacing in µm (``z > 1``).
    overwrite : bool
        Replace files of the same names; otherwise refuse before writing anything.
    progress : bool
        Show a progress bar (on a terminal only).
    stages_file : path-like, optional
        TOML file with extra or overridden stage profiles (see :func:`islet_imaging.stages.load_stages`).

    Returns
    -------
    list of str
        The names written, e.g. ``["S6_7_0", "S6_7_1"]``.

    Examples
    --------
    >>> import tempfile
    >>> write_dataset(tempfile.mkdtemp(), "S6", n=1, seed=7, size=64)
    ['S6_7_0']
    """
    if isinstance(stage, (str, StageProfile)):
        if isinstance(stage, str) and stage.casefold() == "all":
            stages = list(list_stages(stages_file))
        else:
            stages = [get_stage(stage, stages_file=stages_file)]
    else:
        stages = [get_stage(s, stages_file=stages_file) for s in stage]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"number of fields per stage must be a positive integer, got {n!r}")
    size_yx = parse_size(size)
    plan = [
        (f"{p.short_name}_{int(seed)}_{i}", p, field_seed(int(seed), p, i))
        for p in stages
        for i in range(int(n))
    ]
    if not overwrite:
        clashes = [
            path
            for name, _, _ in plan
            for path in dataset_paths(out_dir, name).values()
            if path.exists()
        ]
        if clashes:
            raise InputError(
                f"{len(clashes)} output file(s) already exist (e.g. {clashes[0]}); refusing to "
                "overwrite them. Choose an empty folder, another --seed, or pass --overwrite",
                out_dir,
            )
    rows = []
    iterator = plan
    if progress:
        from tqdm import tqdm

        iterator = tqdm(plan, desc="synth", unit="field", disable=None)  # off when not a tty
    for name, profile, fseed in iterator:
        synth = generate_field(
            profile, seed=fseed, size=size_yx, z=z, pixel_size_um=pixel_size, z_step_um=z_step_um
        )
        write_synth_field(out_dir, name, synth, overwrite=overwrite)
        rows.append(metadata_row(name, synth))
        log.info("wrote %s (%s, %d cells)", name, profile.name, len(synth.cells))
    write_metadata(out_dir, rows)
    return [r["name"] for r in rows]  # type: ignore[misc]
