"""Plates: plate-style file names, plate maps and image discovery.

A plate is a folder of images named after their well and field (``B03_f1.ome.tif``) plus, optionally,
a plate map: a CSV file saying what each well holds. Both are read here; nothing else parses names.

Examples
--------
>>> parse_plate_name("B3_f02.ome.tif")
PlateName(well='B03', field=2)
>>> parse_plate_name("r02c11f03p01-ch1sk1fk1fl1.tiff")
PlateName(well='B11', field=3)
>>> parse_plate_name("overview.tif")
PlateName(well=None, field=None)
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from islet_imaging.errors import InputError, StageError

__all__ = [
    "IMAGE_SUFFIXES",
    "PLATE_MAP_COLUMNS",
    "PlateMap",
    "PlateName",
    "WellInfo",
    "discover_images",
    "hcs_position",
    "normalize_well",
    "parse_plate_name",
    "read_plate_map",
]

log = logging.getLogger(__name__)

#: File name endings recognised as images by :func:`discover_images` (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".ome.tif",
    ".ome.tiff",
    ".tif",
    ".tiff",
    ".png",
    ".ome.zarr",
    ".zarr",
)

#: Required plate-map columns; any other column is kept as an extra.
PLATE_MAP_COLUMNS: tuple[str, ...] = ("well", "stage", "condition", "seeded_cells", "control")

_OPTIONAL_NUMERIC = ("seeded_cells", "well_area_mm2")
_ROWS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_WELL_RE = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
# <WELL>_f<FIELD> with separators _, -, space or none before the field part.
_NAME_PATTERNS: tuple[re.Pattern[str], ...] = (
    # Opera / Operetta / Harmony: r02c03f01p01-ch1...
    re.compile(r"(?:^|[^A-Za-z0-9])r(?P<row>\d{1,2})c(?P<col>\d{1,2})f(?P<field>\d{1,4})", re.I),
    # B03_f1, B03-f01, B03_fld1, B03_field1, B03_s2 (ImageXpress sites), B03_f1_z0...
    re.compile(
        r"(?:^|[^A-Za-z0-9])(?P<well>[A-Pa-p]\d{1,2})[_\- ]?(?:f|fld|field|s|site)(?P<field>\d{1,4})"
        r"(?=$|[^A-Za-z0-9])",
        re.I,
    ),
    # a bare well name in capitals: B03.tif, plate1_B03.tif (not 'f1' of 'overview_f1')
    re.compile(r"(?:^|[^A-Za-z0-9])(?P<well>[A-P]\d{1,2})(?=$|[^A-Za-z0-9])"),
)


class PlateName(NamedTuple):
    """Well and field parsed from a file name; either is ``None`` when not found."""

    well: str | None
    field: int | None


def normalize_well(well: str) -> str:
    """Canonical well name: upper-case row letter(s) and a two-digit column (``"b3"`` → ``"B03"``).

    Raises
    ------
    InputError
        If ``well`` is not a well name like ``B03``.
    """
    m = _WELL_RE.match(str(well).strip())
    if not m:
        raise InputError(f"{well!r} is not a well name; wells are written like 'B03' or 'H12'")
    return f"{m.group(1).upper()}{int(m.group(2)):02d}"


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def hcs_position(path: str | Path) -> tuple[str, str, int] | None:
    """Plate, well and field of an image inside an OME-Zarr HCS plate, from its path.

    ``PLATE.zarr/<row>/<column>/<field>`` (the NGFF plate layout) → ``("PLATE", "B03", 1)``
    for ``PLATE.ome.zarr/B/3/0``: fields count from 1, like ``_f1`` in file names. ``None``
    for any other path.
    """
    parts = Path(str(path)).parts
    if len(parts) < 4:
        return None
    plate, row, col, fld = parts[-4:]
    if not (plate.lower().endswith(".zarr") and row.isalpha() and col.isdigit() and fld.isdigit()):
        return None
    try:
        well = normalize_well(f"{row}{int(col)}")
    except InputError:
        return None
    return _strip_suffix(plate), well, int(fld) + 1


def parse_plate_name(name: str | Path) -> PlateName:
    """Parse the well and field out of a plate-style image name.

    Recognised: ``<WELL>_f<FIELD>`` (``B03_f1.ome.tif``; also ``-f``, ``_fld``, ``_field``,
    ``_s``/``_site``), Opera/Operetta ``r<ROW>c<COL>f<FIELD>`` (``r02c03f01...`` → B03, field 1),
    a bare well (``plate1_B03.tif`` → B03, no field) and an image inside an OME-Zarr HCS plate
    (``PLATE.zarr/B/3/0`` → B03, field 1; :func:`hcs_position`). Wells are normalised to ``B03``.

    Parameters
    ----------
    name : str or path
        A file name or path; only the final component is used, except for an image inside an
        OME-Zarr plate.

    Returns
    -------
    PlateName
        ``(well, field)``; parts that are not found are ``None``.
    """
    hcs = hcs_position(name)
    if hcs is not None:
        return PlateName(hcs[1], hcs[2])
    stem = _strip_suffix(Path(str(name)).name)
    for pattern in _NAME_PATTERNS:
        m = pattern.search(stem)
        if not m:
            continue
        groups = m.groupdict()
        if "row" in groups and groups.get("row") is not None:
            row, col = int(groups["row"]), int(groups["col"])
            if not (1 <= row <= len(_ROWS)) or col < 1:
                continue
            well = f"{_ROWS[row - 1]}{col:02d}"
        else:
            well = normalize_well(groups["well"])
        fld = groups.get("field")
        return PlateName(well, None if fld is None else int(fld))
    return PlateName(None, None)


def _is_image(path: Path) -> bool:
    lower = path.name.lower()
    return not path.name.startswith(".") and any(lower.endswith(s) for s in IMAGE_SUFFIXES)


def _zarr_images(path: Path) -> list[Path]:
    """The images of a ``.zarr`` folder: itself, or every field image of an HCS plate or well
    (from the plate's ``wells`` and each well's ``images`` metadata). A folder whose metadata
    cannot be read stays one image, for the reader to report."""
    attrs = _ome_attributes(path)
    if "plate" in attrs:
        wells = _entry_paths(attrs["plate"], "wells")
        images = [im for w in wells for im in _well_images(path / w, _ome_attributes(path / w))]
        return images or [path]
    if "well" in attrs:
        return _well_images(path, attrs) or [path]
    return [path]


def _well_images(well: Path, attrs: Mapping[str, Any]) -> list[Path]:
    """The field images of an HCS well, from its metadata ``attrs``."""
    return [well / p for p in _entry_paths(attrs.get("well"), "images")]


def _entry_paths(group: Any, key: str) -> list[str]:
    """The ``path`` of each entry of ``group[key]`` (a plate's wells, a well's images); entries
    without one are skipped (malformed metadata), as are groups that are not mappings."""
    entries = group.get(key) if isinstance(group, Mapping) else None
    if not isinstance(entries, list):
        return []
    return [str(e["path"]) for e in entries if isinstance(e, Mapping) and "path" in e]


def _ome_attributes(path: Path) -> Mapping[str, Any]:
    """The OME metadata of a Zarr group; empty when it has none or cannot be read."""
    from islet_imaging.io._readers import zarr_attributes

    try:
        return zarr_attributes(path)
    except InputError:
        return {}


def discover_images(path: str | Path, *, recursive: bool = False) -> list[Path]:
    """The image files of a folder (or the file itself), in plate order.

    Images are files ending in one of :data:`IMAGE_SUFFIXES`. A ``.zarr`` folder is one image,
    except an OME-Zarr HCS plate (or well), which stands for every field image inside it
    (``PLATE.zarr/B/3/0``, ...; :func:`hcs_position` gives their wells). The ``labels/`` and
    ``truth/`` folders of the dataset layout are never entered. Files are sorted by (well row,
    well column, field, name), files without a plate-style name last by name.

    Parameters
    ----------
    path : path-like
        An image file or a folder.
    recursive : bool
        Also look in sub-folders.

    Raises
    ------
    InputError
        If ``path`` does not exist, or is a folder with no image files.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder; give an image or a folder of images", path)
    zarr_group = path.is_dir() and (
        path.name.lower().endswith(".zarr")
        or (path / "zarr.json").exists()
        or (path / ".zattrs").exists()
    )
    if path.is_file() and not _is_image(path):
        raise InputError(f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})", path)
    found: list[Path] = [path] if path.is_file() else _zarr_images(path) if zarr_group else []
    skip = {"labels", "truth"}

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() and not child.name.lower().endswith(".zarr"):
                if recursive and child.name not in skip:
                    walk(child)
                continue
            if _is_image(child):
                found.extend(_zarr_images(child) if child.is_dir() else [child])

    if not found:
        walk(path)
    if not found:
        raise InputError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder; give a folder of images",
            path,
        )

    def key(p: Path) -> tuple[int, int, int, int, str]:
        well, fld = parse_plate_name(p)
        if well is None:
            return (1, 0, 0, 0, str(p))
        m = _WELL_RE.match(well)
        assert m is not None
        row = sum((ord(ch) - 64) * 26**i for i, ch in enumerate(reversed(m.group(1))))
        return (0, row, int(m.group(2)), -1 if fld is None else fld, str(p))

    return sorted(found, key=key)


