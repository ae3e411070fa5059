"""Custom CNNs of reports B and D, for 1-channel square images of any size divisible by their pooling."""

from __future__ import annotations

import torch
from torch import nn

from cxr.errors import CxrError
from cxr.models import register_model


def _side(image_size: int, pools: int, arch: str) -> int:
    side = image_size >> pools
    if side < 1:
        raise CxrError(f"arch {arch!r} pools {pools} times: image_size {image_size} is too small; use {1 << pools}+")
    return side


def _head(in_features: int, units: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in units:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


@register_model()
def cnn5(*, num_classes: int, in_chans: int, image_size: int, filters: tuple[int, ...] = (32, 64, 64, 128, 256),
         dropout: float = 0.2, dense: int = 512) -> nn.Module:
    """Report B's custom CNN: blocks of [conv3x3-BN-ReLU-maxpool2] with dropout, then Dense(512) -> logits."""
    layers: list[nn.Module] = []
    channels = in_chans
    for f in filters:
        layers += [nn.Conv2d(channels, f, 3, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2), nn.Dropout(dropout)]
        channels = f
    side = _side(image_size, len(filters), "cnn5")
    return nn.Sequential(*layers, _head(channels * side * side, [dense], num_classes, dropout))


@register_model()
def cnn_baseline(*, num_classes: int, in_chans: int, image_size: int, filters: tuple[int, ...] = (32, 64),
                 dense: int = 128) -> nn.Module:
    """Report D's baseline: 2 x [conv3x3-ReLU-maxpool2], then 2 fully connected layers."""
    layers: list[nn.Module] = []
    channels = in_chans
    for f in filters:
        layers += [nn.Conv2d(channels, f, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = f
    side = _side(image_size, len(filters), "cnn_baseline")
    return nn.Sequential(*layers, _head(channels * side * side, [dense], num_classes, 0.0))


@register_model()
def cnn_deep(*, num_classes: int, in_chans: int, image_size: int,
             filters: tuple[int, ...] = (32, 64, 128, 128, 256), dense: tuple[int, ...] = (256, 128),
             dropout: float = 0.5) -> nn.Module:
    """Report D's deeper CNN: 5 x [conv3x3-BN-ReLU-maxpool2], then 3 fully connected layers with dropout."""
    layers: list[nn.Module] = []
    channels = in_chans
    for f in filters:
        layers += [nn.Conv2d(channels, f, 3, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        channels = f
    side = _side(image_size, len(filters), "cnn_deep")
    return nn.Sequential(*layers, _head(channels * side * side, list(dense), num_classes, dropout))


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN, with a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


@register_model()
def xrnet(*, num_classes: int, in_chans: int, image_size: int, widths: tuple[int, ...] = (32, 64, 128, 256),
          blocks: int = 1, pool: bool = True, dropout: float = 0.2) -> nn.Module:
    """A small ResNet for 96-160 px single-channel X-rays, from scratch: a stride-2 3x3 stem (and a max pool
    when `pool`: a quarter of the side, cheaply), then one stage of `blocks` basic blocks per width, each
    after the first halving the side, global average pooling, dropout and the classifier. About 60 MFLOPs at
    128 px with the defaults: a 2-core CPU trains an epoch of Kaggle's 4,700 images in about half a minute."""
    _side(image_size, 1 + pool + len(widths) - 1, "xrnet")
    layers: list[nn.Module] = [nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(inplace=True), *([nn.MaxPool2d(3, 2, 1)] if pool else [])]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(_Block(cin, w, 2 if i and not j else 1))
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(cin, num_classes))
