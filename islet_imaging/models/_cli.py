"""``islet-imaging segment``: nucleus and cluster instance labels for images, with the CNN or baseline."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from islet_imaging.errors import InputError, logged_warnings
from islet_imaging.io._cli import add_z_step_option
from islet_imaging.models._blocks import BLOCK_PX

if TYPE_CHECKING:
    from islet_imaging.io import Field
    from islet_imaging.models._modeldir import Model
    from islet_imaging.segment import Labels
    from islet_imaging.stages import StageProfile

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

log = logging.getLogger(__name__)

HELP = "segment nuclei and clusters; write label images (and probability maps)"

DESCRIPTION = """\
Segment each image (files, or folders of images) into nucleus and cluster instances and write, for
an image <name>, DIR/<name>_nuclei.tif and DIR/<name>_clusters.tif (OME-TIFF label images with the
input's pixel size), plus DIR/<name>_probabilities.ome.tif with --probabilities (the network's maps:
foreground probability and distance per class).

The CNN rescales each image to the pixel size it was trained at, so the pixel size must be known:
from the file, from --pixel-size, or — for images without one — from --nucleus-diameter (typical
nucleus diameter in pixels). Without either it is estimated from the image, with a warning.

The nuclear stain is the channel named DAPI, Hoechst, DNA, ... (--channel-names names them); an
image of one unnamed channel is taken as the nuclear stain.

Existing outputs are never replaced without --overwrite. Images that fail are logged and listed at
the end. Exit code: 0 if every image was segmented, 1 if any failed, 2 for bad options.

Examples:
  islet-imaging segment sample_images/plate --stage S6 --out labels/
  islet-imaging segment img.tif --stage S4 --channel-names DAPI,PDX1,NKX6.1 --pixel-size 0.65 \\
      --out labels/ --probabilities
  islet-imaging segment scan.png --stage S0 --nucleus-diameter 14 --model classical --out labels/
"""


def add_image_overrides(group: argparse._ArgumentGroup, *, source: str) -> None:
    """``--stages``, ``--channel-names``, ``--pixel-size``, ``--z-step``, ``--nucleus-diameter``.

    Shared by the commands that segment images (``segment``, ``evaluate``); ``source`` names
    what the options override (e.g. ``"the file's"``).
    """
    group.add_argument("--stages", type=Path, metavar="TOML", help="extra stage profiles (TOML)")
    group.add_argument(
        "--channel-names",
        metavar="A,B",
        help=f"channel names in file order, e.g. DAPI,INS (overrides {source})",
    )
    group.add_argument(
        "--pixel-size",
        type=float,
        metavar="UM",
        help=f"x = y pixel size in µm (overrides {source})",
    )
    add_z_step_option(group)
    group.add_argument(
        "--nucleus-diameter",
        type=float,
        metavar="PX",
        help="typical nucleus diameter in pixels, for images without a pixel size "
        "(with a pixel size: in µm, for unusually large or small nuclei)",
    )


def add_device_option(group: argparse._ArgumentGroup) -> None:
    """``--device cpu|cuda`` for commands that run a network."""
    group.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the network runs (default: CUDA when available, else CPU)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``segment`` options to ``parser``."""
    inp = parser.add_argument_group("input")
    inp.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGES", help="image files or folders of images"
    )
    inp.add_argument(
        "--stage",
        metavar="S",
        help="differentiation stage (name or alias, e.g. S6); default: from each file's metadata",
    )
    add_image_overrides(inp, source="the file's")
    mod = parser.add_argument_group("model")
    mod.add_argument(
        "--model",
        default="default",
        metavar="NAME|PATH",
        help="'default', another shipped model name, a model directory, or 'classical' for the "
        "scikit-image baseline (default: default)",
    )
    add_device_option(mod)
    mod.add_argument(
        "--tile",
        type=int,
        default=1024,
        metavar="N",
        help="tile side in pixels at the model's scale; memory grows with N² (default 1024: "
        "about 0.5 GB per tile on CPU)",
    )
    mod.add_argument(
        "--batch-size", type=int, default=1, metavar="N", help="tiles per forward pass (default 1)"
    )
    mod.add_argument(
        "--block",
        type=int,
        default=BLOCK_PX,
        metavar="PX",
        help="segment images wider or taller than PX pixels block by block and stitch the "
        "labels, so memory stays flat for any size (beyond the image and its labels); 0: "
        f"always whole (default {BLOCK_PX}: about 1.1 GB besides those; smaller blocks need less "
        "memory and more time)",
    )
    mod.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network first (pays off only on long runs; see "
        "benchmarks/README.md)",
    )
    mod.add_argument(
        "--augment",
        action="store_true",
        help="test-time augmentation: average the maps of each tile and its 3 mirror images "
        "(4x the network time; see benchmarks/README.md for what it changes)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    out.add_argument(
        "--probabilities",
        action="store_true",
        help="also write DIR/<image>_probabilities.ome.tif (CNN models only)",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="replace existing output files in DIR"
    )


def _outputs(out: Path, name: str, probabilities: bool) -> dict[str, Path]:
    paths = {"nuclei": out / f"{name}_nuclei.tif", "clusters": out / f"{name}_clusters.tif"}
    if probabilities:
        paths["probabilities"] = out / f"{name}_probabilities.ome.tif"
    return paths


