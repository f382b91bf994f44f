"""Speed and peak memory of the CNN segmenter, against the classical baseline, on this CPU.

Measures, on a synthetic 1024×1024 S6 field (DAPI + INS, at the model's pixel size so no
rescaling happens):

- the network's forward pass on the 2-channel input: eager, BatchNorm folded, folded +
  channels-last, folded + channels-last + ``torch.compile`` (compile time reported apart);
  FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` → achieved GFLOP/s;
- tiled prediction (:func:`predict_maps`, default tiling) and post-processing
  (:func:`maps_to_instances`) separately, then :func:`segment_cnn` end to end, plain and with
  test-time augmentation (``augment=True``: four forward passes per tile);
- the classical baseline (:func:`segment_classical`) in the same run, as a ratio;
- peak resident memory (``VmHWM``) of ``segment_cnn`` on 4096² and 8192² fields (``--sizes``),
  each in a fresh subprocess (the synthetic field tiled), next to the memory held before
  segmentation starts and the sizes of the field and its labels; fields larger than
  ``--block`` (default the library's 4096 px; 0: whole) are segmented block by block.

Timings are medians of ``--repeats`` runs after one warm-up. Speed does not depend on the weights:
without ``models/default`` a randomly initialised network of the same architecture is timed
(then post-processing is timed on perfect maps made from the truth, since random maps are not
realistic).

Usage::

    .venv/bin/python benchmarks/speed.py --repeats 5 --json benchmarks/results/speed.json
    .venv/bin/python benchmarks/speed.py --memory-only --sizes 4096 8192 16384 \
        --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _load(model_name: str, arch: str | None = None):  # type: ignore[no-untyped-def]
    """The model to time: the named one when it exists, else a random network.

    ``arch``: JSON of ModelConfig fields for a random network of that architecture (speed does
    not depend on the weights).
    """
    from islet_imaging.errors import ModelError
    from islet_imaging.models import Model, ModelConfig, build_network, load_model

    if arch is None:
        try:
            return load_model(model_name, device="cpu"), True
        except ModelError as exc:
            print(
                f"# {model_name!r} not available ({exc}); timing a random network", file=sys.stderr
            )
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(**json.loads(arch or "{}"))
    return Model.from_network(build_network(cfg), cfg, device="cpu"), False


def _field(size: int, pixel_size_um: float):  # type: ignore[no-untyped-def]
    """A 2-channel (DAPI, INS) synthetic S6 field of ``size``² pixels and its truth."""
    from islet_imaging.io import Field, PixelSize
    from islet_imaging.synth import generate_field

    base = min(size, 1024)
    s = generate_field("S6", seed=0, size=base, pixel_size_um=pixel_size_um)
    idx = [s.field.channel_names.index("DAPI"), s.field.channel_names.index("INS")]
    k = size // base
    data = np.tile(s.field.data[idx], (1, 1, k, k))
    fld = Field(data, ("DAPI", "INS"), PixelSize(pixel_size_um, pixel_size_um))
    return fld, np.tile(s.nuclei, (1, k, k)), np.tile(s.clusters, (1, k, k))


def _reset_peak() -> None:
    """Start ``VmHWM`` afresh from the current resident memory (Linux ≥ 4.0), so that the peak
    of the set-up (the tiled truth) is not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_child(
    size: int,
    model_name: str,
    tile: int,
    post_only: bool,
    arch: str | None = None,
    block: int | None = None,
) -> None:
    """Run in a subprocess: segment one size² field and print memory (MB) as JSON.

    ``before_mb``: resident memory once the field (and model) are loaded; ``peak_mb``: the
    process's highest resident memory (``VmHWM``) from then on (the set-up's peak is reset
    where Linux allows it). ``post_only``: post-process perfect maps made
    from the truth instead (float16, as segment_cnn holds them), for a realistic object density
    when no trained model exists. ``block``: ``segment_cnn(block=)`` (``None``: the library's
    default; 0: whole).
    """
    import gc

    from islet_imaging.models import make_targets
    from islet_imaging.models.inference import BLOCK_PX, segment_cnn, stage_instances
    from islet_imaging.stages import get_stage

    profile = get_stage("S6")
    model, trained = _load(model_name, arch)
    fld, nuclei, clusters = _field(size, model.config.pixel_size_um)
    maps = None
    if post_only:  # targets of the 1024² truth, tiled like the field (float16, as inference)
        k = size // min(size, 1024)
        base = min(size, 1024)
        t = make_targets(
            nuclei[0, :base, :base],
            clusters[0, :base, :base],
            distance_cap_px=model.config.distance_cap_px,
        )
        maps = {
            n: np.tile(v.astype(np.float16), (k, k))
            for n, v in t.items()
            if not n.endswith("_weight")
        }
        del t
    del nuclei, clusters
    gc.collect()
    _reset_peak()
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if maps is not None:
        nuc, clu = stage_instances(maps, fld.pixel_size.yx, profile, model.config, model.thresholds)
    else:
        block = BLOCK_PX if block is None else block or None
        labels = segment_cnn(fld, profile, model=model, tile=tile, block=block)
        nuc, clu = labels.nuclei, labels.clusters
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "size": size,
                "step": "maps_to_instances (perfect maps)" if post_only else "segment_cnn",
                "block": None if post_only else block,
                "field_mb": round(fld.data.nbytes / 2**20, 1),
                "labels_mb": round((nuc.nbytes + clu.nbytes) / 2**20, 1),
                "trained": trained,
                "before_mb": round(before, 1),
                "peak_mb": round(_status_mb("VmHWM"), 1),
                "seconds": round(seconds, 2),
                "nuclei": int(nuc.max()),
                "clusters": int(clu.max()),
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="default")
    parser.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--arch", help="time a random network with these ModelConfig fields (JSON) instead"
    )
    parser.add_argument(
        "--network-only", action="store_true", help="only the forward-pass variants"
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the peak memory of segment_cnn (--sizes)"
    )
    parser.add_argument(
        "--block", type=int, help="segment_cnn(block=) for the memory runs (0: whole field)"
    )
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--post-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(
            args.memory_child, args.model, args.tile, args.post_only, args.arch, args.block
        )
        return 0
    if args.memory_only:
        res: dict[str, Any] = {"machine": {"cpu": _cpu_name(), "load_before": os.getloadavg()}}
        res["memory"] = _memory_runs(args, post_only=(False,))
        return _report(res, args.json)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from islet_imaging.models import count_parameters, make_targets
    from islet_imaging.models.classical import segment_classical
    from islet_imaging.models.inference import (
        predict_maps,
        prepare_input,
        segment_cnn,
        stage_instances,
    )
    from islet_imaging.stages import get_stage

    profile = get_stage("S6")
    model, trained = _load(args.model, args.arch)
    cfg = model.config
    fld, nuclei, clusters = _field(1024, cfg.pixel_size_um)
    inp = prepare_input(fld, profile, cfg)[:, 0]
    res: dict[str, Any] = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_before": os.getloadavg(),
        },
        "model": str(model.path) if trained else "random init (same architecture)",
        "architecture": {k: getattr(cfg, k) for k in ("base_channels", "depth", "max_channels")},
        "parameters": count_parameters(model.network),
        "field": "synthetic S6, 1024x1024, DAPI+INS, at the model's pixel size",
        "repeats": args.repeats,
    }
    x = torch.from_numpy(np.ascontiguousarray(inp[np.newaxis]))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.network(x)
    flops = counter.get_total_flops()
    res["gflop_per_forward"] = round(flops / 1e9, 2)

    eager = model.network.eval()
    fused = model.inference_network(channels_last=False)
    fused_cl = model.inference_network(channels_last=True)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants: dict[str, Callable[[], Any]] = {
        "eager": lambda: eager(x),
        "folded BN": lambda: fused(x),
        "folded BN + channels_last": lambda: fused_cl(x_cl),
    }
    net_times: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            net_times[name], _ = _median_time(fn, args.repeats)
        if not args.no_compile:
            compiled = torch.compile(fused_cl)
            t0 = time.perf_counter()
            compiled(x_cl)
            res["compile_seconds"] = round(time.perf_counter() - t0, 1)
            net_times["folded BN + channels_last + torch.compile"], _ = _median_time(
                lambda: compiled(x_cl), args.repeats
            )
    res["network_seconds"] = {k: round(v, 3) for k, v in net_times.items()}
    res["network_gflops_per_s"] = {k: round(flops / 1e9 / v, 1) for k, v in net_times.items()}
    if args.network_only:
        return _report(res, args.json)

    res["predict_maps_seconds"] = round(
        _median_time(lambda: predict_maps(inp, model, tile=args.tile), args.repeats)[0], 3
    )
    maps = predict_maps(inp, model, tile=args.tile)

    def post(m: dict[str, np.ndarray]) -> Any:  # as segment_cnn post-processes
        return stage_instances(m, fld.pixel_size.yx, profile, cfg, model.thresholds)

    t = make_targets(nuclei[0], clusters[0], distance_cap_px=cfg.distance_cap_px)
    perfect = {k: v for k, v in t.items() if not k.endswith("_weight")}
    res["postprocess_seconds_perfect_maps"] = round(
        _median_time(lambda: post(perfect), args.repeats)[0], 3
    )
    if trained:
        res["postprocess_seconds_model_maps"] = round(
            _median_time(lambda: post(maps), args.repeats)[0], 3
        )
    res["segment_cnn_seconds"] = round(
        _median_time(lambda: segment_cnn(fld, profile, model=model, tile=args.tile), args.repeats)[
            0
        ],
        3,
    )
    res["segment_cnn_augment_seconds"] = round(
        _median_time(
            lambda: segment_cnn(fld, profile, model=model, tile=args.tile, augment=True),
            args.repeats,
        )[0],
        3,
    )
    res["classical_seconds"] = round(
        _median_time(lambda: segment_classical(fld, profile), args.repeats)[0], 3
    )
    res["cnn_over_classical"] = round(res["segment_cnn_seconds"] / res["classical_seconds"], 2)

    res["memory"] = _memory_runs(args, post_only=(False, True))
    return _report(res, args.json)


def _memory_runs(args: argparse.Namespace, post_only: tuple[bool, ...]) -> list[dict[str, Any]]:
    """One fresh subprocess per size (and per ``post_only`` mode): its memory record."""
    runs = []
    for size in args.sizes:
        for post in post_only:
            cmd = [sys.executable, __file__, "--memory-child", str(size), "--model", args.model]
            cmd += ["--tile", str(args.tile)] + (["--post-only"] if post else [])
            cmd += ["--arch", args.arch] if args.arch else []
            cmd += ["--block", str(args.block)] if args.block is not None else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log_line = {k: runs[-1][k] for k in ("size", "step", "peak_mb", "seconds")}
            print(json.dumps(log_line), file=sys.stderr, flush=True)
    return runs


def _report(res: dict[str, Any], path: Path | None) -> int:
    """Print the results as JSON (with the load average after the run); write them to ``path``."""
    res["machine"]["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
