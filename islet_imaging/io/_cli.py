"""``islet-imaging info``: what is in an image file or a folder of images."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from islet_imaging.errors import InputError
from islet_imaging.io._field import Field
from islet_imaging.io._plate import hcs_position

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "describe_field", "run", "split_channel_names"]

log = logging.getLogger(__name__)

HELP = "show shape, channels, pixel size and plate position of images"

DESCRIPTION = """\
Show, for each image: its name, shape (C, Z, Y, X), pixel type, channel names, pixel size in µm and
plate position (well / field / stage). For a folder: every image in it, then the number of images per
well. Use it to check that channel names and pixel sizes are read as you expect before scoring.

Examples:
  islet-imaging info plate/B03_f1.ome.tif
  islet-imaging info plate/                     # every image, then images per well
  islet-imaging info img.png --channel-names DAPI --pixel-size 0.65
"""


def split_channel_names(text: str | None) -> list[str] | None:
    """The names of a ``--channel-names`` option (``"DAPI,INS"`` or ``"DAPI|INS"``), blanks dropped.

    Examples
    --------
    >>> split_channel_names("DAPI, INS|GCG,")
    ['DAPI', 'INS', 'GCG']
    """
    if not text:
        return None
    return [n.strip() for n in text.replace("|", ",").split(",") if n.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``info`` options to ``parser``."""
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files and/or folders of images"
    )
    parser.add_argument(
        "--recursive", action="store_true", help="also look for images in sub-folders"
    )
    parser.add_argument(
        "--channel-names",
        metavar="NAMES",
        help="channel names for files that lack them, joined by | or , (e.g. 'DAPI|INS')",
    )
    parser.add_argument(
        "--pixel-size",
        type=float,
        metavar="UM",
        help="x = y pixel size in µm for files that lack it",
    )
    add_z_step_option(parser)


def add_z_step_option(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--z-step UM``: the plane spacing of z-stacks (overrides the file's)."""
    group.add_argument(
        "--z-step",
        type=float,
        metavar="UM",
        help="µm between the planes of z-stacks (overrides the file's; many exported TIFFs lack "
        "it, and without it planes are taken as one pixel apart)",
    )


def _fmt_um(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def describe_field(field: Field) -> str:
    """A few human-readable lines on one field."""
    ps = field.pixel_size
    size = "unknown" if ps is None else f"x={_fmt_um(ps.x)} y={_fmt_um(ps.y)} z={_fmt_um(ps.z)}"
    o = field.origin
    where = (
        f"well={o.well or '-'} field={'-' if o.field is None else o.field} "
        f"stage={o.stage or '-'} plate={o.plate or '-'}"
    )
    series = "" if o.series is None else f" (series {o.series})"
    name = o.path.name if o.path is not None and hcs_position(o.path) is None else field.name
    return (
        f"{name}{series}\n"
        f"  shape (C, Z, Y, X): {field.shape}  dtype: {field.data.dtype}  "
        f"format: {field.metadata.get('format', '-')}\n"
        f"  channels: {', '.join(field.channel_names)}\n"
        f"  pixel size (µm): {size}\n"
        f"  {where}"
    )


def run(args: argparse.Namespace) -> int:
    """Print information on each image; returns 2 when some image could not be read."""
    from islet_imaging.io._plate import discover_images
    from islet_imaging.io._readers import read_fields

    failures = 0
    for path in args.paths:
        # a folder, or an OME-Zarr plate: its images (an OME-Zarr image is itself)
        files = discover_images(path, recursive=args.recursive) if path.is_dir() else [path]
        is_folder = files != [path]
        wells: Counter[str] = Counter()
        n_read = 0
        for file in files:
            try:
                fields = read_fields(
                    file,
                    channel_names=args.channel_names,
                    pixel_size=args.pixel_size,
                    z_step=args.z_step,
                )
            except InputError as exc:
                if len(args.paths) == 1 and not is_folder:
                    raise  # one file asked for: its error is the answer
                failures += 1
                print(f"{file.name}\n  ERROR: {exc.reason}")
                continue
            n_read += 1
            for f in fields:
                print(describe_field(f))
                wells[f.origin.well or "(no well)"] += 1
        if is_folder:
            per_well = ", ".join(f"{w}: {n}" for w, n in sorted(wells.items()))
            print(
                f"{path}: {len(files)} image file(s), {n_read} read, "
                f"{len(files) - n_read} unreadable\n  images per well: {per_well or '-'}"
            )
    if failures:
        log.error("%d image(s) could not be read", failures)
        return 2
    return 0
