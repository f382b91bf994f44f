"""Compare scored tables of one field with its synthetic truth.

Truth comes from :mod:`islet_imaging.synth` (``SynthField.cells`` / ``clusters_table``) or from the
dataset layout's ``truth/<name>_cells.csv`` (``cell_id, cluster_id, positive_<MARKER>``) and
``truth/<name>_clusters.csv`` (``cluster_id, equivalent_diameter_um, touches_border, n_cells``).
The comparison is on field-level numbers (fractions, interior cluster count, median diameter,
IEQ), which need no object matching; object-level matching lives in :mod:`islet_imaging.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from islet_imaging.measure._ieq import ieq_continuous, ieq_ricordi

__all__ = ["compare_field", "truth_summary"]


def _interior(clusters: pd.DataFrame, *, include_z: bool) -> pd.DataFrame:
    if clusters.empty:
        return clusters
    border = clusters["touches_border"].astype(bool).to_numpy()
    if include_z and "touches_z_border" in clusters:
        border = border | clusters["touches_z_border"].astype(bool).to_numpy()
    return clusters[~border]


def truth_summary(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    *,
    populations: Sequence[str],
    include_z_border: bool = False,
) -> dict[str, float]:
    """Field-level numbers from object tables (truth or scored) by the rules of ``aggregate``.

    Parameters
    ----------
    cells : pandas.DataFrame
        ``positive_<P>`` columns (a population ``"A+B"`` missing from the table is computed from
        ``positive_A`` and ``positive_B``).
    clusters : pandas.DataFrame
        ``equivalent_diameter_um`` and ``touches_border`` (optionally ``touches_z_border``).
    populations : sequence of str
    include_z_border : bool
        Also leave out clusters touching the first / last plane (``touches_z_border``).

    Returns
    -------
    dict
        ``n_cells``, ``n_clusters`` (interior), ``diameter_median_um``, ``ieq_total``,
        ``ieq_total_ricordi`` and ``fraction_positive_<P>`` per population.
    """
    out: dict[str, float] = {"n_cells": float(len(cells))}
    interior = _interior(clusters, include_z=include_z_border)
    d = interior["equivalent_diameter_um"].to_numpy(float) if len(interior) else np.zeros(0)
    out["n_clusters"] = float(len(interior))
    out["diameter_median_um"] = float(np.median(d)) if d.size else math.nan
    out["ieq_total"] = float(np.sum(ieq_continuous(d))) if d.size else 0.0
    out["ieq_total_ricordi"] = float(np.sum(ieq_ricordi(d))) if d.size else 0.0
    for pop in populations:
        col = f"positive_{pop}"
        if col in cells:
            calls = cells[col].astype("boolean")
        else:
            parts = [f"positive_{m}" for m in pop.split("+")]
            if not all(p in cells for p in parts):
                out[f"fraction_positive_{pop}"] = math.nan
                continue
            calls = cells[parts[0]].astype("boolean")
            for p in parts[1:]:
                calls = calls & cells[p].astype("boolean")
        n = int(calls.notna().sum())
        out[f"fraction_positive_{pop}"] = float(calls.sum(skipna=True)) / n if n else math.nan
    return out


def compare_field(
    cells: pd.DataFrame,
    clusters: pd.DataFrame,
    truth_cells: pd.DataFrame,
    truth_clusters: pd.DataFrame,
    *,
    populations: Sequence[str],
    include_z_border: bool = False,
) -> pd.DataFrame:
    """Errors of one scored field against its truth.

    Parameters
    ----------
    cells, clusters : pandas.DataFrame
        Scored tables of the field (``score`` output rows of one image).
    truth_cells, truth_clusters : pandas.DataFrame
        Its truth.
    populations : sequence of str
        Markers and double positives to compare.
    include_z_border : bool
        Also leave out clusters touching the first / last plane (``touches_z_border``, on both
        sides). Default False: the rule of :mod:`islet_imaging.aggregate`, where z contact is
        flagged but not excluded.

    Returns
    -------
    pandas.DataFrame
        :func:`islet_imaging.metrics.measurement_errors` rows (``quantity, true, predicted, error,
        abs_error, relative_error, percentage_points``).
    """
    from islet_imaging.metrics import measurement_errors

    pred = truth_summary(
        cells, clusters, populations=populations, include_z_border=include_z_border
    )
    true = truth_summary(
        truth_cells, truth_clusters, populations=populations, include_z_border=include_z_border
    )
    return measurement_errors(true, pred)