@dataclass(frozen=True)
class WellInfo:
    """One row of a plate map.

    Parameters
    ----------
    well : str
        Normalised well name (``"B03"``).
    stage : str
        Canonical stage name (checked against the stage profiles).
    condition : str
        Free text (treatment, line, protocol arm); ``""`` when not given.
    seeded_cells : float or None
        Cells seeded into the well, for yield per seeded cell.
    controls : dict of str to str
        Marker → control kind, e.g. ``{"INS": "negative"}``.
    well_area_mm2 : float or None
        Growth area of the well, to extrapolate imaged values to the whole well.
    extra : dict
        Any other columns, as read.
    """

    well: str
    stage: str
    condition: str = ""
    seeded_cells: float | None = None
    controls: Mapping[str, str] = field(default_factory=dict)
    well_area_mm2: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def is_negative_control(self, marker: str) -> bool:
        """True if this well is a negative control for ``marker``."""
        return self.controls.get(marker) == "negative"


@dataclass(frozen=True)
class PlateMap:
    """What each well of a plate holds, read from a CSV file with :func:`read_plate_map`.

    Parameters
    ----------
    wells : dict of str to WellInfo
        Keyed by normalised well name.
    path : Path or None
        The file it was read from.
    """

    wells: Mapping[str, WellInfo]
    path: Path | None = None

    def __contains__(self, well: object) -> bool:
        try:
            return normalize_well(str(well)) in self.wells
        except InputError:
            return False

    def __len__(self) -> int:
        return len(self.wells)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.wells.values())

    def get(self, well: str | None) -> WellInfo | None:
        """The row of ``well``, or ``None`` if the map does not list it."""
        if well is None or well not in self:
            return None
        return self.wells[normalize_well(well)]

    def stage_of(self, well: str | None) -> str | None:
        """The stage of ``well``, or ``None`` if the map does not list it."""
        info = self.get(well)
        return None if info is None else info.stage

    def negative_controls(self, marker: str) -> tuple[str, ...]:
        """Wells that are negative controls for ``marker``."""
        return tuple(w for w, info in self.wells.items() if info.is_negative_control(marker))

    def check_wells(self, image_wells: Iterable[str | None]) -> tuple[str, ...]:
        """Warn about plate-map wells that have no images; return the image wells not in the map."""
        seen = {normalize_well(w) for w in image_wells if w is not None}
        missing = sorted(set(self.wells) - seen)
        if missing:
            log.warning(
                "%s: %d well(s) in the plate map have no images: %s",
                self.path or "plate map",
                len(missing),
                ", ".join(missing),
            )
        return tuple(sorted(w for w in seen if w not in self.wells))

    def to_frame(self):  # type: ignore[no-untyped-def]
        """The plate map as a pandas DataFrame, one row per well."""
        import pandas as pd

        rows = []
        for info in self.wells.values():
            row = {
                "well": info.well,
                "stage": info.stage,
                "condition": info.condition,
                "seeded_cells": info.seeded_cells,
                "control": ";".join(f"{kind}:{m}" for m, kind in info.controls.items()),
                "well_area_mm2": info.well_area_mm2,
            }
            row.update(info.extra)
            rows.append(row)
        return pd.DataFrame(rows)


