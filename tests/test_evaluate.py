"""Tests of ``islet_imaging.evaluate``: metrics on hand-made label pairs, datasets, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from islet_imaging import evaluate as ev
from islet_imaging.cli import main
from islet_imaging.errors import InputError, ModelError
from islet_imaging.io import (
    Field,
    Origin,
    PixelSize,
    read_field,
    read_labels,
    write_labels,
    write_ome_tiff,
)
from islet_imaging.metrics import diameter_errors, error_kinds, match
from islet_imaging.segment import Labels

# -- hand-made label pairs ------------------------------------------------------------------------
# Three true objects of 10 px on one row; predictions: one overlapping true 1 with IoU 8/10 = 0.8,
# one overlapping true 2 with IoU 6/10 = 0.6, none for true 3 (a false negative) and one far
# from everything (a false positive).


def _pair() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((1, 60), np.int32)
    truth[0, 0:10] = 1
    truth[0, 20:30] = 2
    truth[0, 40:50] = 3
    pred = np.zeros_like(truth)
    pred[0, 0:8] = 7  # IoU 0.8 with true 1
    pred[0, 20:26] = 9  # IoU 0.6 with true 2
    pred[0, 55:60] = 4  # false positive
    return truth, pred


def _perfect() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((1, 40), np.int32)
    truth[0, 0:10] = 1
    truth[0, 20:30] = 2
    return truth, truth * 5


# (threshold, tp, fp, fn, ap, precision, recall, f1, pq)
HAND_MADE = [
    (0.5, 2, 1, 1, 2 / 4, 2 / 3, 2 / 3, 2 / 3, (0.8 + 0.6) / 3),
    (0.6, 2, 1, 1, 2 / 4, 2 / 3, 2 / 3, 2 / 3, (0.8 + 0.6) / 3),
    (0.65, 1, 2, 2, 1 / 5, 1 / 3, 1 / 3, 1 / 3, 0.8 / 3),
    (0.75, 1, 2, 2, 1 / 5, 1 / 3, 1 / 3, 1 / 3, 0.8 / 3),
    (0.8, 1, 2, 2, 1 / 5, 1 / 3, 1 / 3, 1 / 3, 0.8 / 3),
    (0.85, 0, 3, 3, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.9, 0, 3, 3, 0.0, 0.0, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize(
    ("thr", "tp", "fp", "fn", "ap", "precision", "recall", "f1", "pq"), HAND_MADE
)
def test_score_pairs_hand_made(
    thr: float,
    tp: int,
    fp: int,
    fn: int,
    ap: float,
    precision: float,
    recall: float,
    f1: float,
    pq: float,
) -> None:
    s = ev.score_pairs([_pair()], thresholds=[thr])
    k = f"{thr:g}"
    assert (s[f"tp@{k}"], s[f"fp@{k}"], s[f"fn@{k}"]) == (tp, fp, fn)
    assert s[f"ap@{k}"] == pytest.approx(ap, abs=1e-12)
    assert s[f"precision@{k}"] == pytest.approx(precision, abs=1e-12)
    assert s[f"recall@{k}"] == pytest.approx(recall, abs=1e-12)
    assert s[f"f1@{k}"] == pytest.approx(f1, abs=1e-12)
    assert s[f"pq@{k}"] == pytest.approx(pq, abs=1e-12)
    assert (s["n_images"], s["n_true"], s["n_pred"]) == (1, 3, 3)


def test_mean_ap_over_default_thresholds() -> None:
    s = ev.score_pairs([_pair()])  # 0.5, 0.55, ..., 0.9
    # 0.5, 0.55, 0.6 → 2/4; 0.65 ... 0.8 → 1/5; 0.85, 0.9 → 0
    assert s["mean_ap"] == pytest.approx((3 * 0.5 + 4 * 0.2) / 9, abs=1e-12)
    assert [s[f"ap@{t:g}"] for t in (0.5, 0.75, 0.9)] == pytest.approx([0.5, 0.2, 0.0])


def test_pooled_differs_from_mean_of_images() -> None:
    pooled = ev.score_pairs([_pair(), _perfect()], thresholds=[0.5, 0.75])
    # pooled at 0.5: tp 2 + 2, fp 1, fn 1 → 4 / 6; at 0.75: tp 1 + 2, fp 2, fn 2 → 3 / 7
    assert pooled["ap@0.5"] == pytest.approx(4 / 6)
    assert pooled["ap@0.75"] == pytest.approx(3 / 7)
    assert pooled["pq@0.5"] == pytest.approx((0.8 + 0.6 + 2.0) / (4 + 0.5 + 0.5))
    assert (pooled["n_images"], pooled["n_true"], pooled["n_pred"]) == (2, 5, 5)
    assert ev.score_pairs([_perfect()], thresholds=[0.5])["ap@0.5"] == 1.0


def test_score_pairs_rejects_bad_input() -> None:
    t, p = _pair()
    with pytest.raises(InputError, match="differ in shape"):
        ev.score_pairs([(t, p[:, :30])])
    with pytest.raises(InputError, match="no image pairs"):
        ev.score_pairs([])
    with pytest.raises(InputError, match="integers"):
        ev.score_pairs([(t > 0, p)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", (0.5,)),
        ("0.75, 0.5,0.5", (0.5, 0.75)),
        ("0.5:0.9:0.1", (0.5, 0.6, 0.7, 0.8, 0.9)),
        ("0.5:0.9:0.05", (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)),
        (None, (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)),
        ([0.9, 0.5], (0.5, 0.9)),
    ],
)
def test_parse_thresholds(text: str | list[float] | None, expected: tuple[float, ...]) -> None:
    assert ev.parse_thresholds(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "not understood"),
        ("0.9:0.5:0.1", "not understood"),
        ("0, 0.5", r"\(0, 1\]"),
        ("1.5", r"\(0, 1\]"),
        (",", "at least one"),
    ],
)
def test_parse_thresholds_rejects(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ev.parse_thresholds(text)


def _score(
    model: str, image: str, kind: str, pair: tuple[np.ndarray, np.ndarray], stage: str = "S6"
) -> ev.ImageScore:
    return ev.ImageScore(
        data="d",
        image=image,
        stage=stage,
        model=model,
        kind=kind,
        matchings=tuple(match(*pair, thresholds=(0.5, 0.75, 0.9))),
        errors=error_kinds(*pair, threshold=0.5),
    )


def test_evaluation_pooling_and_table() -> None:
    perfect = _perfect()
    evaluation = ev.Evaluation(
        models=("A", "B"),
        data=("d",),
        thresholds=(0.5, 0.75, 0.9),
        per_image=(
            _score("A", "x", "nuclei", _pair()),
            _score("A", "y", "nuclei", perfect),
            _score("B", "x", "nuclei", (_pair()[0], _pair()[0])),
            _score("B", "y", "nuclei", perfect),
        ),
    )
    assert evaluation.kinds() == ("nuclei",)  # no cluster truth anywhere: not scored
    pooled = evaluation.pooled()
    assert set(pooled["A"]) == {"nuclei"}
    assert pooled["A"]["nuclei"]["ap@0.5"] == pytest.approx(4 / 6)
    assert pooled["B"]["nuclei"]["ap@0.5"] == 1.0
    assert pooled["A"]["nuclei"]["n_images"] == 2
    table = evaluation.table()
    lines = table.splitlines()
    assert lines[0] == "nuclei (2 images, IoU 0.5:0.9)"
    assert lines[1].split()[:4] == ["model", "AP@0.5", "AP@0.75", "AP@0.9"]
    assert lines[2].split()[:2] == ["A", "0.667"]
    assert lines[3].split()[:2] == ["B", "1.000"]
    diff = lines[4].split()
    assert diff[:4] == ["B", "−", "A", "+0.333"]  # B − A, AP@0.5
    assert diff[-2:] == ["+0", "+0"]  # same truth; as many predictions
    d = evaluation.to_dict()
    assert d["pooled"]["B"]["nuclei"]["tp@0.75"] == 5  # 3 + 2 true objects
    assert len(d["per_image"]) == 4
    assert json.loads(json.dumps(d)) == d
    # one stage: its figures are the pooled ones, and the table has no per-stage block
    assert d["by_stage"]["A"]["nuclei"]["S6"] == d["pooled"]["A"]["nuclei"]
    assert "by stage" not in table


def test_evaluation_by_stage() -> None:
    # stage S4: images x (A: AP@0.5 2/4) and z (A: perfect); stage S6: image y (A: perfect).
    # B is perfect on S4's x but has no S6 image; clusters only on S6.
    evaluation = ev.Evaluation(
        models=("A", "B"),
        data=("d",),
        thresholds=(0.5, 0.75, 0.9),
        per_image=(
            _score("A", "x", "nuclei", _pair(), "S4"),
            _score("A", "y", "nuclei", _perfect(), "S6"),
            _score("A", "z", "nuclei", _perfect(), "S4"),
            _score("A", "y", "clusters", _pair(), "S6"),
            _score("B", "x", "nuclei", (_pair()[0], _pair()[0]), "S4"),
        ),
    )
    assert evaluation.stages() == ("S4", "S6")
    by = evaluation.by_stage()
    # S4 pooled over x and z: tp 2 + 2, fp 1, fn 1 -> 4 / 6
    assert by["A"]["nuclei"]["S4"]["ap@0.5"] == pytest.approx(4 / 6)
    assert by["A"]["nuclei"]["S4"]["n_images"] == 2
    assert by["A"]["nuclei"]["S4"]["fp_spurious@0.5"] == 1
    assert by["A"]["nuclei"]["S6"]["ap@0.5"] == 1.0
    assert by["A"]["clusters"] == {"S6": evaluation.pooled("S6")["A"]["clusters"]}
    assert by["A"]["clusters"]["S6"]["ap@0.5"] == pytest.approx(2 / 4)
    assert set(by["B"]["nuclei"]) == {"S4"} and by["B"]["clusters"] == {}
    # all stages together: x, y, z -> tp 6, fp 1, fn 1
    assert evaluation.pooled()["A"]["nuclei"]["ap@0.5"] == pytest.approx(6 / 8)
    lines = evaluation.table().splitlines()
    i = lines.index("by stage (nuclei):")
    assert lines[i + 1].split() == ["stage", "images", "A", "AP@0.5", "B", "AP@0.5"]
    assert lines[i + 2].split() == ["S4", "2", "0.667", "1.000"]
    assert lines[i + 3].split() == ["S6", "1", "1.000", "-"]
    assert "by stage (clusters):" not in lines  # clusters were scored on one stage only
    d = evaluation.to_dict()
    assert d["by_stage"]["A"]["nuclei"]["S4"]["tp@0.5"] == 4
    assert json.loads(json.dumps(d)) == d


# -- datasets on disk -----------------------------------------------------------------------------
def _blob_labels(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    lab = np.zeros((1, *shape), np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        lab[0, y0:y1, x0:x1] = i
    return lab


# truth of image "a": two nuclei of 10 × 10 and one cluster; image "b": one nucleus, no clusters
TRUTH = {
    "a": {
        "nuclei": _blob_labels((32, 32), [(2, 12, 2, 12), (16, 26, 16, 26)]),
        "clusters": _blob_labels((32, 32), [(0, 30, 0, 30)]),
    },
    "b": {"nuclei": _blob_labels((32, 32), [(4, 14, 4, 14)])},
}
# predictions: model "classical" finds nucleus 1 of "a" exactly (IoU 1) and the second cut to
# 10 × 7 (IoU 0.7) plus a false positive; "default" is perfect. Both find the cluster with
# IoU 0.9 (30 × 27 of 30 × 30) and the nucleus of "b" exactly.
PRED = {
    ("a", "classical"): (
        _blob_labels((32, 32), [(2, 12, 2, 12), (16, 26, 16, 23), (28, 32, 28, 32)]),
        _blob_labels((32, 32), [(0, 30, 0, 27)]),
    ),
    ("a", "default"): (TRUTH["a"]["nuclei"], _blob_labels((32, 32), [(0, 30, 0, 27)])),
    ("b", "classical"): (TRUTH["b"]["nuclei"], np.zeros((1, 32, 32), np.int32)),
    ("b", "default"): (TRUTH["b"]["nuclei"], np.zeros((1, 32, 32), np.int32)),
}


def _write_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, kinds in TRUTH.items():
        data = rng.integers(0, 100, size=(2, 1, 32, 32)).astype(np.uint16)
        fld = Field(data, ("DAPI", "INS"), PixelSize(0.65, 0.65), Origin(stage="S6"))
        write_ome_tiff(root / "images" / f"{name}.ome.tif", fld)
        for kind, lab in kinds.items():
            write_labels(root / "labels" / f"{name}_{kind}.tif", lab, like=fld, name=kind)
    (root / "metadata.csv").write_text(
        "name,stage,pixel_size_um,z_step_um,channel_names\n"
        "a,S6,0.65,,DAPI|INS\n"
        "b,,0.65,,DAPI|INS\n"  # no stage here: the file's (S6) is used
    )
    return root


@pytest.fixture
def fake_segment(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Replace segmentation by the hand-made predictions of PRED; returns the calls made."""
    calls: list[tuple[str, str]] = []

    def segment_field(field: Field, *, stage: object, model: str, **_: object) -> Labels:
        name = "default" if Path(str(model)).name == "default" else str(model)
        calls.append((field.name, name))
        nuclei, clusters = PRED[(field.name, name)]
        return Labels(nuclei, clusters, method=name)

    monkeypatch.setattr("islet_imaging.segment.segment_field", segment_field)
    return calls


