#!/usr/bin/env python
"""Fine-tune the default model on real nuclei (DSB 2018 fluorescence) and measure the gain.

What it does (``--work``, default ``runs/finetune_dsb2018``, git-ignored; nothing is copied:
the dataset directories hold symbolic links to the DSB files and a metadata.csv):

1. **Scale study** (``val`` split only): the default model's pooled AP on ``val`` when each image is
   rescaled with (a) the median nucleus diameter of its own mask (an oracle), (b) the classical
   image-only estimate (:func:`islet_imaging.models.classical.estimate_nucleus_diameter`, what
   ``benchmarks/accuracy.py`` uses), (c) the LoG blob scale alone (the CNN inference's estimate
   before this study) and (d) the inference estimate now
   (:func:`islet_imaging.models.inference.estimate_nucleus_diameter_px`, the smaller of (b)
   and (c)).
2. **Before**: the default model on ``test`` (and ``val``).
3. **Fine-tuning** with ``islet-imaging train --init default`` (a subprocess) on all ``train``
   images and on fixed seeded subsets of them (``--subsets 10 30 all``), validating on ``val``
   (best checkpoint by val AP@0.5, thresholds tuned on ``val``).
4. **After**: each fine-tuned model on ``test`` (and ``val``).

DSB images have no pixel size. Each image gets a nominal pixel size ``typical / d`` µm (the
model's typical nucleus diameter, 8.5 µm, over a nucleus diameter ``d`` in px), so that its
nuclei reach the model's scale. ``d`` of the ``val`` and ``test`` images is always the
image-only classical estimate — what a user without annotations has (the test masks are used
for scoring only). ``d`` of the training images is the same image-only estimate (default,
``--train-scale estimate``: the network learns at the scale it is shown at test time) or the
median diameter from the image's own mask (``--train-scale mask``, as
``scripts/make_training_data.py`` does for the default model).

Metrics: pooled AP = tp / (tp + fp + fn) at IoU 0.5 / 0.75 and F1@0.5 from
:func:`islet_imaging.evaluate.evaluate_dataset` (matching by :mod:`islet_imaging.metrics`).
Writes ``benchmarks/results/finetune_dsb2018.json`` and ``.md``.

Usage::

    nohup nice -n 5 .venv/bin/python benchmarks/finetune_dsb2018.py \\
        > runs/finetune_dsb2018.log 2>&1 &
    .venv/bin/python benchmarks/finetune_dsb2018.py --skip-train   # re-evaluate trained models
    .venv/bin/python benchmarks/finetune_dsb2018.py --estimator-study   # estimators only, no CNN

Choices made on ``train`` / ``val`` only: ``--lr 1e-3`` (val AP@0.5 0.701 vs 0.691 for 5e-4 after
150 steps on all train images), image-estimate training scale (``--train-scale``; ``mask`` did
slightly better on val in a later run, 0.715 vs 0.707), schedule lengths from
``--seconds-per-step`` (2.0 s assumed; 1.2-4.5 s per step with validation was seen on the shared
2-core machine) so that onecycle finishes within ``--minutes`` / ``--small-minutes``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("finetune_dsb2018")

#: Stage profile of the DSB images (size filters; nuclei 5-16 µm), as in benchmarks/accuracy.py.
DSB_STAGE = "definitive-endoderm"
#: Seed of the fixed training subsets (a permutation of the sorted train ids; nested subsets).
SUBSET_SEED = 2018


# -- data ------------------------------------------------------------------------------------------
def read_split(dsb: Path) -> dict[str, list[str]]:
    """Image ids of each split of ``dsb/split.csv`` (sorted)."""
    out: dict[str, list[str]] = {}
    with (dsb / "split.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["split"], []).append(row["id"])
    return {k: sorted(v) for k, v in out.items()}


def mask_diameter_px(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (px) of the objects of a label image (None: no object)."""
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    counts = counts[counts > 0]
    return float(np.median(np.sqrt(4.0 * counts / math.pi))) if counts.size else None


