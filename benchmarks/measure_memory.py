"""Peak memory and time of the measurement step (``score.measure_field``) on large fields.

The synthetic 1024² S6 field (DAPI, INS, NKX6.1, GCG) and its truth labels are tiled to each
``--sizes``² (label ids made unique per tile), then measured as ``score`` measures a field, each
size in a fresh subprocess. ``before_mb``: resident once field and labels are made; ``peak_mb``:
``VmHWM`` from then on (restarted after set-up where Linux allows it).

``--score``: the whole ``islet-imaging score`` job instead (read, segment with the default
model, measure, write the tables) on the tiled field written as an OME-TIFF, each size in a
fresh process; ``peak_mb`` is that process's ``VmHWM``, ``field_mb`` the field's own size.

Usage::

    .venv/bin/python benchmarks/measure_memory.py --sizes 2048 4096 8192 16384 \\
        --json benchmarks/results/measure_memory.json
    .venv/bin/python benchmarks/measure_memory.py --score --sizes 4096 16384 \\
        --json benchmarks/results/score_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import _reset_peak, _status_mb  # noqa: E402


def _tile_ids(labels: np.ndarray, k: int) -> np.ndarray:
    """``labels`` (1, Y, X) tiled k × k, each tile's ids offset so that ids stay unique."""
    _, h, w = labels.shape
    top = int(labels.max())
    out = np.zeros((1, h * k, w * k), np.int32)
    for i in range(k):
        for j in range(k):
            tile = labels[0].astype(np.int32)
            tile[tile > 0] += (i * k + j) * top
            out[0, i * h : (i + 1) * h, j * w : (j + 1) * w] = tile
    return out


def _tiled_field(size: int):
    """The synthetic 1024² S6 field and its truth labels tiled k × k, k = size // 1024."""
    from islet_imaging.segment import Labels
    from islet_imaging.synth import generate_field

    base = generate_field("S6", seed=0, size=1024, pixel_size_um=0.65)
    k = max(1, size // 1024)
    fld = base.field.with_data(np.tile(base.field.data, (1, 1, k, k)))
    return fld, Labels(_tile_ids(base.nuclei, k), _tile_ids(base.clusters, k), {}, "truth")


def score_child(path: Path, out: Path) -> None:
    """Run ``islet-imaging score`` on one image in this process and print its record as JSON."""
    import pandas as pd

    from islet_imaging.cli import main as cli_main

    t0 = time.perf_counter()
    rc = cli_main(["score", str(path), "--stage", "S6", "--out", str(out), "--no-progress"])
    record = {
        "exit_code": rc,
        "peak_mb": round(_status_mb("VmHWM"), 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "cells": len(pd.read_parquet(out / "cells.parquet", columns=["cell_id"])),
        "clusters": len(pd.read_parquet(out / "clusters.parquet", columns=["cluster_id"])),
    }
    print(json.dumps(record))


def score_run(size: int, workdir: Path) -> dict:
    """Write the tiled field as an OME-TIFF, then score it in a fresh process."""
    from islet_imaging.io import write_ome_tiff

    fld, _ = _tiled_field(size)
    path = write_ome_tiff(workdir / f"mosaic_{size}.ome.tif", fld, overwrite=True)
    record = {
        "size": size,
        "field_mb": round(fld.data.nbytes / 2**20, 1),
        "file_mb": round(path.stat().st_size / 2**20, 1),
    }
    del fld
    cmd = [sys.executable, __file__, "--score-child", str(path), str(workdir / f"out_{size}")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    record.update(json.loads(out.stdout.strip().splitlines()[-1]))
    path.unlink()
    return record


def child(size: int) -> None:
    """Measure one tiled field and print its record as JSON."""
    import gc

    from islet_imaging.score import measure_field

    fld, labels = _tiled_field(size)
    gc.collect()
    _reset_peak()
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    result = measure_field(fld, labels, stage="S6")
    record = {
        "size": size,
        "channels": list(fld.channel_names),
        "before_mb": round(before, 1),
        "peak_mb": round(_status_mb("VmHWM"), 1),
        "bytes_per_pixel": round((_status_mb("VmHWM") - before) * 2**20 / size**2, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "cells": len(result.cells),
        "clusters": len(result.clusters),
    }
    print(json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--score", action="store_true", help="the whole `islet-imaging score` job (see above)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--score-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.score_child:
        score_child(*args.score_child)
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            if args.score:
                runs.append(score_run(size, Path(tmp)))
            else:
                cmd = [sys.executable, __file__, "--child", str(size)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
