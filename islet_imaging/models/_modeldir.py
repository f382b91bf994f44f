"""The model directory: save, locate, validate and load a segmentation model.

A model is a folder::

    models/<name>/
        config.json          ModelConfig.to_dict() (+ "format_version")
        weights.safetensors  the network's state dict (safetensors; never pickle)
        thresholds.json      post-processing thresholds tuned on validation data
        checksums.json       sha256 of config.json and weights.safetensors
        README.md            model card (optional; see write_model_card)

Names are looked up in this order: an existing directory path; then ``<dir>/<name>`` for each
``dir`` in the environment variable ``ISLET_IMAGING_MODELS`` (``os.pathsep``-separated); then
``<repository root>/models/<name>`` next to the installed package (an editable install of the
repository ships ``models/default``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from islet_imaging._atomic import atomic_write
from islet_imaging.errors import ModelError
from islet_imaging.models._config import FORMAT_VERSION, ModelConfig, Thresholds
from islet_imaging.models._network import UNet, build_network, count_parameters, fuse_for_inference

__all__ = [
    "CARD",
    "CHECKSUMS",
    "CONFIG",
    "MODELS_ENV",
    "THRESHOLDS",
    "WEIGHTS",
    "Model",
    "average_models",
    "clear_model_cache",
    "list_models",
    "load_model",
    "model_search_path",
    "resolve_device",
    "resolve_model_dir",
    "save_model",
    "write_model_card",
    "write_thresholds",
]

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
THRESHOLDS = "thresholds.json"
CHECKSUMS = "checksums.json"
CARD = "README.md"
#: Environment variable with extra directories holding named models.
MODELS_ENV = "ISLET_IMAGING_MODELS"
_CHECKSUMMED = (CONFIG, WEIGHTS)


@dataclass(eq=False)
class Model:
    """A loaded model: network (eval mode, on ``device``), config, thresholds.

    Attributes
    ----------
    network : UNet
        In eval mode; the trained weights.
    config : ModelConfig
    thresholds : Thresholds
        From ``thresholds.json`` (or the config's defaults when built in memory).
    name : str
    path : Path or None
        The model directory, ``None`` for an in-memory model.
    device : torch.device
    """

    network: UNet
    config: ModelConfig
    thresholds: Thresholds
    name: str = "model"
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _fused: dict[tuple[bool, bool], UNet] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_network(
        cls,
        network: UNet,
        config: ModelConfig | None = None,
        thresholds: Thresholds | None = None,
        *,
        name: str | None = None,
        device: str | torch.device | None = None,
    ) -> Model:
        """Wrap an in-memory network (e.g. during training) for :func:`predict_maps`."""
        config = config if config is not None else network.config
        dev = resolve_device(device)
        return cls(
            network=network.to(dev).eval(),
            config=config,
            thresholds=thresholds if thresholds is not None else config.thresholds,
            name=name or config.name,
            device=dev,
        )

    def inference_network(self, *, channels_last: bool = True, compile: bool = False) -> UNet:
        """An eval-mode copy with BatchNorm folded into convolutions, cached (thread-safe).

        ``compile=True`` wraps it in ``torch.compile`` (compiled once per model and variant).
        """
        with self._lock:
            key = (channels_last, compile)
            net = self._fused.get(key)
            if net is None:
                net = fuse_for_inference(self.network).to(self.device)
                if channels_last:
                    net = net.to(memory_format=torch.channels_last)
                if compile:
                    net = torch.compile(net)  # type: ignore[assignment]
                self._fused[key] = net
            return net

    @property
    def n_parameters(self) -> int:
        return count_parameters(self.network)


# -- locating ----------------------------------------------------------------------------------
def model_search_path() -> list[Path]:
    """Directories searched for named models, in order."""
    dirs = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
    repo_models = Path(__file__).resolve().parents[2] / "models"
    dirs.append(repo_models)
    return dirs


def list_models() -> dict[str, Path]:
    """Named models found on :func:`model_search_path` (first match wins)."""
    found: dict[str, Path] = {}
    for d in model_search_path():
        if d.is_dir():
            for sub in sorted(d.iterdir()):
                if (sub / CONFIG).is_file() and sub.name not in found:
                    found[sub.name] = sub
    return found


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """The directory of a model given by name (``"default"``) or path.

    Raises
    ------
    ModelError
        If no such model exists; the message lists the models found and where they were looked for.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_like_path = os.sep in text or (os.altsep is not None and os.altsep in text)
    if not looks_like_path:
        for d in model_search_path():
            cand = d / text
            if cand.is_dir():
                return cand.resolve()
    where = ", ".join(str(d) for d in model_search_path())
    known = sorted(list_models())
    raise ModelError(
        f"model {text!r} not found (looked for a directory of that name in: {where}); "
        f"available models: {known or 'none'}. Give a model directory path, set "
        f"{MODELS_ENV}, use --model classical, or train one with `islet-imaging train`"
    )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` → CUDA when available, else CPU. An unavailable CUDA device is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} asked for, but CUDA is not available; use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


# -- writing -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: _write_json(tmp, obj))


def save_model(
    directory: str | os.PathLike[str],
    network: UNet,
    config: ModelConfig | None = None,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    *,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model directory atomically (a temporary sibling renamed into place).

    Parameters
    ----------
    directory : path
        The model directory to create, e.g. ``models/default``.
    network : UNet
        The trained network; its state dict is saved (safetensors).
    config : ModelConfig, optional
        Default ``network.config``. Must describe ``network``'s architecture.
    thresholds : Thresholds or dict, optional
        Tuned post-processing thresholds; default the config's.
    card : str, optional
        Model card text for ``README.md`` (see :func:`write_model_card`).
    overwrite : bool
        Replace an existing directory.

    Returns
    -------
    Path
        The model directory.
    """
    directory = Path(directory)
    config = config if config is not None else network.config
    th = Thresholds.of(thresholds, config.thresholds)
    _check_state_dict(network.state_dict(), config, str(directory))
    if directory.exists() and not overwrite:
        raise ModelError(
            "model directory already exists; pass overwrite=True (--overwrite) to replace it",
            directory,
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        state = {
            k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()
        }
        save_file(
            state,
            str(tmp / WEIGHTS),
            metadata={"format_version": str(FORMAT_VERSION), "name": config.name},
        )
        _write_json(tmp / CONFIG, config.to_dict())
        _write_json(tmp / THRESHOLDS, th.to_dict())
        _write_json(tmp / CHECKSUMS, {f: _sha256(tmp / f) for f in _CHECKSUMMED})
        if card is not None:
            (tmp / CARD).write_text(card, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # mkdtemp / mkstemp create private (0700 / 0600) entries
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            old.rmdir()
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clear_model_cache()
    log.info("saved model %r to %s", config.name, directory)
    return directory


def average_models(models: Sequence[Model], *, weights: Sequence[float] | None = None) -> UNet:
    """A network whose weights are the weighted mean of several models' weights.

    Averaging a fine-tuned model with the model it started from ("model soup", Wortsman et al.
    2022) often keeps what the fine-tuning gained and recovers what it lost. The models must
    share one lineage in practice (one started from the other); the function checks only that
    they are interchangeable: the same architecture, inputs, scale and targets.

    Parameters
    ----------
    models : sequence of Model
        At least two loaded models (:func:`load_model`).
    weights : sequence of float, optional
        One non-negative weight per model (normalised to sum to 1); default equal weights.

    Returns
    -------
    UNet
        A new network (the last model's config; eval mode, on the CPU). Floating-point
        tensors are averaged; integer buffers (batch-norm step counts) come from the last model.

    Raises
    ------
    ModelError
        Fewer than two models, weights that do not fit, or models that differ in anything but
        their name, description and thresholds.
    """
    if len(models) < 2:
        raise ModelError(f"averaging needs at least two models, got {len(models)}")
    w = np.ones(len(models)) if weights is None else np.asarray(weights, float)
    if w.shape != (len(models),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        given = ", ".join(f"{v:g}" for v in np.atleast_1d(w))
        raise ModelError(
            f"weights [{given}] must be {len(models)} non-negative numbers (one per model) "
            "with a positive sum"
        )
    w = w / w.sum()

    def meaning(m: Model) -> dict[str, Any]:
        d = m.config.to_dict()
        return {k: v for k, v in d.items() if k not in ("name", "description", "thresholds")}

    ref = models[-1]
    want = meaning(ref)
    for m in models[:-1]:
        have = meaning(m)
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise ModelError(
                f"models {m.path or m.name} and {ref.path or ref.name} cannot be averaged: their "
                f"configs differ in {diff}; average only models of one architecture, scale and "
                "targets"
            )
    states = [{k: v.detach().to("cpu") for k, v in m.network.state_dict().items()} for m in models]
    mean = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            acc = sum(float(wi) * st[key].double() for wi, st in zip(w, states, strict=True))
            mean[key] = acc.to(last.dtype)
        else:
            mean[key] = last.clone()
    network = build_network(ref.config)
    network.load_state_dict(mean)
    return network.eval()


def write_thresholds(
    directory: str | os.PathLike[str], thresholds: Thresholds | Mapping[str, float]
) -> Path:
    """Replace a model directory's ``thresholds.json`` (e.g. after tuning on validation data)."""
    directory = Path(directory)
    th = Thresholds.of(thresholds)
    if not (directory / CONFIG).is_file():
        raise ModelError(f"not a model directory (no {CONFIG})", directory)
    path = directory / THRESHOLDS
    _atomic_write_json(path, th.to_dict())
    clear_model_cache()
    return path


def _fmt_metrics(metrics: Mapping[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def write_model_card(
    directory: str | os.PathLike[str],
    *,
    training_data: str,
    metrics: Mapping[str, Any] | None = None,
    command: str | None = None,
    training: Mapping[str, Any] | None = None,
    limitations: str | None = None,
    extra: str | None = None,
) -> Path:
    """Write ``README.md``, the model card, into an existing model directory.

    Parameters
    ----------
    directory : path
        A model directory written by :func:`save_model`.
    training_data : str
        What the model was trained on (datasets, splits, how many images, rescaling).
    metrics : dict, optional
        Validation / test figures, e.g. ``{"nuclei AP@0.5 (val)": 0.82}``.
    command : str, optional
        The exact command that trains this model.
    training : dict, optional
        Hyper-parameters (epochs, batch size, learning rate, augmentation, seed, time).
    limitations : str, optional
    extra : str, optional
        Any further Markdown.
    """
    directory = Path(directory)
    try:
        config = ModelConfig.from_dict(json.loads((directory / CONFIG).read_text("utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {CONFIG} ({exc})", directory) from exc
    th_path = directory / THRESHOLDS
    th = (
        Thresholds.from_dict(json.loads(th_path.read_text("utf-8")))
        if th_path.is_file()
        else config.thresholds
    )
    n_params = count_parameters(build_network(config))
    parts = [
        f"# Model card: {config.name}",
        "",
        config.description or "",
        "",
        "## Intended use",
        "Instance segmentation of nuclei and cell clusters (colonies, monolayer patches, "
        "aggregates) in fluorescence microscopy of iPSC → SC-islet differentiation, through "
        "`islet-imaging segment --model <this directory>` or "
        "`islet_imaging.segment_field(field, stage=..., model=...)`.",
        "",
        "## Architecture",
        f"- U-Net, levels {list(config.channels)} channels, norm `{config.norm}`, activation "
        f"`{config.activation}`, {n_params:,} parameters"
        + (
            f"; {config.context_blocks} context block(s) (dilated residual convolutions) at "
            "the deepest level"
            if config.context_blocks
            else ""
        ),
        f"- inputs: {list(config.inputs)} (percentile normalisation {list(config.percentiles)})",
        f"- outputs: {list(config.output_names)}",
        f"- trained at pixel size {config.pixel_size_um} µm; typical nucleus diameter "
        f"{config.typical_nucleus_diameter_um} µm; inputs are rescaled to this scale",
        f"- distance targets: {config.distance_cap_px} (None = per-object normalised)",
        "",
        "## Post-processing thresholds (`thresholds.json`)",
        "```json",
        json.dumps(th.to_dict(), indent=2),
        "```",
        "",
        "## Training data",
        training_data,
        "",
    ]
    if training:
        parts += ["## Training", _fmt_metrics(training), ""]
    if command:
        parts += ["## Reproduce", "```", command, "```", ""]
    if metrics:
        parts += ["## Metrics", _fmt_metrics(metrics), ""]
    if limitations:
        parts += ["## Limitations", limitations, ""]
    if extra:
        parts += [extra, ""]
    path = directory / CARD
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# -- reading -----------------------------------------------------------------------------------
def _check_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    expected = build_network(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: weights {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing tensors: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {show(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {show(mismatched)}")
        raise ModelError(
            f"{where}: weights do not match the architecture in {CONFIG} "
            f"({'; '.join(problems)}); the config and weights come from different models"
        )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what} is not valid JSON ({exc}); re-download or retrain", path) from exc


_CACHE: dict[tuple[str, str, tuple[Any, ...]], Model] = {}
_CACHE_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget every loaded model (the next :func:`load_model` reads from disk)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _stamp(directory: Path) -> tuple[Any, ...]:
    out = []
    for name in (CONFIG, WEIGHTS, THRESHOLDS, CHECKSUMS):
        try:
            st = (directory / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def load_model(
    name_or_path: str | os.PathLike[str] | Model,
    *,
    device: str | torch.device | None = None,
) -> Model:
    """Load (and cache per directory and device) a model by name or directory.

    Parameters
    ----------
    name_or_path : str, path or Model
        ``"default"``, another model name on :func:`model_search_path`, or a model directory.
        A :class:`Model` is returned as is (a copy when it lives on another device).
    device : str, optional
        ``"cpu"`` or ``"cuda"``; default CUDA when available.

    Raises
    ------
    ModelError
        Unknown name; missing file (named); invalid config or thresholds; checksum mismatch;
        weights that do not match the architecture (missing / unexpected / mismatched tensors).
    """
    if isinstance(name_or_path, Model):
        if device is None or resolve_device(device) == name_or_path.device:
            return name_or_path
        m = name_or_path
        return Model(
            network=copy.deepcopy(m.network).to(resolve_device(device)).eval(),
            config=m.config,
            thresholds=m.thresholds,
            name=m.name,
            path=m.path,
            device=resolve_device(device),
        )
    directory = resolve_model_dir(name_or_path)
    dev = resolve_device(device)
    key = (str(directory), str(dev), _stamp(directory))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    for required in (CONFIG, WEIGHTS, THRESHOLDS):
        if not (directory / required).is_file():
            raise ModelError(
                f"model directory lacks {required}; it is incomplete — re-download or retrain",
                directory,
            )
    checks_path = directory / CHECKSUMS
    if checks_path.is_file():
        checks = _read_json(checks_path, CHECKSUMS)
        if not isinstance(checks, Mapping):
            raise ModelError(f"{CHECKSUMS} must be a JSON object", directory)
        for fname, digest in checks.items():
            if fname not in _CHECKSUMMED:
                continue
            if _sha256(directory / fname) != digest:
                raise ModelError(
                    f"{fname} fails its checksum (tampered or corrupt); re-download or retrain",
                    directory,
                )
    else:
        log.warning("%s: no %s; weights are not verified", directory, CHECKSUMS)
    config = ModelConfig.from_dict(
        _read_json(directory / CONFIG, CONFIG), where=str(directory / CONFIG)
    )
    thresholds = Thresholds.from_dict(
        _read_json(directory / THRESHOLDS, THRESHOLDS), where=str(directory / THRESHOLDS)
    )
    try:
        state = load_file(str(directory / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"{WEIGHTS} cannot be read ({exc}); re-download or retrain", directory
        ) from exc
    _check_state_dict(state, config, str(directory))
    network = build_network(config)
    network.load_state_dict(state, strict=True)
    model = Model(
        network=network.to(dev).eval(),
        config=config,
        thresholds=thresholds,
        name=directory.name if config.name == "unet" else config.name,
        path=directory,
        device=dev,
    )
    with _CACHE_LOCK:
        _CACHE[key] = model
    log.info("loaded model %s (%s) on %s", model.name, directory, dev)
    return model
