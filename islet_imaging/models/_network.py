"""A small U-Net that predicts, per object class, a foreground logit and a distance logit.

The network is rebuilt from a :class:`~islet_imaging.models._config.ModelConfig` alone
(:func:`build_network`). Every output channel is a logit; ``torch.sigmoid`` of it gives the
foreground probability or the distance map in 0..1 (:meth:`UNet.activate`). Output channel ``k``
is ``config.output_names[k]`` (``"nuclei_foreground"``, ``"nuclei_distance"``, ...).

Architecture (default ``base_channels=16, depth=5, max_channels=256``): levels with
16-32-64-128-256 channels, two 3×3 convolutions + norm + activation per level, 2×2 max pooling
down, bilinear upsampling + 1×1 convolution up, skip connections by concatenation, a 1×1 head.
About 1.8 M parameters; input height and width must be multiples of ``2 ** (depth - 1)``
(inference pads). Receptive field ≈ 2 · 2**depth · 3 pixels (≈ 190 px at depth 5), widened by
``config.context_blocks`` residual blocks of dilated convolutions at the deepest level
(:class:`ContextBlock`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from islet_imaging.errors import ModelError
from islet_imaging.models._config import ModelConfig

__all__ = [
    "ContextBlock",
    "UNet",
    "add_context_blocks",
    "build_network",
    "count_parameters",
    "fuse_for_inference",
]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, min(8, channels // 4)), channels)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    if kind == "silu":
        return nn.SiLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    return nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Two (3×3 convolution → norm → activation) layers."""

    def __init__(self, cin: int, cout: int, norm: str, act: str) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            _act(act),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            _act(act),
        )


class ContextBlock(nn.Module):
    """``x + body(x)``: two dilated 3×3 convolutions (+ norm), the activation between them.

    The body's last normalisation (or, without one, its last convolution) starts at zero, so a
    new block is the identity: it can be added to a trained network without changing it.
    """

    def __init__(self, channels: int, dilation: int, norm: str, act: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=bias),
            _norm(norm, channels),
            _act(act),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=bias),
            _norm(norm, channels),
        )
        last = self.body[-1] if norm != "none" else self.body[-2]
        nn.init.zeros_(last.weight)  # type: ignore[arg-type]
        if last.bias is not None:
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Up(nn.Module):
    """Bilinear ×2 upsampling, 1×1 convolution to the skip's channels, concatenation, ConvBlock."""

    def __init__(self, cin: int, cskip: int, norm: str, act: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1)
        self.block = ConvBlock(2 * cskip, cskip, norm, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([self.reduce(x), skip], dim=1))


class UNet(nn.Module):
    """The segmentation network.

    Parameters
    ----------
    config : ModelConfig

    Notes
    -----
    ``forward`` takes ``(N, in_channels, H, W)`` float32 (normalised inputs, see
    :func:`islet_imaging.models.inference.normalise`) and returns ``(N, out_channels, H, W)``
    logits.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        self.down = nn.ModuleList()
        cin = config.in_channels
        for c in ch:
            self.down.append(ConvBlock(cin, c, config.norm, config.activation))
            cin = c
        self.context = nn.Sequential(
            *(
                ContextBlock(ch[-1], 2 ** (k + 1), config.norm, config.activation)
                for k in range(config.context_blocks)
            )
        )
        self.up = nn.ModuleList(
            Up(ch[i + 1], ch[i], config.norm, config.activation)
            for i in reversed(range(len(ch) - 1))
        )
        self.head = nn.Conv2d(ch[0], config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        x = self.context(skips.pop())
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)

    @staticmethod
    def activate(logits: torch.Tensor) -> torch.Tensor:
        """Logits → foreground probabilities and distance maps, all in 0..1."""
        return torch.sigmoid(logits)


def build_network(config: ModelConfig) -> UNet:
    """A freshly initialised network for ``config`` (PyTorch default initialisation)."""
    return UNet(config)


def add_context_blocks(network: UNet, n: int) -> UNet:
    """A copy of ``network`` with ``n`` more :class:`ContextBlock` s at its deepest level.

    The new blocks start as the identity, so the copy's outputs equal the original's; training
    then widens its receptive field. The copy's config has ``context_blocks`` raised by ``n``.
    """
    config = network.config
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelError(
            f"the number of context blocks to add must be a positive integer, got {n!r}"
        )
    try:
        config = config.replace(context_blocks=config.context_blocks + n)
    except ModelError as exc:
        raise ModelError(f"cannot add {n} context block(s): {exc}") from None
    grown = UNet(config)
    missing, unexpected = grown.load_state_dict(network.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("context.") for k in missing)
    return grown.train(network.training)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fuse_for_inference(model: UNet) -> UNet:
    """An eval-mode copy with every BatchNorm folded into the convolution before it.

    Outputs equal ``model.eval()``'s up to float rounding; inference is faster. The original
    model is untouched.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        layers = list(module)
        for j in range(len(layers) - 1):
            conv, bn = layers[j], layers[j + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[j] = _fold(conv, bn)
                module[j + 1] = nn.Identity()
    return fused


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    assert bn.running_var is not None and bn.running_mean is not None
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
        bn.running_var + bn.eps
    )
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        new.bias.copy_((bias - bn.running_mean) * scale + shift)
    return new
