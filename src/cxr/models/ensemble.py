"""An ensemble of trained variants as one network, so that it is saved, logged, loaded and applied (TTA and
temperature included) exactly like a single model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cxr.errors import CxrError
from cxr.models import Classifier, build_model, register_model


class Ensemble(nn.Module):
    """The members' probabilities averaged, returned as logits of that average (binary: its logit; classes:
    its log), so that the usual rule, sigmoid or softmax at temperature 1, gives the average back."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m(x).float() for m in self.members])  # (members, B, logits)
        if z.shape[-1] == 1:
            return torch.logit(z.sigmoid().mean(0), eps=1e-7)
        return z.softmax(-1).mean(0).clamp_min(1e-12).log()


@register_model()
def ensemble(*, num_classes: int, in_chans: int, image_size: int, members: list[dict[str, Any]] = ()) -> nn.Module:
    """`members`: per member its arch, arch settings and input normalisation ({"arch", "settings", "mean",
    "std"}), as in its model card; the weights are loaded afterwards."""
    if not members:
        raise CxrError("an ensemble needs members: list its variants under ensembles.<name> in params.yaml")
    return Ensemble([Classifier(build_model(m["arch"], num_classes=num_classes, in_chans=in_chans,
                                            image_size=image_size, **m["settings"]), m["mean"], m["std"])
                     for m in members])
