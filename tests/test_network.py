"""ModelConfig validation and JSON round trip; the network's shapes, size and BatchNorm folding."""

from __future__ import annotations

import json

import pytest
import torch

from islet_imaging.errors import ModelError
from islet_imaging.models._config import FORMAT_VERSION, ModelConfig, Thresholds
from islet_imaging.models._network import (
    add_context_blocks,
    build_network,
    count_parameters,
    fuse_for_inference,
)


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
        context_blocks=2,
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
    assert back.context_blocks == 2
    # a config.json written before context blocks existed reads as none
    del d["context_blocks"]
    assert ModelConfig.from_dict(d).context_blocks == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inputs": ["nuclear", "INS"]}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"base_channels": 0}, "base_channels"),
        ({"depth": 2.5}, "depth"),
        ({"context_blocks": -1}, "context_blocks"),
        ({"context_blocks": 5}, "context_blocks"),
        ({"context_blocks": True}, "context_blocks"),
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


def _randomise_norms(net: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine weights (also of zero-started context blocks)."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _receptive_field(net: torch.nn.Module, size: int = 256) -> int:
    """Width in pixels of the input region that reaches the centre output pixel (eval mode)."""
    x = torch.rand(1, 2, size, size, requires_grad=True)
    net.eval()(x)[0, :, size // 2, size // 2].sum().backward()
    assert x.grad is not None
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)))
    return int(cols.max() - cols.min() + 1)


def test_context_blocks_widen_the_receptive_field() -> None:
    # depth 3: the deepest level is at 1/4 resolution; block k is dilated 2 ** (k + 1), and
    # each of its two 3x3 convolutions adds 2 * dilation * 4 pixels
    # (leaky ReLU: no unit is dead, every pixel in reach has a gradient)
    torch.manual_seed(0)
    widths = []
    for blocks in (0, 1, 2):
        cfg = ModelConfig(
            base_channels=4, depth=3, max_channels=8, activation="leaky_relu", context_blocks=blocks
        )
        net = build_network(cfg)
        for block in net.context:
            torch.nn.init.ones_(block.body[-1].weight)  # past the identity start
        widths.append(_receptive_field(net))
    assert widths[1] - widths[0] == 2 * 2 * 2 * 4
    assert widths[2] - widths[1] == 2 * 2 * 4 * 4


def test_add_context_blocks_keeps_the_outputs_and_trains() -> None:
    torch.manual_seed(0)
    net = build_network(ModelConfig(base_channels=4, depth=3, max_channels=8))
    _randomise_norms(net)
    net.eval()
    grown = add_context_blocks(net, 2)
    assert grown.config.context_blocks == 2 and net.config.context_blocks == 0
    assert count_parameters(grown) > count_parameters(net)
    assert not grown.training
    x = torch.rand(2, 2, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(grown(x), net(x), rtol=0, atol=0)
    # the new blocks start as the identity but are not stuck there: their zero weights get a
    # gradient
    grown.train()
    grown(x).square().mean().backward()
    last_norm = grown.context[0].body[-1]
    assert last_norm.weight.grad is not None and last_norm.weight.grad.abs().sum() > 0
    # and once trained, the outputs differ
    with torch.no_grad():
        last_norm.weight.fill_(1.0)
    grown.eval()
    with torch.inference_mode():
        assert not torch.allclose(grown(x), net(x))
    for n in (0, -1, 1.5):
        with pytest.raises(ModelError, match="positive integer"):
            add_context_blocks(net, n)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="cannot add 5 context block"):
        add_context_blocks(net, 5)


def test_fuse_for_inference_with_context_blocks() -> None:
    torch.manual_seed(0)
    net = build_network(ModelConfig(base_channels=4, depth=3, max_channels=8, context_blocks=2))
    _randomise_norms(net)
    net.eval()
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)