def _parse_number(value: str, *, path: Path, line: int, column: str) -> float | None:
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text.replace("_", ""))
    except ValueError:
        raise InputError(
            f"row {line}, column {column!r}: {value!r} is not a number; give a non-negative number "
            "or leave it empty",
            path,
        ) from None
    if not math.isfinite(number) or number < 0 or (column == "well_area_mm2" and number == 0):
        raise InputError(
            f"row {line}, column {column!r}: {value!r} must be a "
            f"{'positive' if column == 'well_area_mm2' else 'non-negative'} finite number",
            path,
        )
    return number


def _parse_controls(value: str, stage: Any, *, path: Path, line: int) -> dict[str, str]:
    """``"negative:INS"``, ``"negative:INS;negative:GCG"``, ``"negative:INS+GCG"`` → dict."""
    out: dict[str, str] = {}
    text = value.strip()
    if not text:
        return out
    for part in re.split(r"[;|]", text):
        part = part.strip()
        if not part:
            continue
        kind, sep, markers = part.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in ("negative", "positive") or not markers.strip():
            raise InputError(
                f"row {line}, column 'control': {value!r} is not understood; write e.g. "
                "'negative:INS' (or 'negative:INS;positive:GCG'), or leave it empty",
                path,
            )
        for name in markers.split("+"):
            name = name.strip()
            try:
                marker = stage.marker(name).name
            except StageError:
                raise InputError(
                    f"row {line}, column 'control': marker {name!r} is not a marker of stage "
                    f"{stage.name!r} ({', '.join(stage.marker_names)})",
                    path,
                ) from None
            out[marker] = kind
    return out


