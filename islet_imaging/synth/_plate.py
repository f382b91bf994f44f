"""The bundled sample plate: every stage, two protocols, a negative control and z-stacks.

Layout (rows = stages in differentiation order)::

    A01 A02   iPSC                      (protocol A, protocol B)
    B01 B02   definitive endoderm
    C01 C02   endoderm stem cells
    D01 D02   primitive gut tube
    E01 E02   posterior foregut
    F01 F02   pancreatic progenitors
    G01 G02   endocrine progenitors
    H01 H02   SC-islets
    H03       SC-islets, no-INS control (INS antibody omitted: control = negative:INS)
    H04       SC-islets, protocol A, two z-stacks

Monolayer stages (definitive endoderm, gut tube, posterior foregut) are imaged in 256 x 256 px
fields (166 µm). Colonies and aggregates (50-300 µm) would nearly all be cut by such a small
field, so the colony / aggregate wells get 512 x 512 px fields (333 µm) and, like a microscopist
choosing where to image, a field is only kept if it holds at least :data:`MIN_INTERIOR` clusters
that do not touch the image border (otherwise the next field position, i.e. the next seed, is
tried). iPSC colonies are drawn 80-220 µm across (2-3 days after passaging) instead of the
generator's 110-320 µm, which no 333 µm field could hold whole.

Protocol B is a less efficient differentiation: the stage's main population is 30 % rarer and
unstained / off-target cells more common, so the plate shows real differences between wells.

Regenerate bit-identically with ``islet-imaging synth --sample-plate sample_images --overwrite``
(:func:`make_sample_plate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from islet_imaging.errors import InputError
from islet_imaging.stages import get_stage, list_stages
from islet_imaging.synth._dataset import _write_csv, metadata_row, write_metadata, write_synth_field
from islet_imaging.synth._generate import SynthField, generate_field
from islet_imaging.synth._stages import CellType, StageLook, look_for

__all__ = ["SAMPLE_PLATE", "PlateField", "PlateWell", "make_sample_plate", "preview_rgb"]

log = logging.getLogger(__name__)

#: Master seed of the sample plate.
PLATE_SEED = 20240601
PLATE_NAME = "sample-plate"
#: Field size ``(Y, X)`` of the colony and aggregate wells (333 µm at 0.65 µm/px).
LARGE_FIELD = (512, 512)
#: Least number of interior (not border-touching) clusters in a colony / aggregate field.
MIN_INTERIOR = 3
#: Field positions (seeds) tried per field before the one with the most interior clusters is kept.
MAX_ATTEMPTS = 20
#: Plate-specific look changes: iPSC colonies 2-3 days after passaging.
_PLATE_LOOKS: dict[str, dict[str, tuple[float, float]]] = {
    "ipsc": {"cluster_diameter_um": (80.0, 220.0)},
}


@dataclass(frozen=True)
class PlateField:
    """One field of a sample well: size ``(Y, X)`` and number of planes."""

    size: tuple[int, int] = (256, 256)
    z: int = 1


@dataclass(frozen=True)
class PlateWell:
    """One well of the sample plate."""

    well: str
    stage: str
    condition: str
    seeded_cells: int
    control: str = ""
    fields: tuple[PlateField, ...] = (PlateField(),)

    @property
    def absent_markers(self) -> tuple[str, ...]:
        return tuple(
            part.split(":", 1)[1]
            for part in self.control.split(";")
            if part.startswith("negative:")
        )


def _plate() -> tuple[PlateWell, ...]:
    seeded = {
        "ipsc": 30_000,
        "definitive-endoderm": 60_000,
        "endoderm-stem-cell": 40_000,
        "primitive-gut-tube": 60_000,
        "posterior-foregut": 60_000,
        "pancreatic-progenitor": 80_000,
        "endocrine-progenitor": 80_000,
        "sc-islet": 50_000,
    }
    large = (PlateField(size=LARGE_FIELD),)
    wells: list[PlateWell] = []
    for row, profile in zip("ABCDEFGH", list_stages(), strict=False):
        fields = large if profile.cluster_kind in ("colony", "aggregate") else (PlateField(),)
        for col, condition in (("01", "protocol A"), ("02", "protocol B")):
            wells.append(
                PlateWell(
                    f"{row}{col}", profile.name, condition, seeded[profile.name], fields=fields
                )
            )
    wells.append(
        PlateWell(
            "H03",
            "sc-islet",
            "no-INS control",
            seeded["sc-islet"],
            control="negative:INS",
            fields=large,
        )
    )
    stack = PlateField(size=(160, 160), z=10)
    wells.append(
        PlateWell("H04", "sc-islet", "protocol A", seeded["sc-islet"], fields=(stack, stack))
    )
    return tuple(wells)


#: The wells of the sample plate.
SAMPLE_PLATE: tuple[PlateWell, ...] = _plate()


def _protocol_b(look: StageLook) -> StageLook:
    """A less efficient protocol: main population x0.7, negative / off-target types x1.6."""
    main = max((t for t in look.cell_types if t.markers), key=lambda t: t.fraction)
    types: list[CellType] = []
    for t in look.cell_types:
        if t is main:
            types.append(replace(t, fraction=t.fraction * 0.7))
        elif not t.markers or t.name in ("negative", "differentiating", "foxa2-only"):
            types.append(replace(t, fraction=t.fraction * 1.6))
        else:
            types.append(t)
    return replace(look, cell_types=tuple(types))


def _field_seed(well_index: int, field_index: int, attempt: int = 0) -> int:
    key = [PLATE_SEED, well_index, field_index, *([attempt] if attempt else [])]
    ss = np.random.SeedSequence(key)
    return int(ss.generate_state(1, np.uint32)[0])


def _n_interior(synth: SynthField) -> int:
    return int((~synth.clusters_table["touches_border"].astype(bool)).sum())


def generate_plate_field(well: PlateWell, well_index: int, field_index: int) -> SynthField:
    """The synthetic field ``field_index`` (1-based) of a sample-plate well.

    2D colony / aggregate fields are redrawn (next seed) until they hold at least
    :data:`MIN_INTERIOR` interior clusters; after :data:`MAX_ATTEMPTS` draws the first one with
    the most interior clusters is kept. Monolayer fields and z-stacks use their first draw.
    """
    profile = get_stage(well.stage)
    look = look_for(profile)
    if profile.name in _PLATE_LOOKS:
        look = replace(look, **_PLATE_LOOKS[profile.name])
    if well.condition == "protocol B":
        look = _protocol_b(look)
    spec = well.fields[field_index - 1]
    choose = look.layout != "sheet" and spec.z == 1

    def draw(attempt: int) -> SynthField:
        return generate_field(
            profile,
            seed=_field_seed(well_index, field_index, attempt),
            size=spec.size,
            z=spec.z,
            absent_markers=well.absent_markers,
            look=look,
            plate=PLATE_NAME,
            well=well.well,
            field_index=field_index,
        )

    best = draw(0)
    attempt = 0
    while choose and _n_interior(best) < MIN_INTERIOR and attempt + 1 < MAX_ATTEMPTS:
        attempt += 1
        synth = draw(attempt)
        if _n_interior(synth) > _n_interior(best):
            best = synth
    log.debug("%s field %d: %d interior clusters", well.well, field_index, _n_interior(best))
    return best


def plate_map(wells: tuple[PlateWell, ...] = SAMPLE_PLATE) -> pd.DataFrame:
    """The plate map table: ``well, stage, condition, seeded_cells, control``."""
    return pd.DataFrame(
        [(w.well, w.stage, w.condition, w.seeded_cells, w.control) for w in wells],
        columns=["well", "stage", "condition", "seeded_cells", "control"],
    )


def preview_channels(synth: SynthField) -> tuple[int | None, int | None]:
    """Channels shown green and magenta: a cytoplasmic marker (if any) and a nuclear marker."""
    profile = get_stage(synth.stage)
    markers = list(profile.markers)
    cyto = [i for i, m in enumerate(markers, start=1) if m.compartment == "cytoplasmic"]
    nuclear = [i for i, m in enumerate(markers, start=1) if m.compartment == "nuclear"]
    green = cyto[0] if cyto else (nuclear[0] if nuclear else None)
    rest = [i for i in nuclear if i != green]
    return green, (rest[0] if rest else None)


def preview_rgb(synth: SynthField, *, width: int = 256) -> np.ndarray:
    """A false-colour composite: DAPI blue, a marker green, another magenta.

    Green is the stage's first cytoplasmic marker (INS, CHGA, CXCR4) or else its first marker;
    magenta its first (other) nuclear marker. Each channel is scaled between its 0.5th and 99.7th
    percentile (of the middle plane for a stack) and the result resized to ``width`` pixels wide
    with area averaging.

    Returns
    -------
    (H, W, 3) ndarray of uint8
    """
    data = synth.field.data
    green, magenta = preview_channels(synth)
    order = [0, *(c for c in (green, magenta) if c is not None)]
    plane = data[order, data.shape[1] // 2].astype(np.float32)

    def norm(a: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(a, [0.5, 99.7])
        return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)

    rgb = np.zeros((*plane.shape[1:], 3), np.float32)
    rgb[..., 2] += 0.9 * norm(plane[0])
    if plane.shape[0] > 1:
        rgb[..., 1] += norm(plane[1])
    if plane.shape[0] > 2:
        m = norm(plane[2])
        rgb[..., 0] += m
        rgb[..., 2] += 0.8 * m
    rgb = np.clip(rgb, 0.0, 1.0)
    factor = max(1, round(rgb.shape[1] / width))
    if factor > 1:
        h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
        rgb = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
    return (rgb * 255 + 0.5).astype(np.uint8)


def _save_png(path: Path, rgb: np.ndarray, *, overwrite: bool) -> None:
    from PIL import Image

    if path.exists() and not overwrite:
        raise InputError("file already exists; refusing to overwrite it (use --overwrite)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb, mode="RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)


def make_sample_plate(
    out_dir: str | Path, *, overwrite: bool = False, previews: bool = True
) -> list[Path]:
    """Write the sample plate (images, labels, truth, plate map, previews) into ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        Typically ``sample_images``; gets ``plate/``, ``plate_map.csv`` and ``previews/``.
    overwrite : bool
        Replace existing files; otherwise refuse if any target exists.
    previews : bool
        Also write ``previews/<stage>.png`` (from each stage's protocol-A well) and
        ``previews/sc-islet-zstack.png`` (middle plane of the first z-stack).

    Returns
    -------
    list of Path
        Every file written.
    """
    out = Path(out_dir)
    plate_dir = out / "plate"
    if not overwrite:
        probe = [out / "plate_map.csv", plate_dir / "A01_f1.ome.tif", plate_dir / "metadata.csv"]
        existing = [p for p in probe if p.exists()]
        if existing:
            raise InputError(
                "a sample plate already exists here; refusing to overwrite it. "
                "Pass --overwrite to regenerate it",
                existing[0],
            )
    written: list[Path] = []
    rows = []
    shown: set[str] = set()
    for wi, well in enumerate(SAMPLE_PLATE):
        for fi in range(1, len(well.fields) + 1):
            synth = generate_plate_field(well, wi, fi)
            name = f"{well.well}_f{fi}"
            paths = write_synth_field(
                plate_dir,
                name,
                synth,
                overwrite=overwrite,
                image_path=plate_dir / f"{name}.ome.tif",
            )
            written.extend(paths.values())
            rows.append(metadata_row(name, synth))
            log.info("sample plate %s: %s, %d cells", name, well.stage, len(synth.cells))
            key = well.stage if synth.field.data.shape[1] == 1 else f"{well.stage}-zstack"
            if previews and well.condition == "protocol A" and key not in shown:
                shown.add(key)
                png = out / "previews" / f"{key}.png"
                _save_png(png, preview_rgb(synth), overwrite=overwrite)
                written.append(png)
    written.append(write_metadata(plate_dir, rows))
    written.append(_write_csv(out / "plate_map.csv", plate_map(), overwrite=overwrite))
    return written
