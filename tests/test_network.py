"""ModelConfig validation and JSON round trip; the network's shapes, size and BatchNorm folding."""

from __future__ import annotations

import json

import pytest
import torch

from islet_imaging.errors import ModelError
from islet_imaging.models._config import FORMAT_VERSION, ModelConfig, Thresholds
from islet_imaging.models._network import build_network, count_parameters, fuse_for_inference


def test_default_config_and_output_names() -> None:
    cfg = ModelConfig()
    assert cfg.inputs == ("nuclear", "cluster") and cfg.in_channels == 2
    assert cfg.output_names == (
        "nuclei_foreground",
        "nuclei_distance",
        "clusters_foreground",
        "clusters_distance",
    )
    assert cfg.channels == (16, 32, 64, 128, 256)
    assert cfg.size_multiple == 16


def test_config_json_round_trip() -> None:
    cfg = ModelConfig(
        name="tiny",
        inputs=["nuclear"],
        base_channels=8,
        depth=3,
        norm="group",
        heads={"nuclei": ["foreground", "distance"]},
        distance_cap_px={"nuclei": None},
        percentiles=[0.5, 99.5],
        pixel_size_um=0.325,
        thresholds={"nuclei_seed": 0.4},
        description="test",
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["format_version"] == FORMAT_VERSION
    back = ModelConfig.from_dict(d)
    assert back == cfg
    assert back.inputs == ("nuclear",) and back.heads == {"nuclei": ("foreground", "distance")}
    assert back.thresholds == Thresholds(nuclei_seed=0.4)
    assert back.output_names == ("nuclei_foreground", "nuclei_distance")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inputs": ["nuclear", "INS"]}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"base_channels": 0}, "base_channels"),
        ({"depth": 2.5}, "depth"),
        ({"norm": "layer"}, "norm"),
        ({"activation": "gelu"}, "activation"),
        ({"heads": {"cells": ["foreground"]}}, "head 'cells'"),
        ({"heads": {"nuclei": ["distance"]}}, "must include 'foreground'"),
        ({"heads": {"clusters": ["foreground"]}}, "needs a 'nuclei' head"),
        ({"distance_cap_px": {"nuclei": -1}}, "distance_cap_px"),
        ({"percentiles": [99, 1]}, "percentiles"),
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"typical_nucleus_diameter_um": float("nan")}, "typical_nucleus_diameter_um"),
        ({"thresholds": {"nuclei_seed": 1.5}}, r"\[0, 1\]"),
        ({"cluster_split": "watershed"}, "cluster_split"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ModelConfig(**changes)


def test_config_from_dict_rejects_unknown_keys_and_versions() -> None:
    d = ModelConfig().to_dict()
    with pytest.raises(ModelError, match=r"unknown config keys \['base_chanels'\]"):
        ModelConfig.from_dict({**d, "base_chanels": 8}, where="config.json")
    with pytest.raises(ModelError, match="format_version 99"):
        ModelConfig.from_dict({**d, "format_version": 99})
    with pytest.raises(ModelError, match="unknown threshold keys"):
        ModelConfig.from_dict({**d, "thresholds": {"seed": 0.5}})


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_network_shapes(norm: str) -> None:
    cfg = ModelConfig(base_channels=4, depth=3, max_channels=16, norm=norm)
    net = build_network(cfg).eval()
    x = torch.rand(2, 2, 32, 48)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 4, 32, 48)
    assert torch.isfinite(y).all()


def test_default_network_size() -> None:
    n = count_parameters(build_network(ModelConfig()))
    assert 1_000_000 < n < 3_000_000


def test_fuse_for_inference_matches_eval_mode() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(base_channels=4, depth=3, max_channels=16)
    net = build_network(cfg)
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # original untouched
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)
        cl = fused.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            cl(x.contiguous(memory_format=torch.channels_last)), net(x), atol=1e-5, rtol=1e-5
        )
