#!/usr/bin/env python
"""Choose a model's post-processing thresholds on tuning data that training and benchmarks never use.

The network runs once per image; the post-processing is then repeated on the cached maps for
every candidate value.

``--tune clusters`` (default): ``clusters_saddle`` (the combined cluster split) over
``--saddles``, × ``clusters_foreground`` over ``--cluster-foregrounds`` if given, on 2D fields
of every colony and aggregate stage (monolayer patches are not split). Best: the pooled cluster
AP@0.5 (ties: the better AP@0.75, then the value closest to the model's current one). Then
``clusters_absorb_size`` × ``clusters_absorb_contact`` (small pieces mostly enclosed by a large
neighbour join it) over ``--absorb-sizes`` × ``--absorb-contacts`` on the same fields. Then
``clusters_outline`` (the lower level clusters grow to after the split) over ``--outlines``:
the smallest bias of the matched clusters' diameters (mean over the stages).

``--tune nuclei``: first ``nuclei_foreground`` × ``nuclei_seed`` over ``--foregrounds`` ×
``--seed-levels``, on two sets of 2D images: fields of all 8 stages, and the DSB 2018
fluorescence ``val`` split (``--dsb``; skipped when absent), each image rescaled by its
estimated nucleus diameter as in ``benchmarks/accuracy.py``. Best: the mean over the sets of
the pooled nuclei AP@0.5 (ties: the mean AP@0.75). Then ``nuclei_min_section`` (the size floor
of nuclei in 2D sections through aggregates) over ``--min-sections``, on the 2D fields of the
aggregate stages, the only images it acts on (best: pooled AP@0.5). Then the z-stack levels
``nuclei_foreground_3d`` × ``nuclei_seed_3d`` × ``nuclei_end_plane_3d`` over
``--foregrounds-3d`` × ``--seed-levels-3d`` × ``--end-planes-3d`` on z-stacks (5 planes 2 µm
apart) of the aggregate stages, from the first ``--n-3d`` seeds: the best pooled AP@0.5 (ties:
AP@0.75).

After each search it prints why objects went unmatched at IoU 0.5 with the best values
(:func:`islet_imaging.metrics.error_kinds`: missed, split, merged, ...).

Synthetic tuning fields: seeds ``--seeds`` (default 1100-1115: neither training seeds 0-1099
nor the held-out benchmark seeds >= 9000), ``--size``² px, each at a pixel size drawn uniformly
from ``--pixel-size-range`` µm.

Usage::

    .venv/bin/python scripts/tune_postprocess.py --model models/default
    .venv/bin/python scripts/tune_postprocess.py --model models/default --tune nuclei --write
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import logging
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger("tune_postprocess")
REPO = Path(__file__).resolve().parents[1]


class Cached(NamedTuple):
    """One tuning image: its set, group (stage), the network's maps and the truth of one class."""

    set: str
    group: str
    field: object
    profile: object
    maps: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    truth: np.ndarray
    nucleus_diameter: float | None = None


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    try:
        return list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a seed range; give FIRST-LAST, e.g. 1100-1115"
        ) from None


def _cache(
    model,
    s,
    profile,
    set_name: str,
    cls_name: str,
    diameter: float | None = None,
    *,
    augment: bool = False,
) -> Cached:
    """The maps of one image (for nuclei without the cluster maps, which nuclei do not depend on)."""
    from islet_imaging.models.inference import predict_field_maps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DSB images have no pixel size: warned, expected
        maps, spacing = predict_field_maps(
            s.field,
            profile,
            model,
            nucleus_diameter_um=diameter,
            augment=augment,
            dtype=np.float16,
        )
    if cls_name == "nuclei":
        maps = {k: v for k, v in maps.items() if k.startswith("nuclei_")}
    truth = getattr(s, cls_name)
    return Cached(set_name, profile.short_name, s.field, profile, maps, spacing, truth, diameter)


