"""Report A's models: linear, MLP and TinyVGG (CNN Explainer), for 1-channel square images."""

from __future__ import annotations

from torch import nn

from cxr.models import register_model


def _stack(in_features: int, hidden_layers: int, hidden_units: int, num_classes: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(hidden_layers):
        layers.append(nn.Linear(width, hidden_units))
        if relu:
            layers.append(nn.ReLU())
        width = hidden_units
    layers.append(nn.Linear(width, num_classes))  # a raw logit: no ReLU here (report A's bug)
    return nn.Sequential(*layers)


@register_model()
def linear(*, num_classes: int, in_chans: int, image_size: int, hidden_layers: int = 1,
           hidden_units: int = 10) -> nn.Module:
    """Report A's "Linear": stacked Linear layers with no activation (a linear model overall)."""
    return _stack(in_chans * image_size**2, hidden_layers, hidden_units, num_classes, relu=False)


@register_model()
def mlp(*, num_classes: int, in_chans: int, image_size: int, hidden_layers: int = 1,
        hidden_units: int = 10) -> nn.Module:
    """Report A's "Linear+ReLU": ReLU after each hidden layer."""
    return _stack(in_chans * image_size**2, hidden_layers, hidden_units, num_classes, relu=True)


@register_model()
def tinyvgg(*, num_classes: int, in_chans: int, image_size: int, filters: int = 10,
            kernel_size: int = 3, blocks: int = 2) -> nn.Module:
    """TinyVGG: blocks of [conv-relu-conv-relu-maxpool2], then one Linear on the flattened map."""
    layers: list[nn.Module] = []
    channels, side = in_chans, image_size
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, filters, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                   nn.Conv2d(filters, filters, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels, side = filters, side // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * side * side, num_classes))
