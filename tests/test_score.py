"""The score pipeline: truth labels give the truth, and the CLI end to end on a small plate."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from islet_imaging.cli import main
from islet_imaging.errors import InputError, MissingZStepWarning
from islet_imaging.io import Field, read_field, read_labels, write_ome_tiff
from islet_imaging.measure import compare_field, population_names
from islet_imaging.score import DEFAULT_MODEL, ScoreOptions, finalize, measure_field
from islet_imaging.segment import Labels, segment_field
from islet_imaging.stages import get_stage, list_stages

synth = pytest.importorskip("islet_imaging.synth")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PLATE = REPO / "sample_images" / "plate"
SAMPLE_MAP = REPO / "sample_images" / "plate_map.csv"

REQUIRED = {
    "fields": ["image", "well", "field", "stage", "n_clusters", "n_cells", "ieq_total"],
    "clusters": [
        "image",
        "cluster_id",
        "equivalent_diameter_um",
        "ieq",
        "touches_border",
        "n_cells",
    ],
    "cells": ["image", "cell_id", "cluster_id"],
    "wells": ["well", "n_clusters", "ieq_total", "n_cells"],
}


def oracle_threshold(values: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The single threshold that misclassifies fewest cells, and the fraction it misclassifies."""
    order = np.argsort(values)
    v, y = values[order], truth[order]
    # cut below the k-th smallest value: the k cells below are called negative, the rest positive
    wrong = np.concatenate([[0], np.cumsum(y)]) + np.concatenate([[0], np.cumsum(~y[::-1])])[::-1]
    k = int(np.argmin(wrong))
    cut = -np.inf if k == 0 else (v[k - 1] if k == len(v) else 0.5 * (v[k - 1] + v[k]))
    return float(cut), float(wrong[k] / len(v))


def truth_run(stage: str, seed: int, *, size: int = 256, z: int = 1):  # type: ignore[no-untyped-def]
    s = synth.generate_field(stage, seed=seed, size=size, z=z)
    labels = Labels(s.nuclei, s.clusters, method="truth")
    result = measure_field(s.field, labels, stage=stage)
    return s, finalize([result], options=ScoreOptions())


@pytest.mark.parametrize("stage", [p.short_name for p in list_stages()])
def test_truth_labels_give_truth(stage: str) -> None:
    s, tables = truth_run(stage, seed=9000)
    profile = get_stage(stage)
    pops = population_names(profile.marker_names, profile.double_positives)
    # per object: the same label arrays give the same sizes and memberships
    merged = tables.clusters.merge(s.clusters_table, on="cluster_id", suffixes=("", "_true"))
    assert len(merged) == len(s.clusters_table) == len(tables.clusters)
    np.testing.assert_allclose(
        merged["equivalent_diameter_um"], merged["equivalent_diameter_um_true"], rtol=1e-9
    )
    assert (merged["touches_border"] == merged["touches_border_true"]).all()
    assert (merged["n_cells"] == merged["n_cells_true"]).all()
    cells = tables.cells.merge(
        s.cells[["cell_id", "cluster_id"]], on="cell_id", suffixes=("", "_t")
    )
    assert len(cells) == len(s.cells)
    assert (cells["cluster_id"] == cells["cluster_id_t"]).all()
    # per field: fractions, interior count, median diameter and IEQ equal the truth
    err = compare_field(
        tables.cells, tables.clusters, s.cells, s.clusters_table, populations=pops
    ).set_index("quantity")
    for q in ("n_cells", "n_clusters", "diameter_median_um", "ieq_total", "ieq_total_ricordi"):
        assert err.loc[q, "abs_error"] == pytest.approx(0.0, abs=1e-9) or (
            math.isnan(err.loc[q, "true"]) and math.isnan(err.loc[q, "predicted"])
        ), q
    # fractions, measurement side: at the best single threshold for each marker the measured
    # intensities reproduce the true fraction up to the cells that no threshold separates
    # (blur and neighbours' spill-over in the rendered image) — exact where the classes separate
    measured = tables.cells.merge(s.cells, on="cell_id", suffixes=("", "_true"))
    automatic = []
    for marker in profile.marker_names:
        values = measured[f"mean_{marker}"].to_numpy(float)
        truth = measured[f"positive_{marker}_true"].to_numpy(bool)
        cut, best = oracle_threshold(values, truth)
        assert abs(np.mean(values > cut) - truth.mean()) <= best + 1e-12
        assert best <= 0.06, (marker, best)
        # thresholding side: the automatic threshold's fraction error
        automatic.append(abs(err.loc[f"fraction_positive_{marker}", "percentage_points"]))
    assert np.mean(automatic) <= 2.5, automatic
    assert max(automatic) <= 8.0, automatic
    field_row = tables.fields.iloc[0]
    assert field_row["n_clusters"] == (~s.clusters_table["touches_border"]).sum()