def test_evaluate_dataset_hand_made(tmp_path: Path, fake_segment: list) -> None:
    root = _write_dataset(tmp_path / "ds")
    result = ev.evaluate_dataset(["classical", "default"], [root], thresholds=(0.5, 0.75, 0.9))
    assert sorted(fake_segment) == [
        ("a", "classical"),
        ("a", "default"),
        ("b", "classical"),
        ("b", "default"),
    ]
    assert result.models == ("classical", "default")
    assert result.model_paths[0] is None and result.model_paths[1].endswith("default")
    assert not result.failures
    pooled = result.pooled()
    nuc = pooled["classical"]["nuclei"]
    # nuclei pooled over a and b: tp 2 + 1 at 0.5 (IoU 1, 0.7, 1), fp 1, fn 0
    assert (nuc["n_images"], nuc["n_true"], nuc["n_pred"]) == (2, 3, 4)
    assert nuc["ap@0.5"] == pytest.approx(3 / 4)
    assert nuc["ap@0.75"] == pytest.approx(2 / 5)  # the 0.7 pair is lost
    assert nuc["pq@0.5"] == pytest.approx((1 + 0.7 + 1) / (3 + 0.5))
    assert nuc["mean_ap"] == pytest.approx((3 / 4 + 2 / 5 + 2 / 5) / 3)
    # why, at the lowest threshold: the one false positive lies on background
    errors = {k: v for k, v in nuc.items() if k.startswith(("fn_", "fp_"))}
    assert errors == {
        "fn_missed@0.5": 0, "fn_split@0.5": 0, "fn_merged@0.5": 0, "fn_outline@0.5": 0,
        "fp_spurious@0.5": 1, "fp_merged@0.5": 0, "fp_fragment@0.5": 0, "fp_outline@0.5": 0,
    }  # fmt: skip
    assert "true 0 missed, 0 split, 0 merged, 0 outline; predicted 1 spurious" in (result.table())
    assert pooled["default"]["nuclei"]["ap@0.9"] == 1.0
    # clusters only on "a" (b has no cluster labels: not scored, its empty prediction ignored)
    clu = pooled["default"]["clusters"]
    assert (clu["n_images"], clu["n_true"], clu["tp@0.9"], clu["tp@0.5"]) == (1, 1, 1, 1)
    assert clu["pq@0.5"] == pytest.approx(0.9)
    per = {(r["image"], r["model"], r["kind"]): r for r in result.per_image_table()}
    assert set(per) == {
        (i, m, k) for i in "ab" for m in ("classical", "default") for k in ("nuclei", "clusters")
    } - {("b", "classical", "clusters"), ("b", "default", "clusters")}
    assert per[("a", "classical", "nuclei")]["ap@0.5"] == pytest.approx(2 / 3)
    assert per[("b", "classical", "nuclei")]["stage"] == "sc-islet"  # from the file's metadata


