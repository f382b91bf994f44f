"""``islet-imaging score``: segment and measure images, write cell / cluster / field / well tables."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from islet_imaging.errors import InputError
from islet_imaging.io._cli import add_z_step_option

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

log = logging.getLogger(__name__)

HELP = "segment and measure images; write cells, clusters, fields and wells tables"

DESCRIPTION = """\
Segment every image of INPUT (one image or a folder of plate-style images <WELL>_f<FIELD>.ome.tif),
measure each cell and cluster, call marker-positive cells, and summarise per field, well, plate and
stage. Writes to DIR, as CSV and Parquet: cells, clusters, fields, wells, plates, stages, thresholds;
plus failures.csv (images that could not be scored) and run.json (options, version). The columns are
documented in docs/tables.md.

The stage of each image comes from --stage, else from the plate map (well -> stage), else from the
file's metadata. Exit code: 0 if every image was scored, 1 if any failed, 2 for bad input.

Examples:
  islet-imaging score sample_images/plate --plate-map sample_images/plate_map.csv --out results/
  islet-imaging score img.tif --stage S6 --channel-names DAPI,INS,NKX6.1,GCG --pixel-size 0.65 \\
      --out results/ --save-labels
  islet-imaging score plate/ --stage S4 --threshold-method fixed:PDX1=150,NKX6.1=90 --out results/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``score`` options to ``parser``."""
    from islet_imaging.score import DEFAULT_MODEL

    inp = parser.add_argument_group("input")
    inp.add_argument(
        "input", type=Path, metavar="INPUT", help="an image file or a folder of images"
    )
    inp.add_argument("--stage", metavar="S", help="stage of every image (name or alias, e.g. S6)")
    inp.add_argument(
        "--plate-map",
        type=Path,
        metavar="CSV",
        help="plate map with columns well,stage,condition,seeded_cells,control "
        "(optional well_area_mm2)",
    )
    inp.add_argument(
        "--pixel-size",
        type=float,
        metavar="UM",
        help="x = y pixel size in µm for files that lack it",
    )
    add_z_step_option(inp)
    inp.add_argument(
        "--channel-names",
        metavar="A,B,C",
        help="channel names in file order, e.g. DAPI,INS,NKX6.1,GCG (overrides the file's)",
    )
    inp.add_argument("--stages", type=Path, metavar="TOML", help="extra stage profiles (TOML)")
    seg = parser.add_argument_group("segmentation")
    seg.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="M",
        help=f"'classical', a shipped model name or a model directory (default: {DEFAULT_MODEL})",
    )
    seg.add_argument(
        "--augment",
        action="store_true",
        help="CNN models: test-time augmentation, maps averaged over mirror images (4x the "
        "network time; see benchmarks/README.md for what it changes)",
    )
    mea = parser.add_argument_group("measurement")
    mea.add_argument(
        "--threshold-method",
        default="gmm",
        metavar="METHOD",
        help="positivity threshold: gmm (two-Gaussian mixture, default) | otsu (both on log "
        "intensities) | fixed:<MARKER>=<v>[,...] | control (99th percentile of the plate map's "
        "negative-control wells)",
    )
    mea.add_argument(
        "--on-unimodal",
        choices=("sbr", "keep", "nan"),
        default="sbr",
        help="when a marker's intensities are unimodal (one population): call cells positive at "
        ">= 3x their local background (sbr, default), keep the automatic split, or leave the "
        "calls empty (nan)",
    )
    mea.add_argument(
        "--threshold-scope",
        choices=("image", "plate"),
        default="image",
        help="threshold each image on its own cells (image, default; images with < 20 cells use "
        "the pooled threshold) or pool all images of a stage (plate)",
    )
    mea.add_argument(
        "--background",
        choices=("ring", "global", "none"),
        default="ring",
        help="background correction: ring around each cluster (default), one field value, or none",
    )
    mea.add_argument(
        "--cytoplasm-um",
        type=float,
        metavar="UM",
        help="cytoplasm reach beyond the nucleus in µm (default: half the stage's nucleus diameter)",
    )
    mea.add_argument(
        "--min-cells", type=int, default=50, help="flag fields/wells with fewer cells (default 50)"
    )
    mea.add_argument(
        "--min-clusters",
        type=int,
        default=5,
        help="flag fields/wells with fewer interior clusters (default 5)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    out.add_argument(
        "--save-labels",
        action="store_true",
        help="also write DIR/labels/<image>_nuclei.tif and <image>_clusters.tif",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty DIR, replacing its files"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``score``; returns 0 if every image was scored, 1 if any failed."""
    from islet_imaging.io._cli import split_channel_names
    from islet_imaging.io._plate import read_plate_map
    from islet_imaging.measure._positivity import parse_threshold_method
    from islet_imaging.score import ScoreOptions, score_path
    from islet_imaging.stages import get_stage

    stage = None
    if args.stage:
        stage = get_stage(args.stage, stages_file=args.stages).name
    plate_map = read_plate_map(args.plate_map, stages_file=args.stages) if args.plate_map else None
    spec = parse_threshold_method(args.threshold_method)
    if spec.method == "control" and plate_map is None:
        raise InputError(
            "--threshold-method control needs a --plate-map with negative-control wells "
            "(column control, e.g. negative:INS)"
        )
    if args.min_cells < 0 or args.min_clusters < 0:
        raise InputError("--min-cells and --min-clusters must be >= 0")
    names = split_channel_names(args.channel_names)
    options = ScoreOptions(
        stage=stage,
        model=str(args.model),
        threshold=spec,
        threshold_scope=args.threshold_scope,
        cytoplasm_um=args.cytoplasm_um,
        background=args.background,
        on_unimodal=args.on_unimodal,
        stages_file=None if args.stages is None else str(args.stages),
        min_cells=args.min_cells,
        min_clusters=args.min_clusters,
        augment=args.augment,
    )
    result = score_path(
        args.input,
        args.out,
        options=options,
        plate_map=plate_map,
        channel_names=names,
        pixel_size=args.pixel_size,
        z_step=args.z_step,
        save_labels=args.save_labels,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if result.tables is not None and not args.quiet:
        print(well_summary(result.tables.wells, stages_file=args.stages))
    if result.failures:
        log.error(
            "%d image(s) failed; see %s", len(result.failures), Path(args.out) / "failures.csv"
        )
        return 1
    return 0


def well_summary(wells: pd.DataFrame, *, stages_file: str | Path | None = None) -> str:
    """A short per-well text table: stage, clusters, median diameter, IEQ, cells, the stage's first
    QC population with its 95 % Wilson interval, and QC.

    Parameters
    ----------
    wells : pandas.DataFrame
        The ``wells`` table of a score run.
    stages_file : path, optional
        The TOML file with the user's stage profiles, if any.
    """
    import pandas as pd

    from islet_imaging.stages import get_stage

    lines = [
        f"{'well':<6}{'stage':<24}{'clusters':>9}{'median µm':>11}{'IEQ':>9}{'cells':>7}"
        f"  {'key population (95% CI)':<34}QC"
    ]
    for row in wells.to_dict("records"):
        key = ""
        try:
            profile = get_stage(str(row["stage"]), stages_file=stages_file)
        except InputError:
            profile = None
        if profile is not None:
            pops = [t.population for t in profile.qc_targets] or list(profile.marker_names)
            pop = pops[0] if pops else None
            frac = row.get(f"fraction_positive_{pop}") if pop else None
            if frac is not None and not pd.isna(frac):
                lo = row.get(f"fraction_positive_{pop}_ci_low", float("nan"))
                hi = row.get(f"fraction_positive_{pop}_ci_high", float("nan"))
                key = f"{pop}+ {frac:.1%} ({lo:.1%}-{hi:.1%})"
        qc = row.get("qc_pass")
        qc_text = (
            "n/a"
            if qc is None or pd.isna(qc)
            else ("pass" if qc else f"FAIL {row.get('qc_failed') or ''}")
        )
        median = row.get("diameter_median_um")
        median_text = "-" if median is None or pd.isna(median) else f"{median:.0f}"
        lines.append(
            f"{row['well']!s:<6}{row['stage']!s:<24}{int(row['n_clusters']):>9}{median_text:>11}"
            f"{float(row['ieq_total']):>9.2f}{int(row['n_cells']):>7}  {key:<34}{qc_text}"
        )
    return "\n".join(lines)
