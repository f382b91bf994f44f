"""Synthetic fields: truth consistent with the labels and the pixels, determinism, writers, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from islet_imaging.errors import InputError, StageError
from islet_imaging.stages import BUILTIN_STAGES, get_stage
from islet_imaging.synth import generate_field
from islet_imaging.synth._geometry import make_layout
from islet_imaging.synth._stages import LOOKS

STAGES = [p.name for p in BUILTIN_STAGES]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fields() -> dict[str, object]:
    """One 160x160 field per stage (cached for the module)."""
    return {name: generate_field(name, seed=11, size=160) for name in STAGES}


# -- structure ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_generates_a_consistent_field(stage: str, fields: dict) -> None:
    s = fields[stage]
    profile = get_stage(stage)
    f = s.field
    assert f.channel_names == ("DAPI", *profile.marker_names)
    assert f.data.dtype == np.uint16 and f.data.shape == (len(f.channel_names), 1, 160, 160)
    assert f.pixel_size.x == f.pixel_size.y == 0.65 and f.pixel_size.z is None
    assert f.origin.stage == profile.name
    assert s.nuclei.dtype == np.int32 and s.clusters.dtype == np.int32
    assert s.nuclei.shape == s.clusters.shape == (1, 160, 160)
    # nuclei are labelled 1..N, one table row each
    ids = np.unique(s.nuclei)
    ids = ids[ids > 0]
    assert len(s.cells) == ids.size == int(s.nuclei.max()) > 5
    assert s.cells["cell_id"].tolist() == list(range(1, ids.size + 1))
    # each nucleus lies entirely within its cluster, or entirely outside clusters if isolated
    for row in s.cells.itertuples():
        under = np.unique(s.clusters[s.nuclei == row.cell_id])
        assert under.tolist() == [row.cluster_id]
    cluster_ids = set(np.unique(s.clusters)) - {0}
    assert set(s.cells["cluster_id"]) - {0} <= cluster_ids
    assert set(s.clusters_table["cluster_id"]) == cluster_ids
    # n_cells counts the nuclei of each cluster
    counts = s.cells[s.cells.cluster_id > 0].groupby("cluster_id").size()
    table = s.clusters_table.set_index("cluster_id")["n_cells"]
    assert (table.reindex(counts.index) == counts).all()
    assert table.sum() == (s.cells.cluster_id > 0).sum()
    for m in profile.marker_names:
        assert s.cells[f"positive_{m}"].dtype == bool


def test_truth_nuclei_are_bright_in_dapi(fields: dict) -> None:
    for stage, s in fields.items():
        dapi = s.field.data[0, 0].astype(float)
        cells = ndi.binary_dilation(s.nuclei[0] > 0, iterations=6) | (s.clusters[0] > 0)
        bg = dapi[~cells]
        means = ndi.mean(dapi, s.nuclei[0], np.arange(1, len(s.cells) + 1))
        # every nucleus clearly above the dish background (median + 5 robust SD)
        mad = np.median(np.abs(bg - np.median(bg))) * 1.4826
        assert np.min(means) > np.median(bg) + 5 * mad, stage


def test_debris_is_not_labelled() -> None:
    look = LOOKS["sc-islet"]
    rng = np.random.default_rng(5)
    layout = make_layout(rng, look, (1, 256, 256), (0.65, 0.65, 0.65))
    assert len(layout.debris) > 0
    idx = np.rint(layout.debris[:, 1:3] / 0.65).astype(int)
    idx = np.clip(idx, 0, 255)
    assert np.all(layout.nuclei[0, idx[:, 0], idx[:, 1]] == 0)


# -- markers ------------------------------------------------------------------------------------
def _marker_means(s, channel: int, compartment: str) -> np.ndarray:
    img = s.field.data[channel].astype(float)
    labels = s.nuclei if compartment == "nuclear" else s.cytoplasm
    n = len(s.cells)
    return np.asarray(ndi.mean(img, labels, np.arange(1, n + 1)))


@pytest.mark.parametrize("stage", STAGES)
def test_positive_cells_are_brighter_than_negative(stage: str) -> None:
    profile = get_stage(stage)
    s = generate_field(stage, seed=3, size=256)
    for c, marker in enumerate(profile.markers, start=1):
        pos = s.cells[f"positive_{marker.name}"].to_numpy()
        means = _marker_means(s, c, marker.compartment)
        ok = np.isfinite(means)
        if pos[ok].sum() < 3 or (~pos[ok]).sum() < 3:
            continue
        p, q = means[ok & pos], means[ok & ~pos]
        assert p.mean() > q.mean(), marker.name
        # clearly, not just on average: most positives above the 90th percentile of negatives
        assert np.mean(p > np.percentile(q, 90)) > 0.7, marker.name


def test_sc_islet_composition_is_realistic() -> None:
    cells = pd.concat([generate_field("S6", seed=k, size=256).cells for k in range(3)])
    ins = cells["positive_INS"]
    assert 0.25 <= ins.mean() <= 0.65
    assert 0.02 <= cells["positive_GCG"].mean() <= 0.2
    nkx = cells["positive_NKX6.1"]
    assert nkx[ins].mean() > 2 * nkx[~ins].mean()  # NKX6.1 mostly in INS+ cells


def test_definitive_endoderm_sox17_fraction() -> None:
    cells = pd.concat([generate_field("S1", seed=k, size=192).cells for k in range(2)])
    assert 0.75 <= cells["positive_SOX17"].mean() <= 0.95


def test_negative_control_marker_is_never_positive() -> None:
    s = generate_field("sc-islet", seed=4, size=160, absent_markers=["C-peptide"])
    normal = generate_field("sc-islet", seed=4, size=160)
    assert not s.cells["positive_INS"].any()
    assert normal.cells["positive_INS"].any()
    ins = s.field.channel_names.index("INS")
    assert np.percentile(s.field.data[ins], 99.5) < 0.5 * np.percentile(
        normal.field.data[ins], 99.5
    )


# -- measured truth ------------------------------------------------------------------------------
def test_touches_border_and_diameters_match_the_labels() -> None:
    s = generate_field("sc-islet", seed=2, size=(150, 170))
    lab = s.clusters[0]
    edge = np.zeros(lab.shape, bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    border_ids = set(np.unique(lab[edge])) - {0}
    table = s.clusters_table.set_index("cluster_id")
    assert set(table.index[table.touches_border]) == border_ids
    assert not table["touches_z_border"].any()
    area = np.bincount(lab.ravel())[table.index] * 0.65 * 0.65
    np.testing.assert_allclose(table["area_um2"], area, rtol=1e-9)
    np.testing.assert_allclose(table["equivalent_diameter_um"], 2 * np.sqrt(area / np.pi))
    cell_area = np.bincount(s.nuclei.ravel())[1:] * 0.65 * 0.65
    np.testing.assert_allclose(s.cells["area_um2"], cell_area)


def test_fields_show_border_cut_touching_and_isolated_objects() -> None:
    seen = {"border": False, "touching": False, "isolated": False}
    for seed in range(4):
        s = generate_field("sc-islet", seed=seed, size=256)
        lab = s.clusters[0]
        seen["border"] |= bool(s.clusters_table["touches_border"].any())
        a, b = lab[:, 1:], lab[:, :-1]
        seen["touching"] |= bool(np.any((a != b) & (a > 0) & (b > 0)))
        seen["isolated"] |= bool((s.cells["cluster_id"] == 0).any())
    assert all(seen.values()), seen


def test_nuclei_touch_each_other() -> None:
    s = generate_field("ipsc", seed=1, size=192)
    lab = s.nuclei[0]
    a, b = lab[:, 1:], lab[:, :-1]
    assert np.sum((a != b) & (a > 0) & (b > 0)) > 20


# -- determinism --------------------------------------------------------------------------------
def test_same_seed_is_bit_identical_and_seeds_differ() -> None:
    a = generate_field("S4", seed=9, size=96)
    b = generate_field("S4", seed=9, size=96)
    c = generate_field("S4", seed=10, size=96)
    assert np.array_equal(a.field.data, b.field.data)
    assert np.array_equal(a.nuclei, b.nuclei) and np.array_equal(a.clusters, b.clusters)
    pd.testing.assert_frame_equal(a.cells, b.cells)
    pd.testing.assert_frame_equal(a.clusters_table, b.clusters_table)
    assert not np.array_equal(a.field.data, c.field.data)


def test_generation_does_not_touch_the_global_random_state() -> None:
    state = np.random.get_state()  # noqa: NPY002 (checking the legacy global state)
    generate_field("S6", seed=1, size=64)
    after = np.random.get_state()  # noqa: NPY002
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2] == after[2]


def test_user_defined_stage_generates(tmp_path: Path) -> None:
    from islet_imaging.stages import load_stages

    toml = tmp_path / "stages.toml"
    toml.write_text(
        '[stages.my-beta]\nextends = "sc-islet"\naliases = ["S7"]\n'
        'markers = [{name = "INS", compartment = "cytoplasmic"}, '
        '{name = "MAFA", compartment = "nuclear"}]\n'
        'double_positives = ["INS+MAFA"]\nqc = []\n',
        encoding="utf-8",
    )
    profile = load_stages(toml).get("S7")
    s = generate_field(profile, seed=2, size=128)
    assert s.field.channel_names == ("DAPI", "INS", "MAFA")
    assert 0.2 < s.cells["positive_MAFA"].mean() < 0.9
    from islet_imaging.cli import main

    out = tmp_path / "ds"
    args = ["synth", "--stage", "S7", "--stages", str(toml), "--out", str(out), "--size", "48"]
    assert main(args) == 0
    assert (out / "images" / "S7_0_0.ome.tif").exists()
    assert main(["synth", "--stage", "S7", "--out", str(out), "--size", "48"]) == 2  # unknown


# -- z-stacks -----------------------------------------------------------------------------------
def test_z_stack_is_3d_with_anisotropic_voxels() -> None:
    s = generate_field("sc-islet", seed=1, size=96, z=8, z_step_um=2.0)
    assert s.field.data.shape == (4, 8, 96, 96)
    assert s.field.pixel_size.z == 2.0
    assert s.nuclei.shape == s.clusters.shape == (8, 96, 96)
    assert "volume_um3" in s.clusters_table and "volume_um3" in s.cells
    vol = np.bincount(s.nuclei.ravel())[1:] * 2.0 * 0.65 * 0.65
    np.testing.assert_allclose(s.cells["volume_um3"], vol)
    np.testing.assert_allclose(
        s.cells["equivalent_diameter_um"], 2 * np.cbrt(3 * vol / (4 * np.pi))
    )
    # nuclei are 3D objects: ~7 µm spans a few 2 µm planes but many 0.65 µm pixels
    sl = ndi.find_objects(s.nuclei)
    z_extent = np.median([o[0].stop - o[0].start for o in sl if o is not None])
    x_extent = np.median([o[2].stop - o[2].start for o in sl if o is not None])
    assert 2 <= z_extent <= 6 and x_extent >= 2 * z_extent
    # the stack gets dimmer with depth
    dapi = s.field.data[0].astype(float)
    inside = s.nuclei > 0
    means = [dapi[k][inside[k]].mean() for k in range(8) if inside[k].sum() > 50]
    assert means[0] > means[-1]
    zb = s.clusters_table["touches_z_border"]
    assert zb.dtype == bool


def test_monolayer_stack_is_a_thin_layer() -> None:
    s = generate_field("S1", seed=1, size=64, z=6)
    planes = np.flatnonzero((s.nuclei > 0).any(axis=(1, 2)))
    assert 0 < planes.size < 6


# -- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_explained() -> None:
    with pytest.raises(StageError, match="unknown stage"):
        generate_field("S9", seed=1, size=64)
    with pytest.raises(InputError, match="field size"):
        generate_field("S6", seed=1, size="big")
    with pytest.raises(InputError, match="seed"):
        generate_field("S6", seed=-1, size=64)
    with pytest.raises(InputError, match="z must"):
        generate_field("S6", seed=1, size=64, z=0)
    with pytest.raises(InputError, match="pixel size"):
        generate_field("S6", seed=1, size=64, pixel_size_um=0.0)
    with pytest.raises(StageError, match="not part of stage"):
        generate_field("S6", seed=1, size=64, absent_markers=["SOX17"])


# -- dataset writer and CLI ------------------------------------------------------------------------
def test_write_dataset_reads_back(tmp_path: Path) -> None:
    from islet_imaging.io import read_field, read_labels
    from islet_imaging.synth import write_dataset

    names = write_dataset(tmp_path, ["S6", "ipsc"], n=1, seed=5, size=(48, 64), pixel_size=0.5)
    assert names == ["S6_5_0", "S0_5_0"]
    meta = pd.read_csv(tmp_path / "metadata.csv")
    assert meta["name"].tolist() == names
    assert meta.loc[0, "channel_names"] == "DAPI|INS|NKX6.1|GCG"
    assert meta.loc[0, "pixel_size_um"] == 0.5
    f = read_field(tmp_path / "images" / "S6_5_0.ome.tif")
    assert f.channel_names == ("DAPI", "INS", "NKX6.1", "GCG")
    assert f.pixel_size.x == pytest.approx(0.5) and f.data.shape == (4, 1, 48, 64)
    nuclei = read_labels(tmp_path / "labels" / "S6_5_0_nuclei.tif")
    cells = pd.read_csv(tmp_path / "truth" / "S6_5_0_cells.csv")
    assert int(nuclei.max()) == len(cells)
    clusters = read_labels(tmp_path / "labels" / "S6_5_0_clusters.tif")
    table = pd.read_csv(tmp_path / "truth" / "S6_5_0_clusters.csv")
    assert set(table["cluster_id"]) == set(np.unique(clusters)) - {0}
    # the same call again refuses before writing anything
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_dataset(tmp_path, "S6", n=1, seed=5, size=(48, 64))
    write_dataset(tmp_path, "S6", n=1, seed=5, size=(48, 64), overwrite=True)


def test_cli_synth(tmp_path: Path) -> None:
    from islet_imaging.cli import main
    from islet_imaging.io import read_field

    out = tmp_path / "ds"
    args = ["synth", "--stage", "S5", "--out", str(out), "--n", "2", "--seed", "3"]
    assert main([*args, "--size", "64x48", "--pixel-size", "0.8"]) == 0
    f = read_field(out / "images" / "S5_3_1.ome.tif")
    assert f.data.shape == (5, 1, 48, 64) and f.pixel_size.x == pytest.approx(0.8)
    assert main([*args, "--size", "64x48"]) == 2  # refuses to overwrite
    assert main([*args, "--size", "64x48", "--overwrite"]) == 0
    assert main(["synth", "--out", str(out)]) == 2  # no stage
    assert main(["synth", "--stage", "S5", "--out", str(out), "--size", "0"]) == 2
    assert main(["synth", "--stage", "all", "--out", str(tmp_path / "all"), "--size", "32"]) == 0
    meta = pd.read_csv(tmp_path / "all" / "metadata.csv")
    assert sorted(meta["stage"]) == sorted(STAGES)


def test_cli_z_stack(tmp_path: Path) -> None:
    from islet_imaging.cli import main
    from islet_imaging.io import read_field

    assert (
        main(
            [
                "synth",
                "--stage",
                "S6",
                "--out",
                str(tmp_path),
                "--size",
                "48",
                "--z",
                "4",
                "--z-step",
                "1.5",
            ]
        )
        == 0
    )
    f = read_field(tmp_path / "images" / "S6_0_0.ome.tif")
    assert f.data.shape == (4, 4, 48, 48) and f.pixel_size.z == pytest.approx(1.5)


# -- sample plate --------------------------------------------------------------------------------
def test_sample_plate_layout_and_determinism() -> None:
    from islet_imaging.synth._plate import SAMPLE_PLATE, generate_plate_field, plate_map

    pm = plate_map()
    assert list(pm.columns) == ["well", "stage", "condition", "seeded_cells", "control"]
    assert set(pm["stage"]) == set(STAGES)
    control = pm[pm["control"] != ""]
    assert control["control"].tolist() == ["negative:INS"]
    well = next(w for w in SAMPLE_PLATE if w.control)
    a = generate_plate_field(well, 16, 1)
    assert not a.cells["positive_INS"].any()
    b = generate_plate_field(well, 16, 1)
    assert np.array_equal(a.field.data, b.field.data)
    assert a.field.origin.well == well.well and a.field.origin.field == 1


def test_committed_sample_plate_matches_the_generator() -> None:
    """The bundled plate is what the documented command produces (checks one 2D well + one stack)."""
    from islet_imaging.io import read_field, read_labels
    from islet_imaging.synth._plate import SAMPLE_PLATE, generate_plate_field

    plate = REPO / "sample_images" / "plate"
    if not (plate / "A01_f1.ome.tif").exists():
        pytest.skip("sample_images/plate not present")
    for wi in (0, len(SAMPLE_PLATE) - 1):
        well = SAMPLE_PLATE[wi]
        synth = generate_plate_field(well, wi, 1)
        name = f"{well.well}_f1"
        f = read_field(plate / f"{name}.ome.tif")
        assert f.channel_names == synth.field.channel_names
        assert f.data.shape == synth.field.data.shape
        # bit-identical on the machine that made it; vectorised float32 exp/log may differ in the
        # last bit between CPU families (and so reshuffle the shot noise), so compare the
        # noise-free content: smoothed images must agree within 2 %
        saved_img = ndi.gaussian_filter(f.data.astype(float), (0, 0, 2, 2))
        new_img = ndi.gaussian_filter(synth.field.data.astype(float), (0, 0, 2, 2))
        assert np.abs(saved_img - new_img).mean() < 0.02 * new_img.mean(), name
        for kind, truth in (("nuclei", synth.nuclei), ("clusters", synth.clusters)):
            saved = read_labels(plate / "labels" / f"{name}_{kind}.tif")
            assert (saved == truth).mean() > 0.999, (name, kind)
    pm = pd.read_csv(REPO / "sample_images" / "plate_map.csv", keep_default_na=False)
    assert len(pm) == len(SAMPLE_PLATE)


def test_sample_plate_colony_and_aggregate_wells_hold_interior_clusters() -> None:
    """Colony / aggregate wells are imaged large enough to hold whole (interior) clusters."""
    from islet_imaging.io import read_field
    from islet_imaging.synth._plate import LARGE_FIELD, MIN_INTERIOR, SAMPLE_PLATE

    large = [w for w in SAMPLE_PLATE if get_stage(w.stage).cluster_kind != "monolayer-patch"]
    sheets = [w for w in SAMPLE_PLATE if get_stage(w.stage).cluster_kind == "monolayer-patch"]
    assert {w.well for w in sheets} == {"B01", "B02", "D01", "D02", "E01", "E02"}
    assert all(f.size == (256, 256) for w in sheets for f in w.fields)
    flat = [w for w in large if w.well != "H04"]
    assert len(flat) == 11 and all(f.size == LARGE_FIELD for w in flat for f in w.fields)
    truth = REPO / "sample_images" / "plate" / "truth"
    if not (truth / "A01_f1_clusters.csv").exists():
        pytest.skip("sample_images/plate not present")
    for w in flat:
        t = pd.read_csv(truth / f"{w.well}_f1_clusters.csv")
        interior = t[~t["touches_border"].astype(bool)]
        assert len(interior) >= MIN_INTERIOR, w.well
        # whole clusters of realistic size, not shrunken ones
        assert interior["equivalent_diameter_um"].between(25, 300).all(), w.well
        assert interior["n_cells"].min() >= 5, w.well
        img = read_field(REPO / "sample_images" / "plate" / f"{w.well}_f1.ome.tif")
        assert img.data.shape[-2:] == LARGE_FIELD, w.well


@pytest.mark.parametrize("stage", STAGES)
def test_protocol_b_is_less_efficient(stage: str) -> None:
    from islet_imaging.synth._plate import _protocol_b
    from islet_imaging.synth._stages import look_for

    look = look_for(get_stage(stage))
    main = max((t for t in look.cell_types if t.markers), key=lambda t: t.fraction)
    b = _protocol_b(look)
    assert b.marker_fraction(main.markers[0]) < look.marker_fraction(main.markers[0])


def test_written_files_are_byte_identical(tmp_path: Path) -> None:
    """Writing the same field twice gives the same bytes (needed for the bit-identical plate)."""
    s = generate_field("S6", seed=8, size=48)
    from islet_imaging.synth import write_synth_field

    a = write_synth_field(tmp_path / "a", "x", s)
    b = write_synth_field(tmp_path / "b", "x", s)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_makes_a_z_stack(stage: str) -> None:
    s = generate_field(stage, seed=1, size=64, z=4)
    assert s.field.data.shape[1:] == (4, 64, 64) and s.nuclei.shape == (4, 64, 64)
    assert len(s.cells) == int(s.nuclei.max())
    assert set(s.cells["cluster_id"]) - {0} <= set(np.unique(s.clusters))


def test_split_pieces_gives_each_piece_its_own_cluster_and_moves_its_cells() -> None:
    from islet_imaging.synth._geometry import _split_pieces

    clusters = np.zeros((1, 40, 40), np.int32)
    clusters[0, 0:20, 0:20] = 1  # largest piece of cluster 1: keeps its label
    clusters[0, 25:37, 25:37] = 1  # 144 px >= (4 × 2 µm)² at 1 µm/px: a cluster of its own
    clusters[0, 0:3, 36:39] = 1  # 9 px: a speck, cleared
    clusters[0, 30:40, 0:10] = 2  # untouched
    nuclei = np.zeros_like(clusters)
    nuclei[0, 5:8, 5:8] = 1  # in the largest piece
    nuclei[0, 30:33, 30:33] = 2  # in the second piece
    nuclei[0, 1:2, 37:38] = 3  # in the speck
    nuclei[0, 33:36, 3:6] = 4  # in cluster 2
    nuclei[0, 20:22, 38:40] = 5  # outside every cluster
    cell_cluster = np.array([1, 1, 1, 2, 0], np.int32)
    out, cc = _split_pieces(clusters, nuclei, cell_cluster, 2.0, np.ones(3))
    assert set(np.unique(out)) == {0, 1, 2, 3}
    assert (out[0, 0:20, 0:20] == 1).all() and (out[0, 25:37, 25:37] == 3).all()
    assert (out[0, 0:3, 36:39] == 0).all() and (out[0, 30:40, 0:10] == 2).all()
    assert cc.tolist() == [1, 3, 0, 2, 0]


@pytest.mark.parametrize("seed", [9000, 9003])
def test_monolayer_patch_truth_is_connected(seed: int) -> None:
    # these fields once held patches made of disconnected pieces (truth no segmenter can match)
    s = generate_field("S2", seed=seed, size=512)
    structure = np.ones((3, 3, 3), bool)
    for i in range(1, int(s.clusters.max()) + 1):
        assert ndi.label(s.clusters == i, structure)[1] == 1, f"cluster {i} is in pieces"
    # every cell's cluster is the one under its nucleus
    for cell in s.cells.itertuples():
        under = s.clusters[s.nuclei == cell.cell_id]
        assert np.bincount(under).argmax() == cell.cluster_id