def run(args: argparse.Namespace) -> int:
    """Run ``segment``; returns 0 if every image was segmented, 1 if any failed."""
    from islet_imaging._atomic import check_output_folder
    from islet_imaging.io import discover_images, read_fields
    from islet_imaging.io._cli import split_channel_names
    from islet_imaging.stages import get_stage

    if args.tile < 32:
        raise InputError(f"--tile {args.tile} is too small; use at least 32 (e.g. 512)")
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.block and args.block < 64:
        raise InputError(f"--block {args.block} is too small; use at least 64 (or 0: whole)")
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise InputError(f"--pixel-size {args.pixel_size} must be a positive number of µm")
    if args.nucleus_diameter is not None and not args.nucleus_diameter > 0:
        raise InputError(f"--nucleus-diameter {args.nucleus_diameter} must be positive")
    check_output_folder(args.out, "--out")
    stage = get_stage(args.stage, stages_file=args.stages) if args.stage else None
    classical = str(args.model) == "classical"
    if args.probabilities and classical:
        raise InputError("--probabilities needs a CNN model; the classical baseline has no maps")
    if args.augment and classical:
        raise InputError("--augment needs a CNN model; the classical baseline has no network")
    model: Model | None = None
    if not classical:
        from islet_imaging.models._modeldir import load_model

        model = load_model(args.model, device=args.device)  # fail early on a bad model
    names = split_channel_names(args.channel_names)

    images: list[Path] = []
    for item in args.images:
        images.extend(discover_images(item))
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[str, str]] = []
    done = 0
    from tqdm.auto import tqdm

    for path in tqdm(images, desc="segment", unit="image", disable=None):
        try:
            fields = read_fields(
                path, channel_names=names, pixel_size=args.pixel_size, z_step=args.z_step
            )
        except InputError as exc:
            log.error("%s", exc)
            failed.append((str(path), exc.reason))
            continue
        for fld in fields:
            label = f"{path}" + (f" (series {fld.origin.series})" if fld.origin.series else "")
            try:
                targets = _outputs(out_dir, fld.name, args.probabilities)
                if not args.overwrite:
                    existing = [str(p) for p in targets.values() if p.exists()]
                    if existing:
                        raise InputError(
                            f"outputs already exist: {existing}; pass --overwrite to replace them"
                        )
                profile = stage
                if profile is None:
                    if not fld.origin.stage:
                        raise InputError(
                            "the image does not say its stage; pass --stage (e.g. --stage S6)"
                        )
                    profile = get_stage(fld.origin.stage, stages_file=args.stages)
                t0 = time.perf_counter()
                with logged_warnings(log):
                    labels = _segment(fld, profile, model, args, classical)
                _write(fld, labels, targets, args.overwrite)
                done += 1
                log.info(
                    "%s: %d nuclei, %d clusters (%.1f s)",
                    label,
                    int(labels.nuclei.max()),
                    int(labels.clusters.max()),
                    time.perf_counter() - t0,
                )
            except InputError as exc:
                log.error("%s: %s", label, exc.reason if exc.path else exc)
                failed.append((label, exc.reason))
            except (RuntimeError, MemoryError, OSError, ValueError) as exc:
                log.error("%s: failed: %s: %s", label, type(exc).__name__, exc)
                failed.append((label, f"{type(exc).__name__}: {exc}"))
    log.info("segmented %d image(s) into %s", done, out_dir)
    if failed:
        log.error(
            "%d image(s) failed:\n%s", len(failed), "\n".join(f"  {p}: {r}" for p, r in failed)
        )
        return 1
    return 0


def _segment(
    fld: Field,
    profile: StageProfile,
    model: Model | None,
    args: argparse.Namespace,
    classical: bool,
) -> Labels:
    if classical:
        from islet_imaging.segment import segment_field

        return segment_field(
            fld, stage=profile, model="classical", nucleus_diameter_um=args.nucleus_diameter
        )
    from islet_imaging.models.inference import segment_cnn

    assert model is not None
    return segment_cnn(
        fld,
        profile,
        model=model,
        device=args.device,
        nucleus_diameter_um=args.nucleus_diameter,
        return_probabilities=args.probabilities,
        tile=args.tile,
        batch_size=args.batch_size,
        compile=args.compile,
        augment=args.augment,
        block=args.block or None,
    )


def _write(fld: Field, labels: Labels, targets: dict[str, Path], overwrite: bool) -> None:
    import numpy as np

    from islet_imaging.io import Field, Origin, write_labels, write_ome_tiff

    write_labels(targets["nuclei"], labels.nuclei, like=fld, name="nuclei", overwrite=overwrite)
    write_labels(
        targets["clusters"], labels.clusters, like=fld, name="clusters", overwrite=overwrite
    )
    if "probabilities" in targets and labels.probabilities:
        names = tuple(labels.probabilities)
        maps = Field(
            np.stack([labels.probabilities[n] for n in names]).astype(np.float32, copy=False),
            names,
            fld.pixel_size,
            Origin(
                plate=fld.origin.plate,
                well=fld.origin.well,
                field=fld.origin.field,
                stage=fld.origin.stage,
            ),
        )
        write_ome_tiff(targets["probabilities"], maps, overwrite=overwrite)