def test_cli_json_csv_and_overwrite(
    tmp_path: Path,
    fake_segment: list,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = _write_dataset(tmp_path / "ds")
    out, table = tmp_path / "res" / "eval.json", tmp_path / "res" / "per_image.csv"
    argv = [
        "evaluate",
        "--model",
        "classical",
        "--model",
        "default",
        "--data",
        str(root),
        "--iou",
        "0.5,0.75",
        "--out",
        str(out),
        "--csv",
        str(table),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "nuclei (2 images, IoU 0.5:0.75)" in text
    assert "clusters (1 image, IoU 0.5:0.75)" in text
    assert "default − classical" in text
    d = json.loads(out.read_text())
    assert d["schema"] == "islet-imaging-evaluate/1"
    assert [m["name"] for m in d["models"]] == ["classical", "default"]
    assert d["iou_thresholds"] == [0.5, 0.75]
    assert d["data"] == [str(root)]
    assert d["pooled"]["classical"]["nuclei"]["ap@0.75"] == pytest.approx(2 / 5)
    assert d["pooled"]["default"]["nuclei"]["ap@0.75"] == 1.0
    assert d["failures"] == []
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(d["per_image"]) == 6
    assert {r["fp_spurious@0.5"] for r in rows if r["model"] == "classical"} == {"0", "1"}
    assert {r["kind"] for r in rows if r["image"] == "b"} == {"nuclei"}

    # existing outputs are never replaced without --overwrite (and nothing is re-run)
    before = out.read_bytes()
    n_calls = len(fake_segment)
    assert main(argv) == 2
    assert "--out file already exists" in caplog.text
    assert out.read_bytes() == before and len(fake_segment) == n_calls
    assert main([*argv, "--iou", "0.5", "--overwrite"]) == 0
    assert json.loads(out.read_text())["iou_thresholds"] == [0.5]


def test_failed_image_is_left_out_for_every_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_dataset(tmp_path / "ds")

    def segment_field(field: Field, *, model: str, **_: object) -> Labels:
        name = "default" if Path(str(model)).name == "default" else str(model)
        if field.name == "b" and name == "default":
            raise InputError("boom: no nuclear channel", field.origin.path)
        return Labels(*PRED[(field.name, name)], method=name)

    monkeypatch.setattr("islet_imaging.segment.segment_field", segment_field)
    # and a third image whose file is corrupt
    (root / "images" / "c.ome.tif").write_bytes(b"not a tiff")
    write_labels(root / "labels" / "c_nuclei.tif", TRUTH["b"]["nuclei"])
    out = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--model",
            "classical",
            "--model",
            "default",
            "--data",
            str(root),
            "--stage",
            "S6",
            "--out",
            str(out),
        ]
    )
    assert code == 1
    d = json.loads(out.read_text())
    assert {r["image"] for r in d["per_image"]} == {"a"}  # b failed for default: out for both
    fails = {f["image"]: f for f in d["failures"]}
    assert set(fails) == {"b", "c"}
    assert fails["b"]["model"] == "default" and "boom" in fails["b"]["reason"]
    assert fails["c"]["model"] is None and "c.ome.tif" in fails["c"]["reason"]
    assert d["pooled"]["classical"]["nuclei"]["n_images"] == 1
    assert "2 image(s) failed" in capsys.readouterr().out