def test_truth_labels_3d_field() -> None:
    s, tables = truth_run("S6", seed=9001, size=128, z=6)
    interior = ~s.clusters_table["touches_border"]
    merged = tables.clusters.merge(s.clusters_table, on="cluster_id", suffixes=("", "_true"))
    np.testing.assert_allclose(merged["volume_um3"], merged["volume_um3_true"], rtol=1e-9)
    np.testing.assert_allclose(
        merged["equivalent_diameter_um"], merged["equivalent_diameter_um_true"], rtol=1e-9
    )
    assert (merged["touches_border"] == merged["touches_border_true"]).all()
    assert (merged["touches_z_border"] == merged["touches_z_border_true"]).all()
    err = compare_field(
        tables.cells, tables.clusters, s.cells, s.clusters_table, populations=["INS"]
    ).set_index("quantity")
    assert err.loc["n_clusters", "true"] == interior.sum()
    assert err.loc["n_clusters", "abs_error"] == 0
    assert err.loc["ieq_total", "abs_error"] == pytest.approx(0.0, abs=1e-9)


def test_missing_marker_and_shape_mismatch() -> None:
    s = synth.generate_field("S6", seed=9002, size=96)
    f = s.field
    no_gcg = Field(f.data[:3], f.channel_names[:3], f.pixel_size, f.origin)
    with pytest.raises(InputError, match=r"GCG.*missing"):
        measure_field(no_gcg, Labels(s.nuclei, s.clusters), stage="S6")
    small = Labels(s.nuclei[:, :50], s.clusters[:, :50])
    with pytest.raises(InputError, match="grid"):
        measure_field(f, small, stage="S6")
    no_px = Field(f.data, f.channel_names, None, f.origin)
    with pytest.raises(InputError, match="pixel size"):
        measure_field(no_px, Labels(s.nuclei, s.clusters), stage="S6")


def test_empty_field_has_nan_fractions_and_flag() -> None:
    s = synth.generate_field("S6", seed=9003, size=96)
    empty = np.zeros_like(s.nuclei)
    tables = finalize([measure_field(s.field, Labels(empty, empty), stage="S6")])
    row = tables.fields.iloc[0]
    assert row["n_cells"] == 0 and row["n_clusters"] == 0
    assert math.isnan(row["fraction_positive_INS"])
    assert "no_cells" in row["flags"]
    assert tables.thresholds["value"].isna().all()


