"""The model directory: save → load round trip, checksums, missing files, mismatched weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from islet_imaging.errors import ModelError
from islet_imaging.models import predict_maps
from islet_imaging.models._config import ModelConfig, Thresholds
from islet_imaging.models._modeldir import (
    CHECKSUMS,
    CONFIG,
    MODELS_ENV,
    THRESHOLDS,
    WEIGHTS,
    average_models,
    clear_model_cache,
    list_models,
    load_model,
    resolve_model_dir,
    save_model,
    write_model_card,
    write_thresholds,
)
from islet_imaging.models._network import build_network

TINY = ModelConfig(name="tiny", base_channels=4, depth=2, max_channels=8, pixel_size_um=0.5)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = build_network(TINY)
    return save_model(tmp_path / "tiny", net, TINY, Thresholds(nuclei_seed=0.45))


def test_round_trip_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network(TINY).eval()
    path = save_model(tmp_path / "m", net, TINY, {"nuclei_seed": 0.45})
    assert {p.name for p in path.iterdir()} == {CONFIG, WEIGHTS, THRESHOLDS, CHECKSUMS}
    model = load_model(path, device="cpu")
    assert model.config == TINY
    assert model.thresholds.nuclei_seed == 0.45
    assert model.name == "tiny" and model.path == path.resolve()
    x = torch.rand(1, 2, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(model.network(x), net(x), atol=0, rtol=0)
    img = np.random.default_rng(0).random((2, 20, 24)).astype(np.float32)
    a = predict_maps(img, model)
    b = predict_maps(img, model.__class__.from_network(net, TINY))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # cached per directory and device: a plate loads the model once
    assert load_model(path, device="cpu") is model


def test_save_refuses_overwrite_and_is_atomic(tiny_dir: Path) -> None:
    net = build_network(TINY)
    with pytest.raises(ModelError, match="already exists"):
        save_model(tiny_dir, net, TINY)
    save_model(tiny_dir, net, TINY, overwrite=True)
    leftovers = [p.name for p in tiny_dir.parent.iterdir() if p.name != "tiny"]
    assert leftovers == []


def test_checksum_detects_a_flipped_byte(tiny_dir: Path) -> None:
    weights = tiny_dir / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01  # a byte of tensor data: the file still parses
    weights.write_bytes(bytes(raw))
    clear_model_cache()
    with pytest.raises(
        ModelError, match=r"weights.safetensors fails its checksum \(tampered or corrupt\)"
    ):
        load_model(tiny_dir, device="cpu")


def test_checksum_detects_edited_config(tiny_dir: Path) -> None:
    d = json.loads((tiny_dir / CONFIG).read_text())
    d["pixel_size_um"] = 1.0
    (tiny_dir / CONFIG).write_text(json.dumps(d))
    with pytest.raises(ModelError, match=r"config\.json fails its checksum"):
        load_model(tiny_dir, device="cpu")


@pytest.mark.parametrize("missing", [CONFIG, WEIGHTS, THRESHOLDS])
def test_missing_file_is_named(tiny_dir: Path, missing: str) -> None:
    (tiny_dir / missing).unlink()
    with pytest.raises(ModelError, match=f"lacks {missing}"):
        load_model(tiny_dir, device="cpu")


def test_mismatched_architecture(tmp_path: Path) -> None:
    """config says base 8, weights have base 4 → every mismatched tensor is listed."""
    path = tmp_path / "m"
    save_model(path, build_network(TINY), TINY)
    d = json.loads((path / CONFIG).read_text())
    d["base_channels"] = 8
    (path / CONFIG).write_text(json.dumps(d))
    (path / CHECKSUMS).unlink()  # a hand-edited directory without checksums
    with pytest.raises(
        ModelError,
        match=r"shape mismatches: down\.0\.0\.weight: weights \(4, 2, 3, 3\) vs config \(8, 2, 3, 3\)",
    ):
        load_model(path, device="cpu")


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m", build_network(TINY), TINY)
    state = load_file(str(path / WEIGHTS))
    state.pop("head.bias")
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(path / WEIGHTS))
    (path / CHECKSUMS).unlink()
    with pytest.raises(
        ModelError, match=r"missing tensors: head\.bias; unexpected tensors: extra\.weight"
    ):
        load_model(path, device="cpu")


def test_bad_json_and_unknown_keys(tiny_dir: Path) -> None:
    (tiny_dir / THRESHOLDS).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(tiny_dir, device="cpu")
    (tiny_dir / THRESHOLDS).write_text(json.dumps({"nuclei_seed": 0.5, "typo": 1}))
    with pytest.raises(ModelError, match=r"unknown threshold keys \['typo'\]"):
        load_model(tiny_dir, device="cpu")


def test_write_thresholds_updates_and_invalidates_cache(tiny_dir: Path) -> None:
    first = load_model(tiny_dir, device="cpu")
    write_thresholds(tiny_dir, Thresholds(nuclei_foreground=0.3))
    second = load_model(tiny_dir, device="cpu")
    assert second is not first
    assert second.thresholds.nuclei_foreground == 0.3


def test_model_card(tiny_dir: Path) -> None:
    path = write_model_card(
        tiny_dir,
        training_data="DSB2018 fluo train split, 10 images",
        metrics={"nuclei AP@0.5 (val)": 0.5},
        command="islet-imaging train ...",
    )
    text = path.read_text()
    assert "# Model card: tiny" in text and "DSB2018" in text and "AP@0.5" in text
    assert load_model(tiny_dir, device="cpu").config == TINY  # the card is not checksummed


def test_lookup_by_name(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert resolve_model_dir("tiny") == tiny_dir.resolve()
    assert list_models()["tiny"] == tiny_dir
    with pytest.raises(ModelError, match=r"model 'nope' not found.*available models: \[.*'tiny'"):
        resolve_model_dir("nope")


def test_bad_device(tiny_dir: Path) -> None:
    with pytest.raises(ModelError, match="device"):
        load_model(tiny_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model(tiny_dir, device="cuda")


def test_average_models_is_the_weighted_mean_of_their_weights(tmp_path: Path) -> None:
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(build_network(TINY))
    a = load_model(save_model(tmp_path / "a", nets[0], TINY), device="cpu")
    b = load_model(save_model(tmp_path / "b", nets[1], TINY), device="cpu")
    sa, sb = nets[0].state_dict(), nets[1].state_dict()
    key = next(k for k, v in sa.items() if v.is_floating_point() and v.numel() > 1)
    for weights, wa in ((None, 0.5), ((3.0, 1.0), 0.75)):
        mean = average_models([a, b], weights=weights).state_dict()
        torch.testing.assert_close(mean[key], wa * sa[key] + (1 - wa) * sb[key])
    # averaging a model with itself gives it back: same outputs
    same = average_models([a, a])
    x = torch.rand(1, 2, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(same(x), a.network(x))
    # a round trip through a model directory
    path = save_model(tmp_path / "soup", average_models([a, b]), TINY)
    assert load_model(path, device="cpu").config == TINY


def test_average_models_refuses_what_cannot_be_averaged(tmp_path: Path) -> None:
    a = load_model(save_model(tmp_path / "a", build_network(TINY), TINY), device="cpu")
    other = ModelConfig(name="o", base_channels=4, depth=2, max_channels=8, pixel_size_um=0.65)
    b = load_model(save_model(tmp_path / "b", build_network(other), other), device="cpu")
    with pytest.raises(ModelError, match=r"differ in \['pixel_size_um'\]"):
        average_models([a, b])
    with pytest.raises(ModelError, match="at least two"):
        average_models([a])
    with pytest.raises(ModelError, match="non-negative"):
        average_models([a, a], weights=[1.0, -1.0])
    with pytest.raises(ModelError, match="non-negative"):
        average_models([a, a], weights=[1.0])
