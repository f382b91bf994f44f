"""Plate-style names, plate maps and image discovery."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from islet_imaging.errors import InputError, StageError
from islet_imaging.io import PlateMap, discover_images, parse_plate_name, read_plate_map
from islet_imaging.io._plate import normalize_well


@pytest.mark.parametrize(
    ("name", "well", "field"),
    [
        ("B03_f1.ome.tif", "B03", 1),
        ("B3_f02.ome.tiff", "B03", 2),
        ("plate7/H12-f10.tif", "H12", 10),
        ("A01_fld3.png", "A01", 3),
        ("exp1_C05_s4_w1.tif", "C05", 4),
        ("r02c11f03p01-ch1sk1fk1fl1.tiff", "B11", 3),
        ("plate1_D07.tif", "D07", None),
        ("overview.tif", None, None),
        ("Z99_f1.tif", None, None),  # not a plate row
    ],
)
def test_parse_plate_name(name: str, well: str | None, field: int | None) -> None:
    assert parse_plate_name(name) == (well, field)
    assert parse_plate_name(Path(name)).well == well


def test_normalize_well() -> None:
    assert normalize_well("b3") == "B03"
    assert normalize_well(" H012 ") == "H12"
    with pytest.raises(InputError, match="not a well name"):
        normalize_well("3B")


def write_map(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "plate_map.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_read_plate_map(tmp_path: Path) -> None:
    p = write_map(
        tmp_path,
        "well,stage,condition,seeded_cells,control,well_area_mm2,donor\n"
        "B3,S6,ctrl,50000,negative:INS,32,d1\n"
        "B04,sc-islet,drug,5e4,,32,d2\n"
        "C01,DE,,,,,\n",
    )
    pm = read_plate_map(p)
    assert isinstance(pm, PlateMap) and len(pm) == 3 and pm.path == p
    assert "b03" in pm and "B05" not in pm
    b3 = pm.get("B03")
    assert b3 is not None
    assert b3.stage == "sc-islet" and b3.seeded_cells == 50000 and b3.well_area_mm2 == 32
    assert b3.is_negative_control("INS") and not b3.is_negative_control("GCG")
    assert b3.extra == {"donor": "d1"}
    assert pm.stage_of("C01") == "definitive-endoderm"
    assert pm.get("C01").seeded_cells is None  # type: ignore[union-attr]
    assert pm.negative_controls("INS") == ("B03",)
    assert list(pm.to_frame()["well"]) == ["B03", "B04", "C01"]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("B03,S6,x,-5,", r"row 2, column 'seeded_cells'.*non-negative"),
        ("B03,S6,x,lots,", r"row 2, column 'seeded_cells'.*not a number"),
        ("B03,S6,x,nan,", r"row 2, column 'seeded_cells'"),
        ("X,S6,x,5,", r"row 2, column 'well'"),
        ("B03,,x,5,", r"row 2, column 'stage'"),
        ("B03,S6,x,5,negative:PDX1", r"row 2, column 'control'.*PDX1"),
        ("B03,S6,x,5,INS", r"row 2, column 'control'"),
    ],
)
def test_bad_plate_map_rows(tmp_path: Path, row: str, match: str) -> None:
    p = write_map(tmp_path, f"well,stage,condition,seeded_cells,control\n{row}\n")
    with pytest.raises(InputError, match=match) as info:
        read_plate_map(p)
    assert str(p) in str(info.value)


def test_unknown_stage_is_a_stage_error(tmp_path: Path) -> None:
    p = write_map(tmp_path, "well,stage,condition,seeded_cells,control\nB03,S9,,,\n")
    with pytest.raises(StageError, match=r"row 2.*unknown stage 'S9'"):
        read_plate_map(p)


def test_bad_plate_map_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_plate_map(tmp_path / "missing.csv")
    p = write_map(tmp_path, "well,condition\nB03,x\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['stage'\]"):
        read_plate_map(p)
    p = write_map(tmp_path, "well,stage\nB03,S6\nb3,S6\n")
    with pytest.raises(InputError, match="row 3: well B03 is listed twice"):
        read_plate_map(p)
    p = write_map(tmp_path, "well,stage,well_area_mm2\nB03,S6,0\n")
    with pytest.raises(InputError, match=r"well_area_mm2.*positive"):
        read_plate_map(p)
    p = write_map(tmp_path, "well,stage\n")
    with pytest.raises(InputError, match="no wells"):
        read_plate_map(p)


def test_check_wells_warns_and_returns_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = write_map(tmp_path, "well,stage\nB03,S6\nB04,S6\n")
    pm = read_plate_map(p)
    with caplog.at_level(logging.WARNING):
        unknown = pm.check_wells(["B03", "C07", None])
    assert unknown == ("C07",)
    assert any("B04" in r.message for r in caplog.records)


def test_discover_images_in_plate_order(tmp_path: Path) -> None:
    for name in (
        "B10_f1.ome.tif",
        "B2_f2.ome.tif",
        "B02_f1.ome.tif",
        "A12_f1.tif",
        "notes.txt",
        "zz.png",
        ".hidden.tif",
    ):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "A01_f1_nuclei.tif").write_bytes(b"")
    found = [p.name for p in discover_images(tmp_path)]
    assert found == ["A12_f1.tif", "B02_f1.ome.tif", "B2_f2.ome.tif", "B10_f1.ome.tif", "zz.png"]
    assert discover_images(tmp_path / "zz.png") == [tmp_path / "zz.png"]
    assert [p.name for p in discover_images(tmp_path, recursive=True)] == found  # labels/ skipped
    with pytest.raises(InputError, match="not an image"):
        discover_images(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        discover_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        discover_images(tmp_path / "empty")
