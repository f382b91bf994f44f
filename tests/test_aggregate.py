"""Aggregation of object tables into field / well / stage summaries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from islet_imaging.aggregate import (
    size_distribution,
    summarize,
    summarize_fields,
    summarize_stages,
    summarize_wells,
    wilson_interval,
)
from islet_imaging.io import read_plate_map


def wilson_by_formula(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_3_of_10() -> None:
    lo, hi = wilson_interval(3, 10)
    exp_lo, exp_hi = wilson_by_formula(3, 10)
    assert float(lo) == pytest.approx(exp_lo, abs=1e-12)
    assert float(hi) == pytest.approx(exp_hi, abs=1e-12)
    assert (round(float(lo), 3), round(float(hi), 3)) == (0.108, 0.603)


def test_wilson_interval_edges() -> None:
    lo, hi = wilson_interval([0, 10, 0], [10, 10, 0])
    assert lo[0] == 0.0 and hi[0] == pytest.approx(wilson_by_formula(0, 10)[1])
    assert hi[1] == 1.0 and lo[1] == pytest.approx(wilson_by_formula(10, 10)[0])
    assert math.isnan(lo[2]) and math.isnan(hi[2])


def test_size_distribution() -> None:
    d = np.arange(10.0, 410.0, 10.0)  # 40 clusters, 10..400 µm
    s = size_distribution(d)
    assert s["diameter_median_um"] == pytest.approx(np.median(d))
    assert s["diameter_d10_um"] == pytest.approx(np.percentile(d, 10))
    assert s["diameter_d90_um"] == pytest.approx(np.percentile(d, 90))
    assert s["n_clusters_0_50um"] == 4  # 10..40
    assert s["n_clusters_50_100um"] == 5  # 50..90
    assert s["n_clusters_350um_up"] == 6  # 350..400
    empty = size_distribution([])
    assert math.isnan(empty["diameter_median_um"]) and empty["n_clusters_0_50um"] == 0


def tables(n_pos: int = 3, n_cells: int = 10) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ids = {"image": "B03_f1", "plate": "p1", "well": "B03", "field": 1, "stage": "sc-islet"}
    cells = pd.DataFrame(
        {
            **{k: [v] * n_cells for k, v in ids.items()},
            "cell_id": np.arange(1, n_cells + 1),
            "cluster_id": [1] * (n_cells - 1) + [3],
            "positive_INS": pd.array([True] * n_pos + [False] * (n_cells - n_pos), dtype="boolean"),
        }
    )
    clusters = pd.DataFrame(
        {
            **{k: [v] * 3 for k, v in ids.items()},
            "cluster_id": [1, 2, 3],
            "equivalent_diameter_um": [150.0, 75.0, 300.0],
            "ieq": [1.0, 0.125, 8.0],
            "ieq_ricordi": [1.685, 0.167, 10.352],
            "touches_border": [False, False, True],
            "edge_weight": [1.5, 1.2, 0.0],
        }
    )
    fields = pd.DataFrame([{**ids, "imaged_area_mm2": 0.5, "flags": ""}])
    return cells, clusters, fields


def test_field_summary_3_of_10_positive() -> None:
    cells, clusters, fields = tables()
    t = summarize_fields(cells, clusters, fields)
    row = t.iloc[0]
    assert row["image"] == "B03_f1" and row["stage"] == "sc-islet"
    assert row["n_cells"] == 10 and row["n_positive_INS"] == 3
    assert row["fraction_positive_INS"] == pytest.approx(0.3)
    exp_lo, exp_hi = wilson_by_formula(3, 10)
    assert row["fraction_positive_INS_ci_low"] == pytest.approx(exp_lo)
    assert row["fraction_positive_INS_ci_high"] == pytest.approx(exp_hi)
    # border rule: cluster 3 touches the border → out of counts, sizes and IEQ
    assert row["n_clusters"] == 2 and row["n_clusters_border"] == 1
    assert row["ieq_total"] == pytest.approx(1.125)
    assert row["ieq_total_ricordi"] == pytest.approx(1.685 + 0.167)
    assert row["islet_size_index"] == pytest.approx(1.125 / 2)
    assert row["diameter_median_um"] == pytest.approx(112.5)
    assert row["clusters_per_mm2"] == pytest.approx((1.5 + 1.2) / 0.5)
    assert row["ieq_per_mm2"] == pytest.approx((1.5 * 1.0 + 1.2 * 0.125) / 0.5)
    assert row["cells_per_mm2"] == pytest.approx(20.0)
    # 10 cells, 2 interior clusters: both low-count flags
    assert bool(row["low_count"])
    assert "low_cells(<50)" in row["flags"] and "low_clusters(<5)" in row["flags"]
    # QC against the S6 profile: INS 30–60 % passes, INS+NKX6.1 has no calls → unknown
    assert bool(row["qc_INS"]) is True
    assert row["qc_INS+NKX6.1"] is pd.NA
    assert row["qc_pass"] is pd.NA


def test_empty_field_gives_nan_fractions_with_flag() -> None:
    cells, clusters, fields = tables()
    t = summarize_fields(cells.iloc[0:0], clusters.iloc[0:0], fields)
    row = t.iloc[0]
    assert row["n_cells"] == 0 and row["n_clusters"] == 0 and row["ieq_total"] == 0.0
    assert math.isnan(row["fraction_positive_INS"])
    assert math.isnan(row["fraction_positive_INS_ci_low"])
    assert math.isnan(row["islet_size_index"])
    assert "no_cells" in row["flags"]


def test_wells_pool_fields_and_compute_yield(tmp_path: Path) -> None:
    cells, clusters, fields = tables()
    c2, cl2, f2 = tables(n_pos=7)
    for t in (c2, cl2, f2):
        t["image"] = "B03_f2"
        t["field"] = 2
    c3, cl3, f3 = tables(n_pos=0)
    for t in (c3, cl3, f3):
        t["image"] = "C01_f1"
        t["well"] = "C01"
    cells = pd.concat([cells, c2, c3], ignore_index=True)
    clusters = pd.concat([clusters, cl2, cl3], ignore_index=True)
    fields = pd.concat([fields, f2, f3], ignore_index=True)
    pm_path = tmp_path / "map.csv"
    pm_path.write_text(
        "well,stage,condition,seeded_cells,control,well_area_mm2\nB03,S6,drug,1000,,10\n"
    )
    pm = read_plate_map(pm_path)
    w = summarize_wells(cells, clusters, fields, plate_map=pm).set_index("well")
    b3 = w.loc["B03"]
    assert b3["n_fields"] == 2 and b3["n_cells"] == 20 and b3["n_positive_INS"] == 10
    assert b3["fraction_positive_INS"] == pytest.approx(0.5)
    assert b3["n_clusters"] == 4 and b3["ieq_total"] == pytest.approx(2.25)
    assert b3["imaged_area_mm2"] == pytest.approx(1.0)
    assert b3["imaged_fraction"] == pytest.approx(0.1)
    assert b3["ieq_per_well_est"] == pytest.approx(b3["ieq_per_mm2"] * 10)
    assert b3["ieq_imaged_per_seeded_cell"] == pytest.approx(2.25 / 1000)
    assert b3["ieq_per_seeded_cell"] == pytest.approx(b3["ieq_per_mm2"] * 10 / 1000)
    assert b3["positive_INS_cells_per_well_est"] == pytest.approx(20 / 1.0 * 10 * 0.5)
    assert b3["condition"] == "drug" and bool(b3["in_plate_map"])
    c1 = w.loc["C01"]
    assert not bool(c1["in_plate_map"]) and "not_in_plate_map" in c1["flags"]
    assert math.isnan(c1["ieq_per_seeded_cell"])
    assert bool(c1["qc_INS"]) is False  # 0 % INS+ fails the ≥ 30 % target
    assert "INS" in c1["qc_failed"]


def test_stage_summary_leaves_out_low_count_wells() -> None:
    cells, clusters, fields = tables(n_pos=30, n_cells=60)
    more = clusters.iloc[[0, 1]].copy()
    clusters = pd.concat([clusters] + [more.assign(cluster_id=[10 + i, 20 + i]) for i in range(2)])
    small_c, small_cl, small_f = tables(n_pos=0, n_cells=10)
    for t in (small_c, small_cl, small_f):
        t["well"] = "B04"
        t["image"] = "B04_f1"
    cells = pd.concat([cells, small_c], ignore_index=True)
    clusters = pd.concat([clusters, small_cl], ignore_index=True)
    fields = pd.concat([fields, small_f], ignore_index=True)
    wells = summarize_wells(cells, clusters, fields)
    assert wells.set_index("well")["low_count"].to_dict() == {"B03": False, "B04": True}
    s = summarize_stages(wells, cells, clusters, fields).iloc[0]
    assert s["n_wells"] == 2 and s["n_wells_excluded_low_count"] == 1
    assert s["n_cells"] == 60 and s["fraction_positive_INS"] == pytest.approx(0.5)
    assert s["well_mean_fraction_positive_INS"] == pytest.approx(0.5)


def test_summarize_by_arbitrary_columns() -> None:
    cells, clusters, fields = tables()
    t = summarize(cells, clusters, fields, ["plate", "stage"], min_cells=5, min_clusters=1)
    assert len(t) == 1 and not bool(t.iloc[0]["low_count"])


def test_monolayer_stage_is_not_flagged_for_few_clusters() -> None:
    cells, clusters, fields = tables(n_pos=30, n_cells=60)
    for t in (cells, clusters, fields):
        t["stage"] = "definitive-endoderm"  # monolayer: one patch, cut by the border
    cells = cells.assign(positive_SOX17=cells["positive_INS"])
    row = summarize_fields(cells, clusters, fields).iloc[0]
    assert row["n_clusters"] == 2 and not bool(row["low_count"])
    assert "low_clusters" not in row["flags"]
    row6 = summarize_fields(
        cells.assign(stage="sc-islet"),
        clusters.assign(stage="sc-islet"),
        fields.assign(stage="sc-islet"),
    ).iloc[0]
    assert bool(row6["low_count"]) and "low_clusters(<5)" in row6["flags"]


def test_control_wells_get_no_qc_verdict(tmp_path: Path) -> None:
    cells, clusters, fields = tables(n_pos=0)  # 0 % INS+: would fail the ≥ 30 % target
    pm_path = tmp_path / "map.csv"
    pm_path.write_text(
        "well,stage,condition,seeded_cells,control\nB03,S6,no-INS control,1000,negative:INS\n"
    )
    row = summarize_wells(cells, clusters, fields, plate_map=read_plate_map(pm_path)).iloc[0]
    assert row["fraction_positive_INS"] == 0.0
    assert row["qc_pass"] is pd.NA and row["qc_INS"] is pd.NA
    assert row["qc_failed"] == "control well (negative:INS): not QC'd"