def read_plate_map(path: str | Path, *, stages_file: str | Path | None = None) -> PlateMap:
    """Read and validate a plate map CSV.

    Columns: ``well,stage,condition,seeded_cells,control`` (``condition``, ``seeded_cells`` and
    ``control`` may be empty); optional ``well_area_mm2`` (growth area of the well, for per-well
    extrapolation); any other column is kept in :attr:`WellInfo.extra`. ``control`` is empty or
    ``negative:<MARKER>`` (several joined by ``;``), meaning the well is a negative control for
    that marker (used by ``--threshold-method control``).

    Parameters
    ----------
    path : path-like
        The CSV file (UTF-8, comma-separated, one header row).
    stages_file : path-like, optional
        A TOML file with extra stage profiles.

    Raises
    ------
    InputError
        For a missing file or column, a bad well name, a repeated well, or a negative or
        non-numeric ``seeded_cells`` / ``well_area_mm2``; the message names the file, row and column.
    StageError
        For a stage that is not a known stage profile.
    """
    from islet_imaging.stages import get_stage

    path = Path(path)
    if not path.is_file():
        raise InputError("plate map not found; give the path of a CSV file", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"plate map is not UTF-8 text ({exc}); save it as CSV", path) from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not header:
        raise InputError(
            f"plate map is empty; it needs a header row {','.join(PLATE_MAP_COLUMNS)}", path
        )
    missing = [c for c in ("well", "stage") if c not in header]
    if missing:
        raise InputError(
            f"plate map lacks column(s) {missing}; its header is {header}, expected "
            f"{','.join(PLATE_MAP_COLUMNS)}",
            path,
        )
    wells: dict[str, WellInfo] = {}
    for line, raw in enumerate(reader, start=2):
        row = {
            str(k).strip().lower(): ("" if v is None else str(v))
            for k, v in raw.items()
            if k is not None
        }
        if not any(v.strip() for v in row.values()):
            continue
        try:
            well = normalize_well(row.get("well", ""))
        except InputError as exc:
            raise InputError(f"row {line}, column 'well': {exc.reason}", path) from None
        if well in wells:
            raise InputError(f"row {line}: well {well} is listed twice; give each well once", path)
        stage_name = row.get("stage", "").strip()
        if not stage_name:
            raise InputError(f"row {line}, column 'stage': empty; give the well's stage", path)
        try:
            stage = get_stage(stage_name, stages_file=stages_file)
        except StageError as exc:
            raise StageError(f"row {line}, column 'stage': {exc.reason}", path) from None
        numbers = {
            c: _parse_number(row.get(c, ""), path=path, line=line, column=c)
            for c in _OPTIONAL_NUMERIC
        }
        extra = {k: v for k, v in row.items() if k not in (*PLATE_MAP_COLUMNS, *_OPTIONAL_NUMERIC)}
        wells[well] = WellInfo(
            well=well,
            stage=stage.name,
            condition=row.get("condition", "").strip(),
            seeded_cells=numbers["seeded_cells"],
            controls=_parse_controls(row.get("control", ""), stage, path=path, line=line),
            well_area_mm2=numbers["well_area_mm2"],
            extra=extra,
        )
    if not wells:
        raise InputError("plate map has a header but no wells", path)
    return PlateMap(wells, path)