def diameters(dsb: Path, ids: list[str], cache: Path) -> dict[str, dict[str, float | None]]:
    """Nucleus diameters (px) of each image: ``mask`` (median of its own mask), ``estimate``
    (classical, Otsu objects) and ``log`` (LoG blob scale alone).

    Cached as JSON in ``cache`` (the estimators are deterministic).
    """
    from islet_imaging.io import read_field, read_labels
    from islet_imaging.models.classical import estimate_nucleus_diameter
    from islet_imaging.models.inference import _blob_diameter_px

    known: dict[str, dict[str, float | None]] = (
        json.loads(cache.read_text()) if cache.is_file() else {}
    )
    todo = [i for i in ids if i not in known]
    for image_id in todo:
        img = read_field(dsb / "images" / f"{image_id}.png", channel_names=("DAPI",)).data[0, 0]
        known[image_id] = {
            "mask": mask_diameter_px(read_labels(dsb / "masks" / f"{image_id}.tif")),
            "estimate": estimate_nucleus_diameter(img),
            "log": _blob_diameter_px(img),
        }
    if todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    return {i: known[i] for i in ids}


def scale_of(d: dict[str, float | None], how: str) -> float:
    """The diameter (px) used to rescale an image; the classical estimate falls back to LoG."""
    if how == "estimate" and d["estimate"] is None:
        return float(d["log"])  # type: ignore[arg-type]
    value = d[how]
    if value is None:
        raise ValueError(f"no {how} diameter")
    return float(value)


def link_dataset(
    out: Path,
    dsb: Path,
    ids: list[str],
    diam_px: dict[str, float],
    *,
    typical_um: float,
) -> Path:
    """A dataset directory of symbolic links to DSB images and masks, with pixel sizes.

    Each image's nominal pixel size is ``typical_um / diam_px[id]``. Images whose mask is empty
    are left out. Rewritten from scratch each time (links and metadata.csv only).
    """
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).iterdir():
            if old.is_symlink():
                old.unlink()
    rows = []
    for image_id in ids:
        for link, target in (
            (out / "images" / f"{image_id}.png", dsb / "images" / f"{image_id}.png"),
            (out / "labels" / f"{image_id}_nuclei.tif", dsb / "masks" / f"{image_id}.tif"),
        ):
            link.symlink_to(target.resolve())
        rows.append([image_id, DSB_STAGE, f"{typical_um / diam_px[image_id]:.6f}", "", "DAPI"])
    with (out / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "stage", "pixel_size_um", "z_step_um", "channel_names"])
        w.writerows(rows)
    return out


def subset_ids(train_ids: list[str], n: int | None) -> list[str]:
    """The first ``n`` of a fixed seeded permutation of the train ids (all for ``None``)."""
    if n is None or n >= len(train_ids):
        return list(train_ids)
    order = np.random.default_rng(SUBSET_SEED).permutation(len(train_ids))
    return sorted(train_ids[int(i)] for i in order[:n])


