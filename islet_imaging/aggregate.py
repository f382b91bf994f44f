"""From object tables to field, well, plate and stage summaries: counts, sizes, IEQ, fractions, yield, QC.

The inputs are the ``cells`` and ``clusters`` tables of :mod:`islet_imaging.score` (one row per
object, with ``image``, ``plate``, ``well``, ``field`` and ``stage`` columns and the positivity calls)
and a ``fields`` information table (one row per image with its imaged area). Rules (also in
``docs/tables.md``):

* **Border rule.** A cluster with a voxel in the first or last row or column of its field
  (``touches_border``) is cut by the field edge: its size is unknown. It is excluded from
  ``n_clusters``, every size statistic and the IEQ totals, and counted in ``n_clusters_border``.
  Its cells still count in cell numbers and marker fractions. Per-area densities
  (``clusters_per_mm2``, ``ieq_per_mm2``) weight each interior cluster by its Miles–Lantuéjoul
  edge weight, which corrects for the larger clusters' higher chance of touching the edge.
* **Fractions** are pooled over cells (positive / cells with a call) with 95 % Wilson score
  intervals. Cells are not independent (neighbours share a cluster), so the interval is a lower
  bound on the real uncertainty; compare wells, not fields.
* **Low counts** (fewer than ``min_cells`` cells, or fewer than ``min_clusters`` interior clusters
  at colony and aggregate stages) are flagged in ``flags`` and ``low_count``; stage summaries leave
  flagged wells out (and say how many).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.stats import norm

from islet_imaging.io._plate import PlateMap
from islet_imaging.stages import StageProfile, get_stage

__all__ = [
    "DIAMETER_BINS_UM",
    "MIN_CELLS",
    "MIN_CLUSTERS",
    "size_distribution",
    "summarize",
    "summarize_fields",
    "summarize_plates",
    "summarize_stages",
    "summarize_wells",
    "wilson_interval",
]

#: Diameter histogram bin edges in µm (the Ricordi classes, with < 50 µm as its own bin).
DIAMETER_BINS_UM: tuple[float, ...] = (0, 50, 100, 150, 200, 250, 300, 350, math.inf)
#: Fewest cells for a trustworthy fraction.
MIN_CELLS = 50
#: Fewest interior clusters for trustworthy size statistics.
MIN_CLUSTERS = 5


def wilson_interval(
    k: npt.ArrayLike, n: npt.ArrayLike, *, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion ``k / n``.

    ``(p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the normal quantile; NaN for
    ``n = 0``.

    Examples
    --------
    >>> lo, hi = wilson_interval(3, 10)
    >>> round(float(lo), 3), round(float(hi), 3)
    (0.108, 0.603)
    """
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = float(norm.ppf(0.5 + confidence / 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
        lo = np.where(k == 0, 0.0, np.clip(centre - half, 0, 1))  # exact at the edges
        hi = np.where(k == n, 1.0, np.clip(centre + half, 0, 1))
        lo = np.where(n > 0, lo, np.nan)
        hi = np.where(n > 0, hi, np.nan)
    return lo, hi


def _bin_name(lo: float, hi: float) -> str:
    return f"n_clusters_{lo:g}_{hi:g}um" if math.isfinite(hi) else f"n_clusters_{lo:g}um_up"


def size_distribution(
    diameters_um: npt.ArrayLike, *, bins: Sequence[float] = DIAMETER_BINS_UM
) -> dict[str, float]:
    """Median, D10, D90 and mean diameter and a histogram (counts per bin) of cluster diameters.

    D10 / D90 are the 10th / 90th percentiles of the diameters (by number). Empty input gives NaN
    statistics and zero counts.
    """
    d = np.asarray(diameters_um, dtype=np.float64)
    d = d[np.isfinite(d)]
    out: dict[str, float] = {}
    if d.size:
        p10, p50, p90 = np.percentile(d, [10, 50, 90])
        out.update(
            diameter_median_um=float(p50),
            diameter_d10_um=float(p10),
            diameter_d90_um=float(p90),
            diameter_mean_um=float(d.mean()),
        )
    else:
        out.update(
            diameter_median_um=math.nan,
            diameter_d10_um=math.nan,
            diameter_d90_um=math.nan,
            diameter_mean_um=math.nan,
        )
    counts, _ = np.histogram(d, bins=np.asarray(bins, dtype=np.float64))
    for lo, hi, c in zip(bins[:-1], bins[1:], counts, strict=True):
        out[_bin_name(lo, hi)] = int(c)
    return out


def _populations(cells: pd.DataFrame) -> list[str]:
    return [c[len("positive_") :] for c in cells.columns if c.startswith("positive_")]


def _summary_row(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    info: pd.DataFrame,
    populations: Sequence[str],
    *,
    min_cells: int,
    min_clusters: int,
) -> dict[str, object]:
    row: dict[str, object] = {}
    row["n_fields"] = len(info)
    area = (
        float(info["imaged_area_mm2"].sum())
        if "imaged_area_mm2" in info and len(info)
        else math.nan
    )
    row["imaged_area_mm2"] = area
    n_cells = len(cells)
    row["n_cells"] = n_cells
    row["n_cells_in_clusters"] = int((cells["cluster_id"] > 0).sum()) if n_cells else 0
    border = clusters["touches_border"].astype(bool) if len(clusters) else pd.Series([], dtype=bool)
    interior = clusters[~border.to_numpy()] if len(clusters) else clusters
    row["n_clusters"] = len(interior)
    row["n_clusters_border"] = int(border.sum())
    ieq = float(interior["ieq"].sum()) if len(interior) else 0.0
    row["ieq_total"] = ieq
    row["ieq_total_ricordi"] = float(interior["ieq_ricordi"].sum()) if len(interior) else 0.0
    row["islet_size_index"] = ieq / len(interior) if len(interior) else math.nan
    row.update(size_distribution(interior["equivalent_diameter_um"] if len(interior) else []))
    with np.errstate(invalid="ignore", divide="ignore"):
        if area and math.isfinite(area):
            w = interior["edge_weight"].to_numpy(float) if len(interior) else np.zeros(0)
            row["cells_per_mm2"] = n_cells / area
            row["clusters_per_mm2"] = float(w.sum()) / area
            row["ieq_per_mm2"] = (
                float((w * interior["ieq"].to_numpy(float)).sum()) / area if len(interior) else 0.0
            )
        else:
            row["cells_per_mm2"] = row["clusters_per_mm2"] = row["ieq_per_mm2"] = math.nan
    for pop in populations:
        col = f"positive_{pop}"
        if col in cells and n_cells:
            calls = cells[col].astype("boolean")
            k = int(calls.sum(skipna=True))
            n = int(calls.notna().sum())
        else:
            k = n = 0
        lo, hi = wilson_interval(k, n)
        row[f"n_positive_{pop}"] = k
        row[f"n_called_{pop}"] = n
        row[f"fraction_positive_{pop}"] = k / n if n else math.nan
        row[f"fraction_positive_{pop}_ci_low"] = float(lo)
        row[f"fraction_positive_{pop}_ci_high"] = float(hi)
    flags = []
    if n_cells == 0:
        flags.append("no_cells")
    elif n_cells < min_cells:
        flags.append(f"low_cells(<{min_cells})")
    if len(interior) < min_clusters:
        flags.append(f"low_clusters(<{min_clusters})")
    if "flags" in info:
        for f in info["flags"].dropna():
            flags.extend(x for x in str(f).split(";") if x and x not in flags)
    row["low_count"] = n_cells < min_cells or len(interior) < min_clusters
    row["flags"] = ";".join(flags)
    return row


def summarize(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    fields: pd.DataFrame,
    by: Sequence[str],
    *,
    populations: Sequence[str] | None = None,
    min_cells: int = MIN_CELLS,
    min_clusters: int = MIN_CLUSTERS,
) -> pd.DataFrame:
    """Summaries of the objects grouped by the ``by`` columns (e.g. ``["plate", "well"]``).

    Parameters
    ----------
    cells, clusters : pandas.DataFrame
        Object tables with the ``by`` columns, ``cluster_id``, ``positive_<P>``, and for clusters
        ``equivalent_diameter_um``, ``ieq``, ``ieq_ricordi``, ``touches_border``, ``edge_weight``.
    fields : pandas.DataFrame
        One row per image with the ``by`` columns, ``imaged_area_mm2`` and optional ``flags``;
        groups with fields but no objects get zero counts.
    by : sequence of str
    populations : sequence of str, optional
        Default: every ``positive_<P>`` column of ``cells``.
    min_cells, min_clusters : int
        Low-count thresholds for the ``low_count`` flag.
    """
    by = list(by)
    pops = list(populations) if populations is not None else _populations(cells)
    keys = fields[by].drop_duplicates()
    rows = []

    def groups(t: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
        if not len(t):
            return {}
        return {
            (k if isinstance(k, tuple) else (k,)): g
            for k, g in t.groupby(by, dropna=False, sort=False)
        }

    cell_groups = groups(cells)
    clu_groups = groups(clusters)
    info_groups = groups(fields)
    for key in keys.itertuples(index=False, name=None):
        k = tuple(key)
        c = cell_groups.get(k, cells.iloc[0:0])
        cl = clu_groups.get(k, clusters.iloc[0:0])
        inf = info_groups.get(k, fields.iloc[0:0])
        row = dict(zip(by, key, strict=True))
        row.update(_summary_row(c, cl, inf, pops, min_cells=min_cells, min_clusters=min_clusters))
        rows.append(row)
    return pd.DataFrame(rows)


def _monolayer_counts(
    table: pd.DataFrame, stage_of_row: pd.Series, profiles: dict[str, StageProfile]
) -> pd.DataFrame:
    """Monolayer stages have no cluster counts to trust: drop their low-cluster flag."""
    if "flags" not in table or "low_count" not in table:
        return table
    out = table.copy()
    for i, stage in enumerate(stage_of_row):
        profile = profiles.get(stage) if isinstance(stage, str) else None
        if profile is None or profile.cluster_kind != "monolayer-patch":
            continue
        flags = [
            f
            for f in str(out["flags"].iloc[i]).split(";")
            if f and not f.startswith("low_clusters")
        ]
        out.iloc[i, out.columns.get_loc("flags")] = ";".join(flags)
        out.iloc[i, out.columns.get_loc("low_count")] = any(
            f.startswith(("low_cells", "no_cells")) for f in flags
        )
    return out


def _qc_columns(table: pd.DataFrame, known: Mapping[str, StageProfile] | None) -> pd.DataFrame:
    """``table`` with QC columns against the profile of each row's ``stage``."""
    stage_of_row = table["stage"]
    profiles = _profiles(stage_of_row.dropna().unique(), known)
    table = _monolayer_counts(table, stage_of_row, profiles)
    qc_pass: list[object] = []
    qc_text: list[str] = []
    per_target: dict[str, list[object]] = {}
    all_pops = sorted({t.population for p in profiles.values() for t in p.qc_targets})
    for pop in all_pops:
        per_target[f"qc_{pop}"] = []
    for i, stage in enumerate(stage_of_row):
        profile = profiles.get(stage) if isinstance(stage, str) else None
        results = {}
        failed = []
        for pop in all_pops:
            per_target[f"qc_{pop}"].append(None)
        control = table["control"].iloc[i] if "control" in table else None
        if isinstance(control, str) and control.strip():
            # a control well is meant to miss the stage's targets: no QC verdict
            qc_pass.append(None)
            qc_text.append(f"control well ({control.strip()}): not QC'd")
            continue
        if profile is not None:
            for target in profile.qc_targets:
                col = f"fraction_positive_{target.population}"
                frac = float(table[col].iloc[i]) if col in table else math.nan
                ok = target.passes(frac)
                per_target[f"qc_{target.population}"][-1] = ok
                results[target.population] = ok
                if ok is False:
                    failed.append(f"{target.describe()} (got {frac:.0%})")
        if not results or any(v is None for v in results.values()):
            qc_pass.append(None)
        else:
            qc_pass.append(all(results.values()))
        qc_text.append("; ".join(failed))
    out = table.copy()
    for col, values in per_target.items():
        out[col] = pd.array(values, dtype="boolean")
    out["qc_pass"] = pd.array(qc_pass, dtype="boolean")
    out["qc_failed"] = qc_text
    return out


def _profiles(
    stages: Sequence[str], known: Mapping[str, StageProfile] | None = None
) -> dict[str, StageProfile]:
    out = {}
    for s in stages:
        if isinstance(s, str) and s:
            out[s] = known[s] if known is not None and s in known else get_stage(s)
    return out


def summarize_fields(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    min_cells: int = MIN_CELLS,
    min_clusters: int = MIN_CLUSTERS,
    profiles: Mapping[str, StageProfile] | None = None,
) -> pd.DataFrame:
    """One row per image (``fields`` must have ``image``, ``plate``, ``well``, ``field``, ``stage``).

    Parameters
    ----------
    cells, clusters, fields : pandas.DataFrame
        Object tables and per-image information (see :func:`summarize`).
    min_cells, min_clusters : int
        Low-count thresholds.
    profiles : dict of str to StageProfile, optional
        Stage profiles by name for the QC columns (default: the built-in profiles).
    """
    info_cols = [c for c in ("image", "plate", "well", "field", "stage") if c in fields]
    table = summarize(
        cells, clusters, fields, ["image"], min_cells=min_cells, min_clusters=min_clusters
    )
    meta = fields[info_cols].drop_duplicates("image")
    table = meta.merge(table, on="image", how="right")
    return _qc_columns(table, profiles)


def summarize_wells(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    plate_map: PlateMap | None = None,
    min_cells: int = MIN_CELLS,
    min_clusters: int = MIN_CLUSTERS,
    profiles: Mapping[str, StageProfile] | None = None,
) -> pd.DataFrame:
    """One row per (plate, well, stage), with plate-map columns, yield and QC against the stage.

    ``plate_map`` supplies ``condition``, ``seeded_cells``, ``control`` and ``well_area_mm2``;
    wells missing from it are flagged ``not_in_plate_map``.

    Parameters
    ----------
    cells, clusters, fields : pandas.DataFrame
        Object tables and per-image information (see :func:`summarize`).
    min_cells, min_clusters : int
        Low-count thresholds.
    profiles : dict of str to StageProfile, optional
        Stage profiles by name for the QC columns (default: the built-in profiles).
    """
    table = summarize(
        cells,
        clusters,
        fields,
        ["plate", "well", "stage"],
        min_cells=min_cells,
        min_clusters=min_clusters,
    )
    pops = [
        c[len("fraction_positive_") :]
        for c in table.columns
        if c.startswith("fraction_positive_") and not c.endswith(("_ci_low", "_ci_high"))
    ]
    condition, seeded, control, well_area, in_map = [], [], [], [], []
    for well in table["well"]:
        info = plate_map.get(well) if plate_map is not None else None
        in_map.append(info is not None if plate_map is not None else None)
        condition.append(info.condition if info else None)
        seeded.append(info.seeded_cells if info else None)
        control.append(";".join(f"{k}:{m}" for m, k in info.controls.items()) if info else None)
        well_area.append(info.well_area_mm2 if info else None)
    table["condition"] = condition
    table["seeded_cells"] = pd.to_numeric(
        pd.Series(seeded, dtype=object), errors="coerce"
    ).to_numpy()
    table["control"] = control
    table["well_area_mm2"] = pd.to_numeric(
        pd.Series(well_area, dtype=object), errors="coerce"
    ).to_numpy()
    if plate_map is not None:
        table["in_plate_map"] = pd.array(in_map, dtype="boolean")
        flags = table["flags"].astype(str)
        table["flags"] = [
            ";".join(x for x in (f, "not_in_plate_map") if x) if not m else f
            for f, m in zip(flags, in_map, strict=True)
        ]
    area = table["well_area_mm2"].astype(float)
    seeded_s = table["seeded_cells"].astype(float).where(lambda s: s > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["imaged_fraction"] = table["imaged_area_mm2"] / area
        table["clusters_per_well_est"] = table["clusters_per_mm2"] * area
        table["ieq_per_well_est"] = table["ieq_per_mm2"] * area
        table["cells_per_well_est"] = table["cells_per_mm2"] * area
        table["ieq_imaged_per_seeded_cell"] = table["ieq_total"] / seeded_s
        table["clusters_imaged_per_seeded_cell"] = table["n_clusters"] / seeded_s
        table["ieq_per_seeded_cell"] = table["ieq_per_well_est"] / seeded_s
        table["clusters_per_seeded_cell"] = table["clusters_per_well_est"] / seeded_s
        table["cells_per_seeded_cell"] = table["cells_per_well_est"] / seeded_s
        for pop in pops:
            table[f"positive_{pop}_cells_per_well_est"] = (
                table["cells_per_well_est"] * table[f"fraction_positive_{pop}"]
            )
            table[f"positive_{pop}_cells_per_seeded_cell"] = (
                table[f"positive_{pop}_cells_per_well_est"] / seeded_s
            )
    return _qc_columns(table, profiles)


def summarize_plates(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    min_cells: int = MIN_CELLS,
    min_clusters: int = MIN_CLUSTERS,
    profiles: Mapping[str, StageProfile] | None = None,
) -> pd.DataFrame:
    """One row per (plate, stage): all objects of that stage on the plate pooled.

    Parameters
    ----------
    cells, clusters, fields : pandas.DataFrame
        Object tables and per-image information (see :func:`summarize`).
    min_cells, min_clusters : int
        Low-count thresholds.
    profiles : dict of str to StageProfile, optional
        Stage profiles by name for the QC columns (default: the built-in profiles).
    """
    table = summarize(
        cells, clusters, fields, ["plate", "stage"], min_cells=min_cells, min_clusters=min_clusters
    )
    return _qc_columns(table, profiles)


def summarize_stages(
    wells: pd.DataFrame,
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    min_cells: int = MIN_CELLS,
    min_clusters: int = MIN_CLUSTERS,
    profiles: Mapping[str, StageProfile] | None = None,
) -> pd.DataFrame:
    """One row per stage over its wells, leaving out low-count wells (when any well is not).

    Pooled values (fractions with Wilson intervals, size distribution, IEQ) are over the cells and
    clusters of the included wells; ``well_mean_fraction_positive_<P>`` / ``well_sd_...`` are the
    mean and standard deviation of the included wells' fractions, which carry the well-to-well
    variation the pooled interval does not. ``wells`` is :func:`summarize_wells`' output; the
    other parameters are as for :func:`summarize_fields`.
    """
    rows = []
    for stage, w in wells.groupby("stage", dropna=False, sort=False):
        included = w[~w["low_count"].astype(bool)]
        note = ""
        if included.empty:
            included = w
            note = "every well is low-count; all included"
        keys = set(zip(included["plate"], included["well"], strict=True))

        def pick(t: pd.DataFrame, keys: set = keys, stage: object = stage) -> pd.DataFrame:
            if t.empty:
                return t
            mask = [(p, wl) in keys for p, wl in zip(t["plate"], t["well"], strict=True)]
            return t[np.asarray(mask, dtype=bool) & (t["stage"] == stage).to_numpy()]

        sub_fields = pick(fields)
        s = summarize(
            pick(cells).assign(_all=0),
            pick(clusters).assign(_all=0),
            sub_fields.assign(_all=0),
            ["_all"],
            min_cells=min_cells,
            min_clusters=min_clusters,
        )
        row = {
            "stage": stage,
            "n_wells": len(w),
            "n_wells_excluded_low_count": int(len(w) - len(included)) if not note else 0,
        }
        row.update(s.drop(columns=["_all"]).iloc[0].to_dict() if len(s) else {})
        for col in [
            c
            for c in w.columns
            if c.startswith("fraction_positive_") and not c.endswith(("_ci_low", "_ci_high"))
        ]:
            pop = col[len("fraction_positive_") :]
            row[f"well_mean_fraction_positive_{pop}"] = float(included[col].mean())
            row[f"well_sd_fraction_positive_{pop}"] = (
                float(included[col].std(ddof=1)) if len(included) > 1 else math.nan
            )
        row["ieq_per_well_mean"] = float(included["ieq_total"].mean())
        row["stage_note"] = note
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return _qc_columns(table, profiles)