def tuning_maps(model, args: argparse.Namespace, cls_name: str) -> list[Cached]:
    """Network maps of the tuning images of one class (see the module docstring)."""
    from islet_imaging.stages import BUILTIN_STAGES
    from islet_imaging.synth import generate_field

    rng = np.random.default_rng(0)
    aug = args.augment
    cached = []
    for profile in BUILTIN_STAGES:
        if cls_name == "clusters" and profile.cluster_kind == "monolayer-patch":
            continue
        for seed in args.seeds:
            px = float(rng.uniform(*args.pixel_size_range))
            s = generate_field(profile.name, seed=seed, size=args.size, pixel_size_um=px)
            cached.append(_cache(model, s, profile, "synthetic 2D", cls_name, augment=aug))
        if cls_name == "nuclei" and profile.cluster_kind == "aggregate":
            for seed in args.seeds[: args.n_3d]:
                px = float(rng.uniform(*args.pixel_size_range))
                s = generate_field(
                    profile.name, seed=seed, size=args.size // 2, z=5, pixel_size_um=px
                )
                cached.append(_cache(model, s, profile, "synthetic 3D", cls_name, augment=aug))
        log.info("%s: maps of the tuning fields", profile.short_name)
    if cls_name == "nuclei":
        cached += dsb_maps(model, args.dsb, augment=aug)
    return cached


def dsb_maps(model, root: Path, *, augment: bool = False) -> list[Cached]:
    """Maps of the DSB 2018 ``val`` split (none when ``root`` is absent)."""
    from islet_imaging.io import read_field, read_labels
    from islet_imaging.models.classical import estimate_nucleus_diameter
    from islet_imaging.stages import get_stage

    if not (root / "split.csv").is_file():
        log.warning("%s not found: tuning without DSB 2018 val", root)
        return []
    with (root / "split.csv").open(newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh) if r["split"] == "val"]
    profile = get_stage("S1")  # the stage benchmarks/accuracy.py scores DSB images with
    out = []
    for image_id in ids:
        fld = read_field(root / "images" / f"{image_id}.png", channel_names=("DAPI",))
        image = _Image(fld, read_labels(root / "masks" / f"{image_id}.tif"))
        diameter = estimate_nucleus_diameter(fld.data[0, 0])
        out.append(
            _cache(model, image, profile, "DSB 2018 val", "nuclei", diameter, augment=augment)
        )
    log.info("DSB 2018 val: maps of %d images", len(out))
    return out


class _Image(NamedTuple):
    field: object
    nuclei: np.ndarray


