"""``islet-imaging synth``: synthetic fields with exact truth, or the bundled sample plate."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from islet_imaging.errors import InputError

HELP = "generate synthetic fields with exact ground truth (or the sample plate)"
DESCRIPTION = """\
Generate synthetic microscopy fields of a differentiation stage with exact ground truth, in the
dataset layout that `islet-imaging train` reads:

  DIR/images/<name>.ome.tif        DAPI + the stage's markers (uint16, µm pixel size)
  DIR/labels/<name>_nuclei.tif     nucleus instance labels
  DIR/labels/<name>_clusters.tif   cluster instance labels
  DIR/truth/<name>_cells.csv       per-cell truth (cluster_id, positive_<MARKER>, ...)
  DIR/truth/<name>_clusters.csv    per-cluster truth (area / volume, diameter, n_cells, ...)
  DIR/metadata.csv                 name, stage, pixel size, z step, channel names

Names are <stage-short>_<seed>_<i>, e.g. S6_7_0. The same --seed gives bit-identical fields.

examples:
  islet-imaging synth --stage S6 --out synth --n 10 --seed 1
  islet-imaging synth --stage all --out synth --n 2 --seed 1 --size 512x384
  islet-imaging synth --stage sc-islet --out stacks --n 2 --seed 3 --size 256 --z 16
  islet-imaging synth --sample-plate sample_images --overwrite   # regenerate the sample plate
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to generate")
    what.add_argument(
        "--stage",
        help="stage name or alias (ipsc, S1 ... S6, sc-islet); 'all' for every built-in stage",
    )
    what.add_argument(
        "--stages",
        metavar="TOML",
        type=Path,
        help="TOML file with your own or overridden stage profiles (see `islet-imaging stages`)",
    )
    what.add_argument("--n", type=int, default=1, help="fields per stage (default 1)")
    what.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    what.add_argument(
        "--sample-plate",
        metavar="DIR",
        type=Path,
        help="write the bundled sample plate into DIR instead (plate/, plate_map.csv, previews/)",
    )
    geometry = parser.add_argument_group("image geometry")
    geometry.add_argument(
        "--size", default="512", help="field size: 512 (square) or WIDTHxHEIGHT, e.g. 512x384"
    )
    geometry.add_argument("--z", type=int, default=1, help="planes per field (default 1 = 2D)")
    geometry.add_argument(
        "--pixel-size", type=float, default=0.65, help="lateral pixel size in µm (default 0.65)"
    )
    geometry.add_argument(
        "--z-step", type=float, default=2.0, help="plane spacing in µm for --z > 1 (default 2)"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help="output dataset folder")
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files of the same names (default: refuse)",
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.sample_plate is not None:
        from islet_imaging.synth._plate import make_sample_plate

        files = make_sample_plate(args.sample_plate, overwrite=args.overwrite)
        size = sum(p.stat().st_size for p in files if p.exists()) / 1e6
        log.info(
            "sample plate: %d files, %.1f MB in %s (%.1f s)",
            len(files),
            size,
            args.sample_plate,
            time.perf_counter() - t0,
        )
        return 0
    if not args.stage:
        raise InputError("give --stage (a stage name, or 'all') or --sample-plate DIR")
    if args.out is None:
        raise InputError("give --out DIR, the folder to write the dataset into")
    from islet_imaging.synth._dataset import write_dataset

    names = write_dataset(
        args.out,
        args.stage,
        n=args.n,
        seed=args.seed,
        size=args.size,
        z=args.z,
        pixel_size=args.pixel_size,
        z_step_um=args.z_step,
        overwrite=args.overwrite,
        progress=not getattr(args, "quiet", False),
        stages_file=args.stages,
    )
    log.info("wrote %d field(s) to %s in %.1f s", len(names), args.out, time.perf_counter() - t0)
    return 0