# -- bad input ------------------------------------------------------------------------------------
def test_bad_data_directories(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope: dataset directory does not exist"):
        ev.evaluate_dataset(["classical"], [missing])
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="plain: not a dataset directory"):
        ev.evaluate_dataset(["classical"], [tmp_path / "plain"])
    root = _write_dataset(tmp_path / "unlabelled")
    for f in (root / "labels").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="unlabelled: no usable image"):
        ev.evaluate_dataset(["classical"], [root])
    with pytest.raises(InputError, match="at least one dataset"):
        ev.evaluate_dataset(["classical"], [])


def test_bad_models_and_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _write_dataset(tmp_path / "ds")
    with pytest.raises(ModelError, match="not found"):
        ev.evaluate_dataset([tmp_path / "no_model"], [root])
    with pytest.raises(InputError, match="given twice"):
        ev.evaluate_dataset(["classical", "classical"], [root])
    with pytest.raises(InputError, match="pixel size"):
        ev.evaluate_dataset(["classical"], [root], pixel_size=-1.0)
    with pytest.raises(InputError, match=r"unknown stage .S99."):
        ev.evaluate_dataset(["classical"], [root], stage="S99")
    base = ["evaluate", "--data", str(root)]
    assert main([*base, "--model", str(tmp_path / "no_model")]) == 2
    assert "no_model" in caplog.text
    assert main([*base, "--model", "classical", "--iou", "0.5:x"]) == 2
    out = tmp_path / "x.json"
    assert main([*base, "--model", "classical", "--out", str(out), "--csv", str(out)]) == 2
    assert not out.exists()


