"""Model registry: `register_model` builders by name, `build_model` from a variant's settings."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cxr.errors import CxrError
from cxr.params import Params, ParamsError

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
# Every builder takes these; a variant's other settings must be named in the builder's signature.
COMMON_ARGS = ("num_classes", "in_chans", "image_size")


def register_model(name: str | None = None) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_settings(arch: str) -> dict[str, Any]:
    """The settings an arch takes, with their defaults."""
    if arch not in _REGISTRY:
        near = difflib.get_close_matches(arch, _REGISTRY, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise CxrError(f"unknown arch {arch!r}; {hint}known: {', '.join(list_models())}")
    sig = inspect.signature(_REGISTRY[arch])
    return {k: p.default for k, p in sig.parameters.items() if k not in COMMON_ARGS}


def without_download(settings: dict[str, Any]) -> dict[str, Any]:
    """An arch's settings with `pretrained` off: to rebuild a trained model (its saved weights replace
    ImageNet's) or to check a shape, never to fetch weights."""
    return {**settings, "pretrained": False} if "pretrained" in settings else settings


def build_model(arch: str, *, num_classes: int = 1, in_chans: int = 1, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a registered arch. num_classes is the number of logits (1 for binary BCE)."""
    allowed = model_settings(arch)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise CxrError(f"{unknown[0]}: not a setting of arch {arch!r}; allowed: {', '.join(allowed) or 'none'}")
    return _REGISTRY[arch](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)


def check_variants(p: Params, names: Iterable[str] | None = None) -> None:
    """Build each variant on the meta device and pass a batch through it, so that an unknown arch or setting,
    or an image size the arch cannot take, fails in milliseconds (no memory, no weights) before any work."""
    num_classes = 3 if p.data.labels == "three_class" else 1
    for name in p.variants if names is None else names:
        tp, size = p.variant(name), p.image_size(name)
        settings = without_download(tp.model)
        try:
            with torch.device("meta"):
                build_model(tp.arch, num_classes=num_classes, image_size=size, **settings)(
                    torch.empty(2, 1, size, size))
        except CxrError as e:
            raise ParamsError(f"models.{name}: {e}") from None
        except (RuntimeError, ValueError) as e:
            raise ParamsError(f"models.{name}: arch {tp.arch!r} cannot take {size} px images "
                              f"({str(e).splitlines()[0]}); give it a larger image_size") from None


class Classifier(nn.Module):
    """A network behind a fixed normalisation, so the saved model takes plain [0, 1] images."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


from cxr.models import cnn, ensemble, simple, vit, zoo  # noqa: E402,F401  (registers the builders)