def _instances(c: Cached, model, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and cluster labels of one cached image at these thresholds."""
    from islet_imaging.models.inference import field_instances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return field_instances(
            c.maps,
            c.spacing,
            c.field,
            c.profile,
            model,
            thresholds=thresholds,
            nucleus_diameter_um=c.nucleus_diameter,
        )


def pooled_ap(
    cached: list[Cached], model, thresholds, cls_name: str, errors: list | None = None
) -> dict[str, tuple[float, float]]:
    """Pooled AP@0.5 and AP@0.75 per set and per group (stage) of the first set.

    Each image is matched once; its matching is pooled into its set and its group. ``errors``,
    when given, receives why objects of each image of the first set went unmatched at IoU 0.5
    (:func:`islet_imaging.metrics.error_kinds`).
    """
    from islet_imaging.metrics import error_kinds, match, pool_matchings

    per_key: dict[str, list] = defaultdict(list)
    first = cached[0].set
    for c in cached:
        nuclei, clusters = _instances(c, model, thresholds)
        m = match(c.truth, nuclei if cls_name == "nuclei" else clusters, thresholds=(0.5, 0.75))
        per_key[c.set].append(m)
        if c.set == first:
            per_key[c.group].append(m)
            if errors is not None:
                pred = nuclei if cls_name == "nuclei" else clusters
                errors.append(error_kinds(c.truth, pred, threshold=0.5))
    return {
        k: tuple(float(pool_matchings([img[i] for img in v]).ap) for i in (0, 1))
        for k, v in per_key.items()
    }


def _grid(axes: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every combination of the candidate values of each threshold."""
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def search(
    cached: list[Cached], candidates: list[dict[str, float]], model, base, cls_name: str
) -> dict[str, float]:
    """Print the AP of every candidate (a markdown table) and return the best one.

    One set: its pooled AP@0.5 (ties: AP@0.75), with a column per stage. Several sets: the mean
    over the sets of their pooled AP@0.5 (ties: the mean AP@0.75). Last tie-break: the candidate
    closest to the current values.
    """
    errors: list[list[dict[str, int]]] = [[] for _ in candidates]
    results = [
        pooled_ap(cached, model, dataclasses.replace(base, **c), cls_name, e)
        for c, e in zip(candidates, errors, strict=True)
    ]
    sets = list(dict.fromkeys(c.set for c in cached))
    cols = [k for k in results[0] if k not in sets] if len(sets) == 1 else sets

    def score(row: dict[str, tuple[float, float]]) -> tuple[float, ...]:
        return tuple(round(float(np.mean([row[s][i] for s in sets])), 4) for i in (0, 1))

    names = list(candidates[0])
    current = {n: getattr(base, n) for n in names}
    for n in names:  # an unset z-stack level is the 2D one
        if current[n] is None:
            current[n] = getattr(base, n.removesuffix("_3d"))
    print(f"\n{' + '.join(sets)}:")
    header = [*names, *(f"{c} AP@0.5" for c in cols), "AP@0.5", "AP@0.75"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for cand, row in zip(candidates, results, strict=True):
        values = [f"{cand[n]:g}" for n in names] + [f"{row[c][0]:.3f}" for c in cols]
        print("| " + " | ".join([*values, *(f"{v:.3f}" for v in score(row))]) + " |")
    if len(sets) > 1:
        print(f"(last two columns: the mean over the {len(sets)} sets)")
    k_best = max(
        range(len(candidates)),
        key=lambda k: (
            score(results[k]),
            -sum(abs(v - current[n]) for n, v in candidates[k].items()),
        ),
    )
    print(f"best: {candidates[k_best]} (current {current})")
    from islet_imaging.metrics import pool_error_kinds

    print(
        f"unmatched at IoU 0.5 there ({sets[0]}): "
        + ", ".join(f"{k} {v}" for k, v in pool_error_kinds(errors[k_best]).items())
    )
    return candidates[k_best]


def outline_search(cached: list[Cached], levels: list[float], model, base) -> dict[str, float]:
    """Print how far cluster sizes are off at each ``clusters_outline`` level; return the best.

    For every true cluster away from the field's edge that a predicted cluster matches at IoU
    0.5: the relative error of its equivalent diameter
    (:func:`islet_imaging.metrics.diameter_errors`). Its mean per stage is that stage's bias
    (what moves a well's total IEQ); best: the smallest mean over the stages of the absolute
    bias (:func:`islet_imaging.metrics.size_bias`; within 0.1 % of it, which is noise, the
    higher level, the smaller change). A level at or above
    ``clusters_foreground`` is the foreground's own outline (``None``).
    """
    from islet_imaging.metrics import diameter_errors, match, pool_matchings, size_bias

    fg = base.clusters_foreground
    candidates = sorted({fg, *(min(level, fg) for level in levels)}, reverse=True)
    rows = []
    for level in candidates:
        th = dataclasses.replace(base, clusters_outline=None if level >= fg else level)
        errors: dict[str, list[float]] = defaultdict(list)
        matchings = []
        for c in cached:
            _, clusters = _instances(c, model, th)
            matchings.append(match(c.truth, clusters, thresholds=(0.5, 0.75)))
            errors[c.group].extend(diameter_errors(c.truth, clusters))
        ap = [float(pool_matchings([m[i] for m in matchings]).ap) for i in (0, 1)]
        rows.append((level, errors, size_bias(errors), ap))
    groups = list(rows[0][1])
    print("\nclusters_outline: bias of matched clusters' diameters (mean relative error):")
    header = ["clusters_outline", *groups, "mean abs bias", "AP@0.5", "AP@0.75"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for level, errors, bias, ap in rows:
        cells = [f"{100 * np.mean(errors[g]):+.1f} %" for g in groups]
        name = f"{level:g}" + (" (off)" if level >= fg else "")
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {100 * bias:.2f} % | {ap[0]:.3f} | {ap[1]:.3f} |"
        )
    level = min(rows, key=lambda r: (round(r[2], 3), -r[0]))[0]  # ties: within 0.1 %
    best = {"clusters_outline": None if level >= fg else level}
    print(f"best: {best} (current {{'clusters_outline': {base.clusters_outline}}})")
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/default", help="model directory")
    p.add_argument("--tune", choices=("clusters", "nuclei"), default="clusters")
    p.add_argument("--seeds", type=_seeds, default=_seeds("1100-1115"), help="e.g. 1100-1115")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pixel-size-range", type=float, nargs=2, default=(0.5, 0.8))
    for flag, default, what in (
        ("--saddles", [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5], "clusters_saddle"),
        ("--cluster-foregrounds", None, "clusters_foreground (default: current)"),
        ("--foregrounds", [0.3, 0.4, 0.5], "nuclei_foreground"),
        ("--seed-levels", [0.5, 0.55, 0.6, 0.65], "nuclei_seed"),
        ("--foregrounds-3d", [0.3, 0.4, 0.5], "nuclei_foreground_3d"),
        ("--seed-levels-3d", [0.6, 0.65, 0.7, 0.75], "nuclei_seed_3d"),
        ("--end-planes-3d", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "nuclei_end_plane_3d"),
        ("--absorb-sizes", [0.0, 0.05, 0.1, 0.15, 0.2], "clusters_absorb_size"),
        ("--absorb-contacts", [0.2, 0.3, 0.4, 0.5], "clusters_absorb_contact"),
        ("--outlines", [0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3], "clusters_outline"),
        (
            "--min-sections",
            [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0],
            "nuclei_min_section",
        ),
    ):
        name, _, note = what.partition(" ")
        mode = name.partition("_")[0]
        p.add_argument(
            flag,
            type=float,
            nargs="+",
            default=default,
            help=f"{name} candidates (--tune {mode}) {note}".rstrip(),
        )
    p.add_argument("--n-3d", type=int, default=4, help="z-stacks per aggregate stage (nuclei)")
    p.add_argument("--dsb", type=Path, default=REPO.parent / "shared" / "data" / "dsb2018_fluo")
    p.add_argument("--write", action="store_true", help="write the best values to thresholds.json")
    p.add_argument(
        "--augment",
        action="store_true",
        help="maps with test-time augmentation (mirror images averaged; 4x the network time)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from islet_imaging.errors import InputError
    from islet_imaging.models import load_model

    try:
        model = load_model(Path(args.model))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = model.thresholds
    cached = tuning_maps(model, args, args.tune)
    if args.tune == "clusters":
        fgs = args.cluster_foregrounds or [base.clusters_foreground]
        axes = {"clusters_foreground": fgs, "clusters_saddle": args.saddles}
        best = search(cached, _grid(axes), model, base, "clusters")
        axes = {
            "clusters_absorb_size": args.absorb_sizes,
            "clusters_absorb_contact": args.absorb_contacts,
        }
        best |= search(cached, _grid(axes), model, dataclasses.replace(base, **best), "clusters")
        best |= outline_search(cached, args.outlines, model, dataclasses.replace(base, **best))
    else:
        flat = [c for c in cached if c.set != "synthetic 3D"]
        axes = {"nuclei_foreground": args.foregrounds, "nuclei_seed": args.seed_levels}
        best = search(flat, _grid(axes), model, base, "nuclei")
        sections = [
            c for c in flat if c.set == "synthetic 2D" and c.profile.cluster_kind == "aggregate"
        ]
        axes = {"nuclei_min_section": args.min_sections}
        best |= search(sections, _grid(axes), model, dataclasses.replace(base, **best), "nuclei")
        stacks = [c for c in cached if c.set == "synthetic 3D"]
        if not stacks:  # --n-3d 0
            return _finish(args, base, best)
        axes = {
            "nuclei_foreground_3d": args.foregrounds_3d,
            "nuclei_seed_3d": args.seed_levels_3d,
            "nuclei_end_plane_3d": args.end_planes_3d,
        }
        best |= search(stacks, _grid(axes), model, dataclasses.replace(base, **best), "nuclei")
    return _finish(args, base, best)


def _finish(args: argparse.Namespace, base, best: dict[str, float]) -> int:
    """Write the best values to the model's ``thresholds.json`` when ``--write`` is given."""
    if args.write:
        from islet_imaging.models._modeldir import write_thresholds

        path = write_thresholds(args.model, dataclasses.replace(base, **best))
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