# -- end to end with real segmenters --------------------------------------------------------------
def test_cli_end_to_end_two_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from islet_imaging.segment import segment_field
    from islet_imaging.synth import write_dataset

    root = tmp_path / "synth"
    (name,) = write_dataset(root, "S6", n=1, seed=5, size=96)
    out = tmp_path / "eval.json"
    argv = [
        "evaluate",
        "--model",
        "classical",
        "--model",
        "default",
        "--data",
        str(root),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "default − classical" in printed
    assert "matched objects away from the edge: bias" in printed
    d = json.loads(out.read_text())
    assert [m["name"] for m in d["models"]] == ["classical", "default"]
    assert len(d["per_image"]) == 4  # 1 image × 2 models × 2 kinds
    truth = read_labels(root / "labels" / f"{name}_nuclei.tif")
    n_true = int(np.unique(truth[truth > 0]).size)
    for model in ("classical", "default"):
        s = d["pooled"][model]["nuclei"]
        assert s["n_true"] == n_true
        for t in d["iou_thresholds"]:
            k = f"{t:g}"
            assert s[f"tp@{k}"] + s[f"fn@{k}"] == n_true
            assert s[f"ap@{k}"] == pytest.approx(
                s[f"tp@{k}"] / (s[f"tp@{k}"] + s[f"fp@{k}"] + s[f"fn@{k}"])
            )
    # the numbers are those of segmenting the field directly and matching it to the truth
    fld = read_field(root / "images" / f"{name}.ome.tif")
    lab = segment_field(fld, stage="S6", model="classical")
    direct = ev.score_pairs([(truth, lab.nuclei)])
    direct |= {f"{k}@0.5": v for k, v in error_kinds(truth, lab.nuclei, threshold=0.5).items()}
    sizes = diameter_errors(truth, lab.nuclei)
    direct |= {
        "n_sized": sizes.size,
        "diameter_bias": float(sizes.mean()),
        "diameter_error": float(np.abs(sizes).mean()),
    }
    assert sizes.size > 10
    assert d["pooled"]["classical"]["nuclei"] == pytest.approx(direct)
    kinds = d["pooled"]["default"]["nuclei"]
    assert sum(v for k, v in kinds.items() if k.startswith("fn_")) == kinds["fn@0.5"]
    assert sum(v for k, v in kinds.items() if k.startswith("fp_")) == kinds["fp@0.5"]
    assert direct["ap@0.5"] > 0.6  # the classical baseline does well on clean synthetic nuclei


def test_images_without_pixel_size(tmp_path: Path) -> None:
    """The classical baseline needs a nucleus diameter there: estimated from the image, or given."""
    from islet_imaging.synth import write_dataset

    src = tmp_path / "src"
    (name,) = write_dataset(src, "S1", n=1, seed=2, size=96)
    root = tmp_path / "nopx"
    (root / "images").mkdir(parents=True)
    (src / "labels").rename(root / "labels")
    f = read_field(src / "images" / f"{name}.ome.tif")
    write_ome_tiff(root / "images" / f"{name}.ome.tif", Field(f.data, f.channel_names, None))
    estimated = ev.evaluate_dataset(["classical"], [root], stage="S1", thresholds=0.5)
    assert not estimated.failures
    assert estimated.pooled()["classical"]["nuclei"]["ap@0.5"] > 0.5
    given = ev.evaluate_dataset(
        ["classical"], [root], stage="S1", thresholds=0.5, nucleus_diameter=3.0
    )
    # a 3 px "nucleus" splits the real ones: the diameter reaches the segmenter
    assert (
        given.pooled()["classical"]["nuclei"]["n_pred"]
        != (estimated.pooled()["classical"]["nuclei"]["n_pred"])
    )