# -- evaluation ------------------------------------------------------------------------------------
def evaluate(model: str | Path, data: Path, *, threads: int) -> dict[str, float]:
    """Pooled nuclei AP@0.5, AP@0.75, F1@0.5 of one model on one dataset directory."""
    import torch

    from islet_imaging.evaluate import evaluate_dataset

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ev = evaluate_dataset([str(model)], [data], thresholds=(0.5, 0.75), device="cpu")
    if ev.failures:
        raise RuntimeError(f"{len(ev.failures)} image(s) of {data} failed: {ev.failures[0]}")
    p = ev.pooled()[ev.models[0]]["nuclei"]
    res = {
        "ap50": float(p["ap@0.5"]),
        "ap75": float(p["ap@0.75"]),
        "f1_50": float(p["f1@0.5"]),
        "n_images": int(p["n_images"]),
        "n_true": int(p["n_true"]),
        "n_pred": int(p["n_pred"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("%s on %s: %s", model, data.name, res)
    return res


# -- training --------------------------------------------------------------------------------------
def islet_imaging_command() -> list[str]:
    exe = Path(sys.executable).with_name("islet-imaging")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "islet_imaging"]


def plan(minutes: float, args: argparse.Namespace) -> tuple[int, int]:
    """(epochs, steps per epoch) whose schedule fits ``minutes`` at ``--seconds-per-step``."""
    steps = max(args.steps_per_epoch, int(minutes * 60.0 / args.seconds_per_step))
    return max(1, round(steps / args.steps_per_epoch)), args.steps_per_epoch


def train(
    name: str, data: Path, val: Path, minutes: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Fine-tune the default model on ``data``; returns where it went and how long it took."""
    out = args.work / "models" / name
    run_dir = args.work / "runs" / name
    epochs, per_epoch = plan(minutes, args)
    cmd = [
        *islet_imaging_command(),
        "-v",
        "train",
        "--data",
        str(data),
        "--val",
        str(val),
        "--out",
        str(out),
        "--overwrite",
        "--run-dir",
        str(run_dir),
        "--init",
        "default",
        "--epochs",
        str(epochs),
        "--steps-per-epoch",
        str(per_epoch),
        "--batch-size",
        str(args.batch_size),
        "--patch-size",
        str(args.patch_size),
        "--lr",
        str(args.lr),
        "--schedule",
        args.schedule,
        "--scale-jitter",
        str(args.scale_jitter),
        "--patience",
        str(args.patience),
        "--max-val-images",
        str(args.max_val_images),
        "--max-minutes",
        str(minutes),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
        "--no-progress",
    ]
    log.info("training %s: %s", name, " ".join(cmd))
    t0 = time.perf_counter()
    with (args.work / f"train_{name}.log").open("w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "train_log.csv").open(newline="") as fh:
        history = list(csv.DictReader(fh))
    res = {
        "model": str(out),
        "command": " ".join(cmd),
        "planned_steps": epochs * per_epoch,
        "steps": int(float(history[-1]["step"])) if history else 0,
        "best_step": summary["best_step"],
        "train_loop_minutes": round(float(history[-1]["seconds"]) / 60.0, 2) if history else 0.0,
        "wall_minutes": round(wall / 60.0, 2),
        "val_tuned": summary.get("validation", {}),
        "history": [
            {"step": int(float(h["step"])), "val_ap50": float(h["val_nuclei_ap50"] or "nan")}
            for h in history
        ],
    }
    log.info("trained %s in %.1f min: %s", name, wall / 60.0, {k: res[k] for k in list(res)[2:6]})
    return res


# -- report ----------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["### Scale study (default model, DSB `val`, 42 images)", ""]
    lines += [
        "| diameter used to rescale | median error vs mask | within ±25 % | worst | val AP@0.5 | val AP@0.75 | val F1@0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.get("scale_study", []):
        lines.append(
            f"| {row['how']} | {_f(row.get('median_abs_rel_err'), '.1%')} | "
            f"{_f(row.get('within_25pct'), '.0%')} | {_f(row.get('max_ratio'), '.2f')}× | "
            f"{_f(row['ap50'])} | {_f(row['ap75'])} | "
            f"{_f(row['f1_50'])} |"
        )
    if result.get("estimator_study"):
        names = {
            "estimate": "classical (Otsu objects)",
            "log": "LoG blob scale alone (old inference estimate)",
            "inference": "inference estimate now: min of both",
        }
        lines += ["", "### Image-only diameter estimators (no CNN)", ""]
        lines += [
            "| set | estimator | images | median error | within ±25 % | worst |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["estimator_study"]:
            lines.append(
                f"| {row['set']} | {names[row['estimator']]} | {row['images']} | "
                f"{_f(row['median_abs_rel_err'], '.1%')} | {_f(row['within_25pct'], '.0%')} | "
                f"{_f(row['max_ratio'], '.2f')}× |"
            )
    lines += ["", "### Fine-tuning", ""]
    lines += [
        "| model | train images | training minutes (wall) | steps | val AP@0.5 | test AP@0.5 | test AP@0.75 | test F1@0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    variants = result.get("variants", [])
    for row in [*sorted(result.get("rows", []), key=lambda r: r["train_images"]), *variants]:
        tr = row.get("train") or {}
        lines.append(
            f"| {row['name']} | {row['train_images']} | {_f(tr.get('wall_minutes'), '.1f')} | "
            f"{tr.get('steps', '–')} | {_f(row.get('val', {}).get('ap50'))} | "
            f"{_f(row.get('test', {}).get('ap50'))} | {_f(row.get('test', {}).get('ap75'))} | "
            f"{_f(row.get('test', {}).get('f1_50'))} |"
        )
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """``value`` with NaN floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(result: dict[str, Any], args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "finetune_dsb2018.json").write_text(
        json.dumps(_plain(result), indent=2, default=str, allow_nan=False) + "\n"
    )
    (args.results / "finetune_dsb2018.md").write_text(to_markdown(result))


# -- main ------------------------------------------------------------------------------------------
def scale_study(
    dsb: Path,
    val_ids: list[str],
    diam: dict[str, dict[str, float | None]],
    args: argparse.Namespace,
    typical: float,
) -> list[dict[str, Any]]:
    """The default model on ``val`` rescaled by each kind of nucleus diameter."""
    from islet_imaging.io import read_field
    from islet_imaging.models.inference import estimate_nucleus_diameter_px

    inference = {
        i: estimate_nucleus_diameter_px(
            read_field(dsb / "images" / f"{i}.png", channel_names=("DAPI",)).data[0, 0]
        )
        for i in val_ids
    }
    rows = []
    for how, label in (
        ("mask", "median of the image's own mask (oracle)"),
        ("estimate", "classical estimate (Otsu objects; used for val/test)"),
        ("log", "LoG blob scale alone (the inference estimate before this study)"),
        ("inference", "inference estimate now: min(Otsu objects, LoG)"),
    ):
        d = {i: inference[i] if how == "inference" else scale_of(diam[i], how) for i in val_ids}
        # |log(estimate / mask diameter)|: symmetric in over- and underestimates
        err = np.abs(np.log([d[i] / float(diam[i]["mask"] or 1.0) for i in val_ids]))
        data = link_dataset(args.work / "data" / f"val_{how}", dsb, val_ids, d, typical_um=typical)
        res = evaluate("default", data, threads=args.threads)
        rows.append(
            {
                "how": label,
                "key": how,
                "median_abs_rel_err": float(np.exp(np.median(err)) - 1.0),
                "within_25pct": float(np.mean(err <= math.log(1.25))),
                "max_ratio": float(np.exp(err.max())),
                **res,
            }
        )
    return rows


def estimator_study(
    diam: dict[str, dict[str, float | None]], train_ids: list[str]
) -> list[dict[str, Any]]:
    """Image-only nucleus diameter estimators against the truth, without the CNN.

    DSB ``train`` images (truth: median diameter of each mask) and synthetic fields of every
    stage (tuning seeds 1000-1001 at 0.45, 0.65 and 0.85 µm/px, 384² px; truth: the synthetic
    nuclei). Errors are ratios estimate / truth.
    """
    from islet_imaging.models.classical import estimate_nucleus_diameter
    from islet_imaging.models.inference import _blob_diameter_px
    from islet_imaging.stages import BUILTIN_STAGES
    from islet_imaging.synth import generate_field

    sets: dict[str, list[tuple[float, float | None, float]]] = {
        "DSB train (439 images)": [
            (float(diam[i]["mask"]), diam[i]["estimate"], float(diam[i]["log"]))  # type: ignore[arg-type]
            for i in train_ids
        ],
        "synthetic, 8 stages x 2 seeds x 3 pixel sizes": [],
    }
    for profile in BUILTIN_STAGES:
        for seed in (1000, 1001):
            for px in (0.45, 0.65, 0.85):
                s = generate_field(profile.name, seed=seed, size=384, z=1, pixel_size_um=px)
                img = s.field.data[0, 0]
                sets["synthetic, 8 stages x 2 seeds x 3 pixel sizes"].append(
                    (
                        float(mask_diameter_px(s.nuclei[0])),
                        estimate_nucleus_diameter(img),
                        _blob_diameter_px(img),
                    )  # type: ignore[arg-type]
                )
    rows = []
    for name, data in sets.items():
        for how in ("estimate", "log", "inference"):
            ratios = []
            for truth, objects, blob in data:
                est = {
                    "estimate": objects if objects is not None else blob,
                    "log": blob,
                    "inference": blob if objects is None else min(objects, blob),
                }[how]
                ratios.append(est / truth)
            err = np.abs(np.log(np.asarray(ratios)))
            rows.append(
                {
                    "set": name,
                    "estimator": how,
                    "images": len(ratios),
                    "median_abs_rel_err": float(np.exp(np.median(err)) - 1.0),
                    "within_25pct": float(np.mean(err <= math.log(1.25))),
                    "max_ratio": float(np.exp(err.max())),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dsb", type=Path, default=REPO.parent / "shared" / "data" / "dsb2018_fluo")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "finetune_dsb2018")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument(
        "--subsets",
        nargs="+",
        default=["10", "30", "all"],
        help="training set sizes: numbers of train images (fixed seeded subsets) or 'all'",
    )
    p.add_argument(
        "--minutes", type=float, default=25.0, help="training budget of the full train set"
    )
    p.add_argument(
        "--small-minutes",
        type=float,
        default=8.0,
        help="training budget of each subset of --small-max images or fewer",
    )
    p.add_argument(
        "--small-max", type=int, default=100, help="subsets up to this size use --small-minutes"
    )
    p.add_argument(
        "--train-scale",
        choices=("estimate", "mask"),
        default="estimate",
        help="nucleus diameter that scales the training images (val/test: always 'estimate')",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (chosen on val)")
    p.add_argument("--schedule", default="onecycle", choices=("onecycle", "cosine", "constant"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--scale-jitter", type=float, default=0.2)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument(
        "--seconds-per-step",
        type=float,
        default=2.0,
        help="expected seconds per step incl. validation; sets the schedule length so that it "
        "ends within the budget (--max-minutes stops a slower run after the epoch that crosses it)",
    )
    p.add_argument("--patience", type=int, default=0, help="early stopping (0 = never)")
    p.add_argument(
        "--max-val-images", type=int, default=42, help="val images per epoch (all 42 by default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-train", action="store_true", help="evaluate already trained models")
    p.add_argument("--skip-scale-study", action="store_true")
    p.add_argument(
        "--estimator-study",
        action="store_true",
        help="only compare the image-only diameter estimators (no CNN) and add the result to "
        "the existing results files",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    args.work = args.work.resolve()
    typical = float(
        json.loads((REPO / "models" / "default" / "config.json").read_text())[
            "typical_nucleus_diameter_um"
        ]
    )
    split = read_split(args.dsb)
    t0 = time.perf_counter()
    diam = diameters(
        args.dsb, split["train"] + split["val"] + split["test"], args.work / "diameters.json"
    )
    log.info("nucleus diameters of %d images in %.0f s", len(diam), time.perf_counter() - t0)
    result_path = args.results / "finetune_dsb2018.json"
    keep = args.skip_train or args.estimator_study
    result: dict[str, Any] = (
        json.loads(result_path.read_text()) if keep and result_path.is_file() else {}
    )
    if args.estimator_study:
        result["estimator_study"] = estimator_study(diam, split["train"])
        write(result, args)
        print(to_markdown(result))
        return 0
    result.update({"argv": sys.argv[1:], "typical_nucleus_diameter_um": typical})
    est = {i: scale_of(diam[i], "estimate") for i in diam}
    val = link_dataset(args.work / "data" / "val", args.dsb, split["val"], est, typical_um=typical)
    test = link_dataset(
        args.work / "data" / "test", args.dsb, split["test"], est, typical_um=typical
    )
    if not args.skip_scale_study:
        result["scale_study"] = scale_study(args.dsb, split["val"], diam, args, typical)
        write(result, args)
    rows = {r["name"]: r for r in result.get("rows", [])}
    rows["default (before)"] = {
        "name": "default (before)",
        "train_images": 0,
        "train": None,
        "val": evaluate("default", val, threads=args.threads),
        "test": evaluate("default", test, threads=args.threads),
    }
    result["rows"] = list(rows.values())
    write(result, args)
    train_scale = {i: scale_of(diam[i], args.train_scale) for i in split["train"]}
    for spec in args.subsets:
        n = None if spec == "all" else int(spec)
        ids = subset_ids(split["train"], n)
        name = f"train{len(ids)}"
        data = link_dataset(
            args.work / "data" / name, args.dsb, ids, train_scale, typical_um=typical
        )
        minutes = args.small_minutes if len(ids) <= args.small_max else args.minutes
        row = rows.get(f"fine-tuned on {len(ids)}", {})
        if not args.skip_train:
            row = {"train": train(name, data, val, minutes, args)}
        model = args.work / "models" / name
        if not (model / "config.json").is_file():
            log.warning("%s: no trained model; skipped", model)
            continue
        row.update(
            {
                "name": f"fine-tuned on {len(ids)}",
                "train_images": len(ids),
                "train_ids": ids,
                "val": evaluate(model, val, threads=args.threads),
                "test": evaluate(model, test, threads=args.threads),
            }
        )
        rows[row["name"]] = row
        result["rows"] = list(rows.values())
        write(result, args)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
