"""torchvision models (reports B, C and D) for 1-channel input, from scratch or with ImageNet weights
loaded through torchvision's weights API."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from cxr.errors import CxrError
from cxr.models import register_model
from cxr.models.cnn import _head

# arch -> (its first conv, its classification layer), as submodule paths
_LAYERS = {
    "resnet18": ("conv1", "fc"),
    "resnet50": ("conv1", "fc"),
    "vgg16": ("features.0", "classifier"),
    "efficientnet_b0": ("features.0.0", "classifier.1"),
    "mobilenet_v2": ("features.0.0", "classifier.1"),
    "vit_b_16": ("conv_proj", "heads.head"),
}


def _weights(arch: str) -> tuple[Any, Path]:
    """The arch's default ImageNet weights enum and the file torchvision caches it in."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def imagenet_weights(arch: str) -> dict[str, torch.Tensor]:
    """The arch's default ImageNet weights from torchvision (downloaded once into torch's hub cache)."""
    weights, file = _weights(arch)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except OSError as e:  # URLError when offline, a refused or reset connection
        raise CxrError(f"cannot download ImageNet weights for {arch} ({getattr(e, 'reason', e)}); offline, put "
                       f"{file.name} (from {weights.url}) into {file.parent} (set TORCH_HOME to move it), "
                       f"or set pretrained: false") from None


def unavailable_weights(archs: Iterable[str], timeout: float = 3.0) -> dict[str, str]:
    """arch -> why its ImageNet weights cannot be had: not in torch's hub cache, and their server does not
    answer. Cheap (a HEAD request, offline a failed name lookup), so the first stage can warn about what
    would otherwise fail only at the variant's train stage, after the data stages and the other variants."""
    out: dict[str, str] = {}
    down: dict[str, str] = {}  # host -> why it did not answer: a silent network costs one timeout, not one a file
    for arch in sorted(set(archs)):
        weights, file = _weights(arch)
        host = urlparse(weights.url).netloc
        if file.exists():
            continue
        why = down.get(host)
        if why is None:
            try:
                urllib.request.urlopen(urllib.request.Request(weights.url, method="HEAD"), timeout=timeout).close()
                continue
            except OSError as e:
                why = str(getattr(e, "reason", e))
                if not isinstance(e, urllib.error.HTTPError):  # an HTTP error is an answer: try the host's others
                    down[host] = why
        out[arch] = f"{file.name} is not in {file.parent} and {weights.url} cannot be reached ({why})"
    return out


def _replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, name, module)


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int, pretrained: bool) -> nn.Conv2d:
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None)
    if pretrained:
        if in_chans != 1:
            raise CxrError(f"pretrained weights take 1 or 3 input channels, not {in_chans}")
        with torch.no_grad():
            # Gray replicated to RGB gives sum_c(w_c) * x: the summed filter sees gray as the RGB one did.
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _torchvision(arch: str, num_classes: int, in_chans: int, pretrained: bool, head: nn.Module | None = None,
                 **kwargs: object) -> nn.Module:
    import torchvision  # here: its import takes over a second, which the stages of other archs are spared

    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    if pretrained:
        net.load_state_dict(imagenet_weights(arch))
    first, last = _LAYERS[arch]
    conv = net.get_submodule(first)
    if in_chans != conv.in_channels:
        _replace(net, first, _adapt_first_conv(conv, in_chans, pretrained))
    _replace(net, last, head or nn.Linear(net.get_submodule(last).in_features, num_classes))
    net.head_name = last  # what freeze_epochs leaves trainable
    return net


@register_model()
def resnet18(*, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("resnet18", num_classes, in_chans, pretrained)


@register_model()
def resnet50(*, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("resnet50", num_classes, in_chans, pretrained)


@register_model()
def vgg16(*, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False,
          head_units: tuple[int, ...] = (512, 128), dropout: float = 0.5) -> nn.Module:
    """VGG-16 with report B's head (Dense 512-128) on the flattened 7x7x512 features."""
    return _torchvision("vgg16", num_classes, in_chans, pretrained, _head(512 * 7 * 7, list(head_units),
                                                                          num_classes, dropout))


@register_model()
def efficientnet_b0(*, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("efficientnet_b0", num_classes, in_chans, pretrained)


@register_model()
def mobilenet_v2(*, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("mobilenet_v2", num_classes, in_chans, pretrained)


@register_model()
def vit_b_16(*, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False) -> nn.Module:
    if image_size % 16 or (pretrained and image_size != 224):
        raise CxrError(f"arch 'vit_b_16' takes image sizes that are multiples of 16 (224 with pretrained "
                       f"weights), not {image_size}; set the variant's image_size")
    return _torchvision("vit_b_16", num_classes, in_chans, pretrained, image_size=image_size)