def test_logged_warnings_logs_each_warning_with_its_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two warnings from one line are both logged (no once-per-location filter) and yielded."""
    from islet_imaging.errors import logged_warnings

    with caplog.at_level(logging.WARNING), logged_warnings(logging.getLogger("t"), "a.tif: ") as w:
        for _ in range(2):
            warnings.warn("too small", UserWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["a.tif: too small"] * 2
    assert [str(x.message) for x in w] == ["too small"] * 2


def test_segmentation_warnings_become_field_flags(tmp_path: Path) -> None:
    """A batch run records what the segmenter warned about each field: a saturated field
    (empty labels), one too small for the CNN's context, one sampled too coarsely (1.6 µm/px);
    a normal field has no such flag."""
    from islet_imaging.score import score_image

    s = synth.generate_field("S6", seed=9003, size=256)
    small = s.field.with_data(np.ascontiguousarray(s.field.data[..., :96, :96]))
    saturated = s.field.with_data(np.full_like(s.field.data, 65535))
    coarse = synth.generate_field("S6", seed=9003, size=128, pixel_size_um=1.6).field
    flags = {}
    fields = (("normal", s.field), ("small", small), ("saturated", saturated), ("coarse", coarse))
    for name, fld in fields:
        write_ome_tiff(tmp_path / f"{name}.ome.tif", fld)
        (result,) = score_image(tmp_path / f"{name}.ome.tif", options=ScoreOptions(stage="S6"))
        flags[name] = result.info["flags"]
    assert flags == {
        "normal": "",
        "small": "small_image",
        "saturated": "empty_image",
        "coarse": "coarse_image",
    }
    table = finalize([score_image(tmp_path / "small.ome.tif", options=ScoreOptions(stage="S6"))[0]])
    assert "small_image" in table.fields["flags"].iloc[0].split(";")


def make_plate(root: Path) -> tuple[Path, Path, dict[str, object]]:
    plate = root / "plate"
    truth: dict[str, object] = {}
    for i, (well, fld) in enumerate([("B03", 1), ("B03", 2), ("B04", 1)]):
        s = synth.generate_field("S6", seed=9100 + i, size=192, well=well, field_index=fld)
        name = f"{well}_f{fld}"
        write_ome_tiff(plate / f"{name}.ome.tif", s.field)
        truth[name] = s
    pm = root / "plate_map.csv"
    pm.write_text(
        "well,stage,condition,seeded_cells,control\n"
        "B03,S6,a,20000,\n"
        "B04,S6,b,20000,\n"
        "B05,S6,c,20000,\n"  # no images: warned
    )
    return plate, pm, truth


def check_tables(out: Path, markers: list[str]) -> dict[str, pd.DataFrame]:
    tables = {}
    for name, cols in REQUIRED.items():
        csv = pd.read_csv(out / f"{name}.csv")
        pq = pd.read_parquet(out / f"{name}.parquet")
        assert len(csv) == len(pq)
        wanted = cols + [
            f"{'positive' if name == 'cells' else 'fraction_positive'}_{m}" for m in markers
        ]
        missing = [c for c in wanted if c not in csv.columns]
        assert not missing, (name, missing)
        tables[name] = pq
    for name in ("plates", "stages", "thresholds"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.parquet").is_file()
    assert (out / "failures.csv").is_file() and (out / "run.json").is_file()
    return tables


def test_cli_score_plate_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    plate, pm, truth = make_plate(tmp_path)
    out = tmp_path / "out"
    args = ["score", str(plate), "--plate-map", str(pm), "--out", str(out), "--no-progress"]
    rc = main([*args, "--save-labels"])
    assert rc == 0
    # a per-well summary on stdout: the S6 key population with its interval
    summary = capsys.readouterr().out.splitlines()
    assert summary[0].split()[:3] == ["well", "stage", "clusters"]
    assert [line.split()[0] for line in summary[1:]] == ["B03", "B04"]
    assert all("INS+" in line and "%" in line for line in summary[1:])
    args.insert(0, "-q")
    tables = check_tables(out, ["INS", "NKX6.1", "GCG"])
    fields = tables["fields"].set_index("image")
    assert sorted(fields.index) == ["B03_f1", "B03_f2", "B04_f1"]
    assert fields.loc["B03_f2", "well"] == "B03" and fields.loc["B03_f2", "field"] == 2
    assert set(fields["stage"]) == {"sc-islet"}
    wells = tables["wells"].set_index("well")
    assert wells.loc["B03", "n_fields"] == 2
    assert wells.loc["B03", "n_cells"] == fields.loc[["B03_f1", "B03_f2"], "n_cells"].sum()
    assert wells.loc["B03", "condition"] == "a"
    cells = tables["cells"]
    assert cells["cluster_id"].ge(0).all() and cells["positive_INS"].notna().all()
    # labels on the input grid, and the tables agree with them
    nuc = read_labels(out / "labels" / "B03_f1_nuclei.tif")
    clu = read_labels(out / "labels" / "B03_f1_clusters.tif")
    assert nuc.shape == clu.shape == truth["B03_f1"].nuclei.shape  # type: ignore[attr-defined]
    assert set(cells.loc[cells["image"] == "B03_f1", "cell_id"]) == set(np.unique(nuc)) - {0}
    assert set(fields["segmentation"]) == {DEFAULT_MODEL}
    # the default model gets the INS fraction roughly right
    for name, s in truth.items():
        true_frac = s.cells["positive_INS"].mean()  # type: ignore[attr-defined]
        assert abs(fields.loc[name, "fraction_positive_INS"] - true_frac) < 0.15
    # no overwrite of a non-empty --out without --overwrite
    assert main(args) == 2
    assert main([*args, "--overwrite", "--threshold-method", "otsu"]) == 0
    # test-time augmentation: named in the fields table; the classical baseline refuses it
    assert main([*args, "--overwrite", "--augment"]) == 0
    assert set(pd.read_csv(out / "fields.csv")["segmentation"]) == {f"{DEFAULT_MODEL}+augment"}
    assert main([*args, "--overwrite", "--augment", "--model", "classical"]) == 2
    # a file where the output folder goes is refused and kept
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["score", str(plate), "--plate-map", str(pm), "--out", str(notes)]) == 2
    assert "notes.txt: --out names an existing file, not a folder" in caplog.text
    assert notes.read_text() == "mine"


def test_cli_records_failures_and_goes_on(tmp_path: Path) -> None:
    plate, _pm, _ = make_plate(tmp_path)
    (plate / "B04_f2.ome.tif").write_bytes(b"not a tiff")
    out = tmp_path / "out"
    rc = main(["-q", "score", str(plate), "--stage", "S6", "--out", str(out), "--no-progress"])
    assert rc == 1
    failures = pd.read_csv(out / "failures.csv")
    assert failures["image"].tolist() == ["B04_f2.ome.tif"]
    assert len(pd.read_csv(out / "fields.csv")) == 3


def test_z_stack_without_a_z_step_is_flagged_and_z_step_given(tmp_path: Path) -> None:
    s = synth.generate_field("S6", seed=9110, size=96, z=3, z_step_um=2.0)
    f = s.field
    assert f.pixel_size is not None
    stack = tmp_path / "in" / "B03_f1.ome.tif"  # the z step lost, as in many exported TIFFs
    write_ome_tiff(stack, Field(f.data, f.channel_names, replace(f.pixel_size, z=None)))
    out = tmp_path / "out"
    argv = ["-q", "score", str(stack), "--stage", "S6", "--model", "classical", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    row = pd.read_csv(out / "fields.csv").iloc[0]
    assert "no_z_step" in row["flags"] and math.isnan(row["z_step_um"])
    assert main([*argv, "--out", str(out), "--overwrite", "--z-step", "2"]) == 0
    row = pd.read_csv(out / "fields.csv").iloc[0]
    assert "no_z_step" not in str(row["flags"]) and row["z_step_um"] == 2.0
    with pytest.warns(MissingZStepWarning, match=r"B03_f1\.ome\.tif: a z-stack of 3 planes"):
        segment_field(read_field(stack), stage="S6", model="classical")


def test_score_an_ome_zarr_hcs_plate(tmp_path: Path) -> None:
    from test_io import write_hcs_plate

    fields = {}
    for i, well in enumerate(("B03", "B04")):
        s = synth.generate_field("S6", seed=9120 + i, size=160)
        fields[well] = [s.field]
    plate = write_hcs_plate(tmp_path / "run12.ome.zarr", fields)
    out = tmp_path / "out"
    argv = ["-q", "score", str(plate), "--stage", "S6", "--model", "classical", "--no-progress"]
    assert main([*argv, "--out", str(out), "--save-labels"]) == 0
    table = pd.read_csv(out / "fields.csv")
    assert table["image"].tolist() == ["B03_f1", "B04_f1"]
    assert table["well"].tolist() == ["B03", "B04"] and set(table["plate"]) == {"run12"}
    assert (out / "labels" / "B04_f1_clusters.tif").is_file()
    assert sorted(pd.read_csv(out / "wells.csv")["well"]) == ["B03", "B04"]


def test_cli_stage_is_required_and_fixed_thresholds(tmp_path: Path) -> None:
    plate, _pm, truth = make_plate(tmp_path)
    out = tmp_path / "out"
    f = truth["B03_f1"].field  # type: ignore[attr-defined]
    bare = tmp_path / "bare" / "B03_f1.ome.tif"  # no stage in its metadata
    write_ome_tiff(bare, Field(f.data, f.channel_names, f.pixel_size))
    rc = main(["-q", "score", str(bare), "--out", str(out), "--no-progress"])
    assert rc == 1
    assert "--stage" in pd.read_csv(out / "failures.csv")["error"].iloc[0]
    rc = main(
        [
            "-q",
            "score",
            str(plate / "B03_f1.ome.tif"),
            "--out",
            str(out),
            "--overwrite",
            "--stage",
            "S6",
            "--threshold-method",
            "fixed:C-peptide=1e9",
            "--no-progress",
        ]
    )
    assert rc == 0
    thr = pd.read_csv(out / "thresholds.csv").set_index("marker")
    assert thr.loc["INS", "method"] == "fixed" and thr.loc["INS", "value"] == 1e9
    assert "gmm used" in thr.loc["GCG", "note"]
    assert pd.read_csv(out / "fields.csv")["fraction_positive_INS"].iloc[0] == 0.0
    bad = main(
        ["-q", "score", str(plate), "--out", str(tmp_path / "o2"), "--threshold-method", "median"]
    )
    assert bad == 2
    bad = main(
        ["-q", "score", str(plate), "--out", str(tmp_path / "o3"), "--threshold-method", "control"]
    )
    assert bad == 2  # control needs a plate map


def test_default_model_is_one_constant() -> None:
    from islet_imaging.cli import build_parser

    args = build_parser().parse_args(["score", "x", "--out", "y"])
    assert args.model == DEFAULT_MODEL


def test_cli_control_threshold_from_negative_control_well(tmp_path: Path) -> None:
    plate = tmp_path / "plate"
    stained = synth.generate_field("S6", seed=9200, size=192)
    control = synth.generate_field("S6", seed=9201, size=192, absent_markers=["INS"])
    write_ome_tiff(plate / "B03_f1.ome.tif", stained.field)
    write_ome_tiff(plate / "B05_f1.ome.tif", control.field)
    pm = tmp_path / "map.csv"
    pm.write_text("well,stage,condition,seeded_cells,control\nB03,S6,,,\nB05,S6,,,negative:INS\n")
    out = tmp_path / "out"
    argv = ["-q", "score", str(plate), "--plate-map", str(pm), "--out", str(out), "--no-progress"]
    assert main([*argv, "--threshold-method", "control"]) == 0
    thr = pd.read_csv(out / "thresholds.csv")
    ins = thr[thr["marker"] == "INS"]
    assert set(ins["method"]) == {"control"}
    assert (ins["n_cells"] == len(pd.read_csv(out / "cells.csv").query("well == 'B05'"))).all()
    assert "no negative-control well" in thr[thr["marker"] == "GCG"]["note"].iloc[0]
    wells = pd.read_csv(out / "wells.csv").set_index("well")
    assert wells.loc["B05", "fraction_positive_INS"] <= 0.02  # ~1 % by construction
    assert wells.loc["B05", "control"] == "negative:INS"


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE_MAP.is_file(), reason="sample plate not built")
def test_cli_score_sample_plate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "-q",
            "score",
            str(SAMPLE_PLATE),
            "--plate-map",
            str(SAMPLE_MAP),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    fields = pd.read_csv(out / "fields.csv")
    truth_dir = SAMPLE_PLATE / "truth"
    for _, row in fields.iterrows():
        tc = truth_dir / f"{row['image']}_cells.csv"
        if not tc.is_file():
            continue
        truth_cells = pd.read_csv(tc)
        for col in [c for c in truth_cells.columns if c.startswith("positive_")]:
            pred = row.get("fraction_" + col)
            assert abs(pred - truth_cells[col].mean()) < 0.2, (row["image"], col)
        assert row["n_cells"] == pytest.approx(len(truth_cells), rel=0.25)
    wells = pd.read_csv(out / "wells.csv").set_index("well")
    assert wells.loc["H03", "fraction_positive_INS"] <= 0.02  # the plate's no-INS control well
    # colony / aggregate fields (512 px) hold whole clusters: interior counts and median
    # diameters follow the truth (touching clusters merged by the classical model cost a few)
    big = fields[(fields["width_px"] == 512) & (fields["n_planes"] == 1)].set_index("image")
    assert len(big) == 11
    true_n, true_med = {}, {}
    for image in big.index:
        tc = pd.read_csv(truth_dir / f"{image}_clusters.csv")
        interior = tc.loc[~tc["touches_border"].astype(bool), "equivalent_diameter_um"]
        true_n[image], true_med[image] = len(interior), float(interior.median())
    assert min(true_n.values()) >= 3
    assert (big["n_clusters"] >= 2).sum() >= 9
    assert 0.7 * sum(true_n.values()) <= big["n_clusters"].sum() <= 1.2 * sum(true_n.values())
    found = big[big["n_clusters"] > 0]
    rel = [abs(found.loc[i, "diameter_median_um"] / true_med[i] - 1) for i in found.index]
    assert float(np.median(rel)) < 0.15
    assert (big.loc[found.index, "ieq_total"] > 0).all()
