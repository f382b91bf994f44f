"""Readers, writers and the ``info`` command of islet_imaging.io."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from islet_imaging.cli import main
from islet_imaging.errors import ImageReadError, InputError
from islet_imaging.io import (
    Field,
    Origin,
    PixelSize,
    as_czyx,
    discover_images,
    parse_plate_name,
    read_field,
    read_fields,
    read_labels,
    write_labels,
    write_ome_tiff,
)

DSB_MASKS = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dsb2018_fluo" / "masks"
)


def _ramp(shape: tuple[int, ...], dtype: str = "uint16") -> np.ndarray:
    """Distinct values everywhere, so that any mix-up of axes shows."""
    return np.arange(math.prod(shape), dtype=np.int64).reshape(shape).astype(dtype)


_PS = PixelSize(0.5, 0.5)


def _field(
    shape: tuple[int, ...] = (2, 1, 6, 7),
    names: tuple[str, ...] = ("DAPI", "INS"),
    ps: PixelSize | None = _PS,
    dtype: str = "uint16",
    **origin: object,
) -> Field:
    """A field with distinct pixel values; ``origin`` goes to :class:`Origin`."""
    return Field(_ramp(shape, dtype), names, ps, Origin(**origin))


# -- as_czyx ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("axes", "shape"),
    [
        ("YX", (4, 5)),
        ("XY", (5, 4)),
        ("CYX", (3, 4, 5)),
        ("YXC", (4, 5, 3)),
        ("ZCYX", (2, 3, 4, 5)),
        ("CZYX", (3, 2, 4, 5)),
        ("XYZC", (5, 4, 2, 3)),
        ("TZCYXS", (1, 2, 3, 4, 5, 1)),
        ("QYX", (1, 4, 5)),
        ("YXS", (4, 5, 3)),
        ("zcyx", (2, 3, 4, 5)),
    ],
)
def test_as_czyx_moves_every_value_to_its_place(axes: str, shape: tuple[int, ...]) -> None:
    arr = _ramp(shape, "int64")
    out = as_czyx(arr, axes)
    sizes = dict(zip(axes.upper(), shape, strict=True))
    sizes["C"] = sizes.get("C", sizes.get("S", 1))
    assert out.shape == (sizes["C"], sizes.get("Z", 1), sizes["Y"], sizes["X"])
    for idx in np.ndindex(out.shape):
        pos = dict(zip("CZYX", idx, strict=True))
        pos.setdefault("S", pos["C"])
        src = tuple(
            pos.get(a, 0) if a != "S" or "C" not in axes.upper() else 0 for a in axes.upper()
        )
        assert out[idx] == arr[src]


def test_as_czyx_combines_channels_and_samples_channel_major() -> None:
    arr = _ramp((2, 4, 5, 3), "int64")  # C, Y, X, S
    out = as_czyx(arr, "CYXS")
    assert out.shape == (6, 1, 4, 5)
    assert out[4, 0, 2, 3] == arr[1, 2, 3, 1]  # channel 1, sample 1 → 1 * 3 + 1


@pytest.mark.parametrize(
    ("shape", "axes", "match"),
    [
        ((4, 5), "YW", "unknown axis letter"),
        ((4, 5, 3), "YYX", "repeated"),
        ((4, 5), "CYX", "name 3 axes but the array has 2"),
        ((5,), "X", "too few dimensions"),
        ((2, 4, 5), "TYX", "2 timepoints"),
        ((3, 4, 5), "QYX", "unknown meaning"),
    ],
)
def test_as_czyx_rejects_bad_axes(shape: tuple[int, ...], axes: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        as_czyx(np.zeros(shape), axes)


# -- OME-TIFF round trip ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "names", "ps", "dtype"),
    [
        ((1, 1, 6, 7), ("DAPI",), PixelSize(0.65, 0.65), "uint16"),
        ((2, 1, 6, 7), ("DAPI", "INS"), PixelSize(0.5, 0.4), "uint8"),
        ((3, 4, 6, 7), ("DAPI", "NKX6.1", "INS"), PixelSize(0.3, 0.3, 1.5), "uint16"),
        ((2, 3, 5, 4), ("DAPI", "GCG"), None, "float32"),
        ((1, 2, 5, 4), ("DAPI",), PixelSize(0.2, 0.2, 0.8), "int32"),
    ],
)
def test_ome_tiff_round_trip(tmp_path: Path, shape, names, ps, dtype) -> None:
    field = _field(shape, names, ps, dtype, stage="S6", plate="P7")
    out = write_ome_tiff(tmp_path / "sub" / "dir" / "A01_f3.ome.tif", field)
    assert out == tmp_path / "sub" / "dir" / "A01_f3.ome.tif"
    back = read_field(out)
    assert back.data.dtype == field.data.dtype
    np.testing.assert_array_equal(back.data, field.data)
    assert back.channel_names == names
    assert back.pixel_size == ps
    assert (back.origin.well, back.origin.field) == ("A01", 3)  # from the file name
    assert (back.origin.stage, back.origin.plate) == ("S6", "P7")  # from the OME map annotation
    assert back.origin.path == out
    assert back.metadata["format"] == "ome-tiff"


def test_ome_tiff_has_standard_metadata_for_other_viewers(tmp_path: Path) -> None:
    out = write_ome_tiff(tmp_path / "x.ome.tif", _field(ps=PixelSize(0.25, 0.25, 2.0)))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        xml = tif.ome_metadata
        assert 'PhysicalSizeX="0.25"' in xml and 'PhysicalSizeXUnit="µm"' in xml
        assert 'Name="DAPI"' in xml and 'Name="INS"' in xml
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        num, den = tif.pages[0].tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(0.25)


def test_origin_stored_in_file_beats_file_name_and_caller_beats_both(tmp_path: Path) -> None:
    field = _field(well="C04", field=2, stage="S4", plate="plate1")
    out = write_ome_tiff(tmp_path / "B03_f1.ome.tif", field)
    back = read_field(out)
    assert (back.origin.well, back.origin.field, back.origin.stage) == ("C04", 2, "S4")
    given = read_field(out, well="d5", field=9, stage="S7", plate="other")
    assert (given.origin.well, given.origin.field) == ("D05", 9)
    assert (given.origin.stage, given.origin.plate) == ("S7", "other")


@pytest.mark.parametrize(
    ("name", "well", "fld"),
    [("B3_f2.ome.tif", "B03", 2), ("H12_f10.tif", "H12", 10), ("image.tif", None, None)],
)
def test_well_and_field_parsed_from_plate_style_names(tmp_path: Path, name, well, fld) -> None:
    tifffile.imwrite(tmp_path / name, _ramp((4, 5)))
    back = read_field(tmp_path / name)
    assert (back.origin.well, back.origin.field) == (well, fld)


# -- OME-TIFF in other axis orders and units -------------------------------------------------
def test_ome_tiff_zcyx_with_nm_and_mm_units(tmp_path: Path) -> None:
    data = _ramp((3, 2, 4, 5))  # Z, C, Y, X
    path = tmp_path / "zcyx.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "ZCYX",
            "Channel": {"Name": ["DAPI", "INS"]},
            "PhysicalSizeX": 500,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 0.0005,
            "PhysicalSizeYUnit": "mm",
            "PhysicalSizeZ": 2.0,  # no unit: µm by the OME schema
        },
    )
    back = read_field(path)
    assert back.shape == (2, 3, 4, 5)
    assert back.channel_names == ("DAPI", "INS")
    assert back.pixel_size.x == pytest.approx(0.5)
    assert back.pixel_size.y == pytest.approx(0.5)
    assert back.pixel_size.z == pytest.approx(2.0)
    assert back.data[1, 2, 3, 4] == data[2, 1, 3, 4]
    assert back.data[0, 1, 0, 2] == data[1, 0, 0, 2]
    np.testing.assert_array_equal(back.channel("INS"), data[:, 1])


def test_ome_tiff_interleaved_rgb_becomes_channels(tmp_path: Path) -> None:
    data = _ramp((4, 5, 3), "uint8")  # Y, X, samples
    path = tmp_path / "yxc.ome.tif"
    tifffile.imwrite(path, data, ome=True, photometric="rgb", metadata={"axes": "YXS"})
    back = read_field(path, channel_names=["DAPI", "GCG", "INS"], pixel_size=0.3)
    assert back.shape == (3, 1, 4, 5)
    assert back.data[2, 0, 1, 3] == data[1, 3, 2]
    assert back.data[0, 0, 3, 4] == data[3, 4, 0]
    assert back.pixel_size == PixelSize(0.3, 0.3)


def test_time_series_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.ome.tif"
    tifffile.imwrite(path, _ramp((2, 3, 4, 5)), ome=True, metadata={"axes": "TCYX"})
    with pytest.raises(ImageReadError, match=r"2 timepoints.*each timepoint"):
        read_field(path)


# -- ImageJ hyperstacks ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("unit", "factor"), [("um", 1.0), ("micron", 1.0), ("\\u00B5m", 1.0), ("nm", 1e-3), ("mm", 1e3)]
)
def test_imagej_hyperstack_reordered_with_scale(tmp_path: Path, unit: str, factor: float) -> None:
    data = _ramp((1, 3, 2, 4, 5))  # T, Z, C, Y, X
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.4),  # pixels per unit in x, y
        metadata={"axes": "TZCYX", "spacing": 1.5, "unit": unit, "Labels": ["DAPI", "PDX1"] * 3},
    )
    back = read_field(path)
    assert back.metadata["format"] == "imagej"
    assert back.shape == (2, 3, 4, 5)
    assert back.channel_names == ("DAPI", "PDX1")
    assert back.pixel_size.x == pytest.approx(0.25 * factor)
    assert back.pixel_size.y == pytest.approx(0.4 * factor)
    assert back.pixel_size.z == pytest.approx(1.5 * factor)
    assert back.data[1, 2, 3, 4] == data[0, 2, 1, 3, 4]
    assert back.data[0, 1, 2, 0] == data[0, 1, 0, 2, 0]


def test_imagej_without_labels_or_unit(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, _ramp((2, 4, 5)), imagej=True, metadata={"axes": "CYX"})
    back = read_field(path)
    assert back.channel_names == ("C0", "C1")
    assert back.pixel_size is None
    named = read_field(path, channel_names="DAPI|SOX17", pixel_size=(0.4, 0.3))
    assert named.channel_names == ("DAPI", "SOX17")
    assert named.pixel_size == PixelSize(x=0.3, y=0.4)


# -- PNG and plain TIFF ----------------------------------------------------------------------
def test_png_gray(tmp_path: Path) -> None:
    data = _ramp((6, 7), "uint8")
    iio.imwrite(tmp_path / "g.png", data)
    back = read_field(tmp_path / "g.png", channel_names=["DAPI"], pixel_size=0.65)
    assert back.shape == (1, 1, 6, 7)
    np.testing.assert_array_equal(back.data[0, 0], data)
    assert back.channel_names == ("DAPI",)
    assert back.pixel_size == PixelSize(0.65, 0.65)
    default = read_field(tmp_path / "g.png")
    assert default.channel_names == ("C0",)
    assert default.pixel_size is None


@pytest.mark.parametrize(
    ("samples", "alpha", "n_channels"), [(3, None, 3), (4, 255, 3), (4, 100, 4)]
)
def test_png_rgb_and_rgba(tmp_path: Path, samples: int, alpha: int | None, n_channels: int) -> None:
    data = _ramp((6, 7, samples), "uint8")
    if alpha is not None:
        data[..., 3] = alpha
    iio.imwrite(tmp_path / "c.png", data)
    back = read_field(tmp_path / "c.png")
    assert back.shape == (n_channels, 1, 6, 7)
    for c in range(n_channels):
        np.testing.assert_array_equal(back.data[c, 0], data[..., c])
    assert back.channel_names == tuple(f"C{i}" for i in range(n_channels))


def test_png_16_bit(tmp_path: Path) -> None:
    data = (_ramp((6, 7)) * 1000).astype(np.uint16)
    iio.imwrite(tmp_path / "g16.png", data)
    back = read_field(tmp_path / "g16.png")
    assert back.data.dtype == np.uint16
    np.testing.assert_array_equal(back.data[0, 0], data)


def test_plain_tiff_with_given_names_and_pixel_size(tmp_path: Path) -> None:
    data = _ramp((6, 7))
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, data)
    back = read_field(path, channel_names=["DAPI"], pixel_size=PixelSize(0.3, 0.3, 1.0))
    np.testing.assert_array_equal(back.data[0, 0], data)
    assert back.pixel_size == PixelSize(0.3, 0.3, 1.0)
    assert back.metadata["format"] == "tiff"


def test_plain_tiff_metric_resolution_tags_give_pixel_size(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "cm.tif",
        _ramp((4, 5)),
        resolution=(1e4 / 0.8, 1e4 / 0.8),
        resolutionunit="CENTIMETER",
    )
    tifffile.imwrite(
        tmp_path / "dpi.tif", _ramp((4, 5)), resolution=(72, 72), resolutionunit="INCH"
    )
    assert read_field(tmp_path / "cm.tif").pixel_size == PixelSize(0.8, 0.8)
    assert read_field(tmp_path / "dpi.tif").pixel_size is None


def test_plain_3d_tiff_rule_and_axes_hint(tmp_path: Path) -> None:
    data = _ramp((3, 4, 5))
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tif:  # three plain pages, no shape metadata
        for plane in data:
            tif.write(plane, metadata=None)
    as_z = read_field(path)
    assert as_z.shape == (1, 3, 4, 5)  # unknown axis → Z
    as_c = read_field(path, channel_names=["DAPI", "INS", "GCG"])
    assert as_c.shape == (3, 1, 4, 5)  # as many names as planes → channels
    assert as_c.data[2, 0, 1, 1] == data[2, 1, 1]
    hinted = read_field(path, axes="CYX")
    assert hinted.shape == (3, 1, 4, 5)
    with pytest.raises(ImageReadError, match="axes='ZYXC' names 4 axes but the image has 3"):
        read_field(path, axes="ZYXC")


def test_shaped_tiff_with_axes_metadata(tmp_path: Path) -> None:
    data = _ramp((4, 5, 2))
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack", metadata={"axes": "YXC"})
    back = read_field(tmp_path / "s.tif")
    assert back.shape == (2, 1, 4, 5)
    assert back.data[1, 0, 3, 2] == data[3, 2, 1]


# -- multi-series ----------------------------------------------------------------------------
def test_multi_series_ome_tiff(tmp_path: Path) -> None:
    path = tmp_path / "A02_f1.ome.tif"
    first, second = _ramp((2, 4, 5)), _ramp((2, 3, 6)) + 1000
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            first,
            metadata={
                "axes": "CYX",
                "Channel": {"Name": ["DAPI", "INS"]},
                "PhysicalSizeX": 0.3,
                "PhysicalSizeY": 0.3,
            },
        )
        tif.write(
            second,
            metadata={
                "axes": "CYX",
                "Channel": {"Name": ["DAPI", "GCG"]},
                "PhysicalSizeX": 0.6,
                "PhysicalSizeY": 0.6,
            },
        )
    one = read_field(path, series=1)
    np.testing.assert_array_equal(one.data[:, 0], second)
    assert one.channel_names == ("DAPI", "GCG")
    assert one.pixel_size == PixelSize(0.6, 0.6)
    assert one.origin.series == 1 and one.name == "A02_f1_s1"
    every = read_fields(path)
    assert [f.channel_names for f in every] == [("DAPI", "INS"), ("DAPI", "GCG")]
    np.testing.assert_array_equal(every[0].data[:, 0], first)
    assert [f.origin.series for f in every] == [0, 1]
    with pytest.raises(InputError, match=r"series=2 does not exist; the file has 2"):
        read_field(path, series=2)


def test_multi_series_plain_tiff(tmp_path: Path) -> None:
    path = tmp_path / "m.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_ramp((4, 5)))
        tif.write(_ramp((6, 7)) + 7)
    fields = read_fields(path, channel_names=["DAPI"], pixel_size=0.5)
    assert [f.shape for f in fields] == [(1, 1, 4, 5), (1, 1, 6, 7)]
    assert fields[1].data[0, 0, 0, 0] == 7
    assert all(f.pixel_size == PixelSize(0.5, 0.5) for f in fields)


def test_single_image_read_fields(tmp_path: Path) -> None:
    out = write_ome_tiff(tmp_path / "x.ome.tif", _field())
    fields = read_fields(out)
    assert len(fields) == 1 and fields[0].origin.series is None


# -- OME-Zarr --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_image(tmp_path: Path, version: str) -> None:
    zarr = pytest.importorskip("zarr")
    data = _ramp((2, 3, 4, 5))  # c, z, y, x
    path = tmp_path / "img.ome.zarr"
    multiscales = [
        {
            "version": version,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "z", "type": "space", "unit": "micrometer"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "nanometer"},
            ],
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 0.5, 500]}],
                }
            ],
        }
    ]
    omero = {"channels": [{"label": "DAPI"}, {"label": "INS"}]}
    if version == "0.4":
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        group.attrs.update({"multiscales": multiscales, "omero": omero})
    else:
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        for m in multiscales:
            m.pop("version")
        group.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales, "omero": omero}})
    group.create_array("0", data=data)
    back = read_field(path)
    np.testing.assert_array_equal(back.data, data)
    assert back.channel_names == ("DAPI", "INS")
    assert back.pixel_size == PixelSize(0.5, 0.5, 2.0)
    assert back.metadata["format"] == "ome-zarr"


# -- bad input -------------------------------------------------------------------------------
def _write_truncated(path: Path, compression: str | None) -> Path:
    full = path.with_name("full_" + path.name)
    data = np.random.default_rng(0).integers(0, 4000, (2, 3, 32, 40)).astype(np.uint16)
    tifffile.imwrite(full, data, ome=True, compression=compression, metadata={"axes": "CZYX"})
    raw = full.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff(tmp_path: Path, compression: str | None) -> None:
    path = _write_truncated(tmp_path / "cut.ome.tif", compression)
    with pytest.raises(ImageReadError, match=r"cut\.ome\.tif.*(truncated|damaged)"):
        read_field(path)


@pytest.mark.parametrize("name", ["junk.tif", "junk.ome.tif", "junk.png"])
def test_corrupt_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(600))
    with pytest.raises(ImageReadError, match=rf"{name}: not a readable (TIFF|PNG)"):
        read_field(path)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing.tif", r"missing\.tif: file not found"),
        (lambda p: p / "nofolder" / "x.tif", "folder .* does not exist either"),
        (lambda p: p, "is a folder, not an image file"),
        (lambda p: _touch(p / "img.jpg", b"\xff\xd8"), r"img\.jpg: unsupported file type '\.jpg'"),
        (lambda p: _touch(p / "noext", b"x"), "unsupported file type"),
        (lambda p: _touch(p / "empty.tif", b""), r"empty\.tif: file is empty"),
    ],
)
def test_bad_paths(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(ImageReadError, match=match):
        read_field(make(tmp_path))


def _touch(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.filterwarnings("ignore:.*zero-size array")
def test_image_with_no_pixels(tmp_path: Path) -> None:
    path = tmp_path / "zero.tif"
    tifffile.imwrite(path, np.zeros((3, 0, 5), np.uint8))
    with pytest.raises(ImageReadError, match=r"zero\.tif: image has no pixels"):
        read_field(path)


def test_one_dimensional_data(tmp_path: Path) -> None:
    path = tmp_path / "line.tif"
    tifffile.imwrite(path, np.arange(5, dtype=np.uint8))
    with pytest.raises(ImageReadError, match=r"line\.tif: .*too few dimensions"):
        read_field(path)


@pytest.mark.parametrize(("value", "count"), [(np.nan, 2), (np.inf, 1), (-np.inf, 3)])
def test_non_finite_pixels(tmp_path: Path, value: float, count: int) -> None:
    data = np.ones((2, 4, 5), np.float32)
    data.reshape(-1)[:count] = value
    path = tmp_path / "nan.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    with pytest.raises(
        ImageReadError, match=rf"nan\.ome\.tif: {count} of 40 pixels are NaN or infinite"
    ):
        read_field(path)


def test_wrong_number_of_channel_names(tmp_path: Path) -> None:
    out = write_ome_tiff(tmp_path / "two.ome.tif", _field())
    with pytest.raises(InputError, match=r"two\.ome\.tif: 3 channel names .* has 2 channel"):
        read_field(out, channel_names=["DAPI", "INS", "GCG"])


def test_missing_channel_in_read_field(tmp_path: Path) -> None:
    back = read_field(write_ome_tiff(tmp_path / "two.ome.tif", _field()))
    with pytest.raises(
        InputError, match=r"two\.ome\.tif: channel 'PDX1' is not in this image.*'DAPI', 'INS'"
    ):
        back.channel("PDX1")
    assert back.channel("ins").shape == (1, 6, 7)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), (0.5, float("inf")), "abc", (1, 2, 3, 4)])
def test_bad_pixel_size_given(tmp_path: Path, bad) -> None:
    out = write_ome_tiff(tmp_path / "f.ome.tif", _field())
    with pytest.raises(InputError, match=r"f\.ome\.tif: .*pixel"):
        read_field(out, pixel_size=bad)


def test_z_step_given(tmp_path: Path) -> None:
    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, _ramp((3, 6, 7)), imagej=True, metadata={"axes": "ZYX"})
    assert read_field(stack, pixel_size=0.5).pixel_size == PixelSize(0.5, 0.5, None)
    back = read_field(stack, pixel_size=0.5, z_step=2.0)
    assert back.pixel_size == PixelSize(0.5, 0.5, 2.0)
    # the file's lateral pixel size is kept
    out = write_ome_tiff(tmp_path / "f.ome.tif", _field(shape=(2, 3, 6, 7), ps=PixelSize(0.4, 0.4)))
    assert read_field(out, z_step=1.5).pixel_size == PixelSize(0.4, 0.4, 1.5)
    # a single plane has no z step to set
    flat = write_ome_tiff(tmp_path / "p.ome.tif", _field(ps=PixelSize(0.4, 0.4)))
    assert read_field(flat, z_step=1.5).pixel_size == PixelSize(0.4, 0.4, None)
    with pytest.raises(InputError, match=r"s\.tif: a z step needs the lateral pixel size"):
        read_field(stack, z_step=2.0)
    for bad in (0.0, -1.0, float("nan"), "abc"):
        with pytest.raises(InputError, match=r"s\.tif: z step .* must be a positive number"):
            read_field(stack, pixel_size=0.5, z_step=bad)  # type: ignore[arg-type]


def test_absent_pixel_size_where_required(tmp_path: Path) -> None:
    out = write_ome_tiff(tmp_path / "nops.ome.tif", _field(ps=None))
    back = read_field(out)
    assert back.pixel_size is None
    with pytest.raises(InputError, match=r"nops\.ome\.tif: this image has no pixel size"):
        back.require_pixel_size()


def test_bad_well_given(tmp_path: Path) -> None:
    out = write_ome_tiff(tmp_path / "f.ome.tif", _field())
    with pytest.raises(InputError, match=r"f\.ome\.tif: 'well 3' is not a well name"):
        read_field(out, well="well 3")


# -- writers: safety -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "labels"])
def test_writers_refuse_to_overwrite(tmp_path: Path, kind: str) -> None:
    def write(path: Path, **kw) -> Path:
        if kind == "image":
            return write_ome_tiff(path, _field(), **kw)
        return write_labels(path, np.ones((6, 7), np.int32), **kw)

    path = tmp_path / "x.tif"
    path.write_bytes(b"precious")
    with pytest.raises(InputError, match=r"x\.tif: file already exists.*overwrite=True"):
        write(path)
    assert path.read_bytes() == b"precious"
    write(path, overwrite=True)
    assert path.read_bytes() != b"precious"
    assert sorted(os.listdir(tmp_path)) == ["x.tif"]  # no temporary file left behind


def test_writer_never_writes_over_its_input(tmp_path: Path) -> None:
    src = write_ome_tiff(tmp_path / "in.ome.tif", _field())
    field = read_field(src)
    before = src.read_bytes()
    with pytest.raises(InputError, match="refusing to write over the input image"):
        write_ome_tiff(src, field, overwrite=True)
    with pytest.raises(InputError, match="refusing to write over the input image"):
        write_labels(src, np.zeros((1, 6, 7), np.int32), like=field, overwrite=True)
    assert src.read_bytes() == before


def test_writer_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="output path is a folder"):
        write_ome_tiff(tmp_path, _field(), overwrite=True)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        Path(args[0]).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(InputError, match="cannot write the file: disk full"):
        write_ome_tiff(tmp_path / "x.ome.tif", _field())
    assert os.listdir(tmp_path) == []


def test_write_is_atomic_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = os.replace

    def spy(src, dst):
        calls.append((str(src), str(dst)))
        assert Path(src).parent == Path(dst).parent  # same folder: a rename, not a copy
        assert Path(src).stat().st_size > 0
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    out = write_ome_tiff(tmp_path / "a.ome.tif", _field())
    assert calls and calls[0][1] == str(out)
    assert os.listdir(tmp_path) == ["a.ome.tif"]


def test_write_ome_tiff_narrows_int64_and_rejects_non_field(tmp_path: Path) -> None:
    field = Field(_ramp((1, 1, 4, 5), "int64"), ("DAPI",))
    back = read_field(write_ome_tiff(tmp_path / "i.ome.tif", field))
    assert back.data.dtype == np.uint16
    np.testing.assert_array_equal(back.data, field.data)
    with pytest.raises(InputError, match="expects a Field"):
        write_ome_tiff(tmp_path / "j.ome.tif", np.zeros((1, 1, 4, 5)))  # type: ignore[arg-type]


# -- labels ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "high", "dtype"),
    [((6, 7), 5, np.uint16), ((2, 6, 7), 65535, np.uint16), ((2, 6, 7), 70000, np.uint32)],
)
def test_labels_round_trip(tmp_path: Path, shape, high: int, dtype) -> None:
    labels = np.zeros(shape, np.int64)
    labels.reshape(-1)[3] = high
    labels.reshape(-1)[5] = 1
    like = _field(
        (2, *((1, *shape) if len(shape) == 2 else shape)),
        ps=PixelSize(0.4, 0.4, 2.0),
        well="B02",
        field=4,
    )
    out = write_labels(tmp_path / "labels" / "x_nuclei.tif", labels, like=like, name="nuclei")
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].dtype == dtype
    back = read_labels(out)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels.reshape(like.spatial_shape))
    as_field = read_field(out)
    assert as_field.channel_names == ("nuclei",)
    assert as_field.pixel_size == PixelSize(0.4, 0.4, 2.0)
    assert (as_field.origin.well, as_field.origin.field) == ("B02", 4)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.ones((6, 7), bool), "boolean"),
        (np.full((6, 7), 0.5), "must be integers"),
        (np.full((6, 7), -1), "negative"),
        (np.full((6, 7), 2**31), "does not fit in int32"),
        (np.ones((2, 2, 6, 7), np.int32), r"\(Z, Y, X\) or \(Y, X\)"),
        (np.ones((3, 6, 7), np.int32), r"do not match the image grid \(1, 6, 7\)"),
    ],
)
def test_write_labels_rejects(tmp_path: Path, labels: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        write_labels(tmp_path / "l.tif", labels, like=_field())
    assert not (tmp_path / "l.tif").exists()


def test_read_labels_plain_png_and_tiff(tmp_path: Path) -> None:
    labels = np.zeros((6, 7), np.uint8)
    labels[1:3, 1:3] = 1
    labels[4:, 4:] = 2
    iio.imwrite(tmp_path / "m.png", labels)
    tifffile.imwrite(tmp_path / "m.tif", labels.astype(np.uint16))
    tifffile.imwrite(tmp_path / "f.tif", labels.astype(np.float32))
    for name in ("m.png", "m.tif", "f.tif"):
        back = read_labels(tmp_path / name)
        assert back.shape == (1, 6, 7) and back.dtype == np.int32
        np.testing.assert_array_equal(back[0], labels)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.full((4, 5), 0.5, np.float32), "non-integer values"),
        (np.full((4, 5), np.nan, np.float32), "20 NaN or infinite"),
        (np.full((4, 5), -3, np.int16), "negative"),
        (np.ones((2, 4, 5), np.uint16), None),  # a plain stack: read as Z
    ],
)
def test_read_labels_rejects_non_labels(
    tmp_path: Path, data: np.ndarray, match: str | None
) -> None:
    tifffile.imwrite(tmp_path / "l.tif", data)
    if match is None:
        assert read_labels(tmp_path / "l.tif").shape == (2, 4, 5)
        return
    with pytest.raises(ImageReadError, match=rf"l\.tif: .*{match}"):
        read_labels(tmp_path / "l.tif")


def test_read_labels_rejects_multichannel(tmp_path: Path) -> None:
    iio.imwrite(tmp_path / "rgb.png", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ImageReadError, match="3 colour channels"):
        read_labels(tmp_path / "rgb.png")
    write_ome_tiff(tmp_path / "two.ome.tif", _field())
    with pytest.raises(ImageReadError, match="has 2 channels"):
        read_labels(tmp_path / "two.ome.tif")


@pytest.mark.skipif(not DSB_MASKS.is_dir(), reason="needs ../shared/data/dsb2018_fluo")
def test_read_labels_dsb_mask() -> None:
    mask = sorted(DSB_MASKS.glob("*.tif"))[0]
    labels = read_labels(mask)
    assert labels.dtype == np.int32 and labels.ndim == 3 and labels.shape[0] == 1
    assert labels.max() > 1 and labels.min() == 0


# -- CLI -------------------------------------------------------------------------------------
def test_cli_info_file_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plate = tmp_path / "plate"
    for well, fld in [("B03", 1), ("B03", 2), ("C01", 1)]:
        write_ome_tiff(
            plate / f"{well}_f{fld}.ome.tif", _field(ps=PixelSize(0.65, 0.65), stage="S6")
        )
    (plate / "broken.tif").write_bytes(b"not a tiff at all")
    assert main(["info", str(plate / "B03_f1.ome.tif")]) == 0
    out = capsys.readouterr().out
    assert "B03_f1.ome.tif" in out
    assert "shape (C, Z, Y, X): (2, 1, 6, 7)  dtype: uint16" in out
    assert "channels: DAPI, INS" in out
    assert "pixel size (µm): x=0.65 y=0.65 z=-" in out
    assert "well=B03 field=1 stage=S6" in out

    assert main(["info", str(plate)]) == 2  # one unreadable file
    out = capsys.readouterr().out
    assert "broken.tif\n  ERROR: not a readable TIFF" in out
    assert "4 image file(s), 3 read, 1 unreadable" in out
    assert "images per well: B03: 2, C01: 1" in out


def test_cli_info_bad_input_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "missing.tif")]) == 2
    iio.imwrite(tmp_path / "g.png", np.zeros((4, 5), np.uint8))
    assert (
        main(["info", str(tmp_path / "g.png"), "--channel-names", "DAPI", "--pixel-size", "0.5"])
        == 0
    )
    out = capsys.readouterr().out
    assert "channels: DAPI" in out and "x=0.5 y=0.5" in out
    # several files: a bad one is reported and the others are still described
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    assert main(["info", str(bad), str(tmp_path / "g.png")]) == 2
    out = capsys.readouterr().out
    assert "bad.tif\n  ERROR: not a readable TIFF" in out and "g.png" in out


def test_ome_zarr_without_units_has_no_pixel_size(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    path = tmp_path / "nounit.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    scale = [{"type": "scale", "scale": [1.0, 1.0]}]
    ms = {
        "version": "0.4",
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": scale}],
    }
    group.attrs.update({"multiscales": [ms]})
    group.create_array("0", data=_ramp((4, 5)))
    back = read_field(path)
    assert back.shape == (1, 1, 4, 5) and back.pixel_size is None
    assert back.channel_names == ("C0",)


def write_hcs_plate(path: Path, fields: dict[str, list[Field]], version: str = "0.5") -> Path:
    """An OME-Zarr HCS plate written by ome-zarr: ``fields[well]`` are the well's images."""
    zarr = pytest.importorskip("zarr")
    ome_writer = pytest.importorskip("ome_zarr.writer")
    from ome_zarr.format import FormatV04, FormatV05

    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    rows = sorted({w[0] for w in fields})
    cols = sorted({str(int(w[1:])) for w in fields}, key=int)
    wells = [f"{w[0]}/{int(w[1:])}" for w in fields]
    ome_writer.write_plate_metadata(root, rows, cols, wells, fmt=fmt, name=path.stem)
    for well, flds in fields.items():
        group = root.require_group(well[0]).require_group(str(int(well[1:])))
        ome_writer.write_well_metadata(group, [str(i) for i in range(len(flds))], fmt=fmt)
        for i, f in enumerate(flds):
            img = group.require_group(str(i))
            assert f.pixel_size is not None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # no scale for the channel axis: 1 (expected)
                ome_writer.write_image(
                    f.data,
                    img,
                    axes="czyx",
                    fmt=fmt,
                    scale_factors=[],
                    scale={"z": f.pixel_size.z or 1.0, "y": f.pixel_size.y, "x": f.pixel_size.x},
                    axes_units={a: "micrometer" for a in "zyx"},
                )
            omero = {"channels": [{"label": n} for n in f.channel_names]}
            if version == "0.5":
                img.attrs.update({"ome": {**img.attrs["ome"], "omero": omero}})
            else:
                img.attrs.update({"omero": omero})
    return path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_hcs_plate(
    tmp_path: Path, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = (
        Field(_ramp((2, 3, 6, 7)) + 1000 * i, ("DAPI", "INS"), PixelSize(0.5, 0.5, 2.0))
        for i in range(3)
    )
    plate = write_hcs_plate(tmp_path / "P7.ome.zarr", {"C05": [a], "B03": [b, c]}, version)
    images = discover_images(plate)  # every field image, in plate order
    assert [p.relative_to(plate).as_posix() for p in images] == ["B/3/0", "B/3/1", "C/5/0"]
    assert discover_images(plate / "B" / "3") == images[:2]  # a well: its fields
    back = read_field(images[1])
    assert (back.origin.plate, back.origin.well, back.origin.field, back.name) == (
        "P7",
        "B03",
        2,
        "B03_f2",
    )
    assert back.channel_names == ("DAPI", "INS") and back.pixel_size == PixelSize(0.5, 0.5, 2.0)
    np.testing.assert_array_equal(back.data, c.data)
    assert parse_plate_name(images[2]) == ("C05", 1)
    with pytest.raises(ImageReadError, match=r"P7\.ome\.zarr: this OME-Zarr is an HCS plate"):
        read_field(plate)  # one image is asked for: the plate is many
    assert main(["info", str(plate)]) == 0
    out = capsys.readouterr().out
    assert "B03_f2" in out and "well=C05 field=1 stage=- plate=P7" in out
    assert "3 image file(s), 3 read" in out and "images per well: B03: 2, C05: 1" in out


def test_ome_zarr_plate_is_refused(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    path = tmp_path / "plate.ome.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=2).attrs.update({"plate": {"wells": []}})
    with pytest.raises(ImageReadError, match="HCS plate"):
        read_field(path)


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    from islet_imaging.io import Field, PixelSize, write_ome_tiff

    mask = os.umask(0o022)
    try:
        f = Field(np.ones((1, 1, 8, 8), np.uint16), ("DAPI",), PixelSize(0.5, 0.5))
        out = write_ome_tiff(tmp_path / "a.ome.tif", f)
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o644
