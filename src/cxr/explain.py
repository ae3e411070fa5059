"""What a prediction looked at: Grad-CAM (Selvaraju et al. 2017) for convolutional archs, the input gradient for
the others, on images prepared as the model card says; figures of one image, and the error gallery that evaluate
logs (the most confident false positives and negatives, and the most confident right answers for contrast).

Written here (about 40 lines) rather than taken from a Grad-CAM package: the maps must run on this project's
Classifier at the card's preprocessing, and the packages on PyPI pull in OpenCV, scikit-learn and more for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn

from cxr.inference import ModelCard, full_float32
from cxr.plots import plt

# No last convolutional feature map to weigh: a linear model and an MLP have none, a ViT's patch embedding is one
# convolution deep, and an ensemble has one per member.
NO_CAM = frozenset({"linear", "mlp", "vit", "ensemble"})


def method(card: ModelCard) -> str:
    return "input gradient" if card.arch in NO_CAM else "Grad-CAM"


def evidence(logits: torch.Tensor) -> torch.Tensor:
    """Per image, the log-odds of pneumonia (of any kind) against NORMAL: the score the maps explain."""
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1:].logsumexp(1) - logits[:, 0]


def _last_feature_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The logits and the last spatial (N, C, h, w) activation the forward pass made (h, w > 1), and its module."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, out)))
             for name, m in model.named_modules() if name]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    maps = [(n, a) for n, a in seen if isinstance(a, torch.Tensor) and a.ndim == 4 and min(a.shape[2:]) > 1]
    if not maps:
        raise ValueError("the model makes no spatial feature map")
    name, act = maps[-1]
    return logits, act, name


def saliency(model: nn.Module, card: ModelCard, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, str]:
    """(N, H, W) maps in [0, 1] for uint8 (N, H, W) images (the card's identity view: TTA shifts the image), and
    the method's label, e.g. "Grad-CAM on net.layer4" or "input gradient"."""
    model = model.cpu().eval()
    out, label = [], method(card)
    with full_float32(), torch.enable_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).float().div(255).unsqueeze(1)
            if card.arch in NO_CAM:
                x.requires_grad_(True)
                evidence(model(x)).sum().backward()
                assert x.grad is not None
                heat = nn.functional.avg_pool2d(x.grad.abs(), 5, stride=1, padding=2)  # pixel noise to regions
            else:
                logits, act, name = _last_feature_map(model, x)
                label = f"Grad-CAM on {name}"
                grads, = torch.autograd.grad(evidence(logits).sum(), act)
                heat = (grads.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True).relu()
                heat = nn.functional.interpolate(heat, size=x.shape[2:], mode="bilinear", align_corners=False)
            heat = heat[:, 0].detach()
            top = heat.flatten(1).quantile(0.995, dim=1).clamp_min(1e-12)[:, None, None]
            out.append((heat / top).clamp(0, 1).numpy())
    return np.concatenate(out), label


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray, title: str, size: float = 8) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    ax.set_title(title, fontsize=size)
    ax.axis("off")


def verdict(row: dict[str, Any]) -> str:
    """'P(pneumonia) 0.973 > 0.830: PNEUMONIA' from a cxr.serving.score row."""
    if "p_pneumonia" in row:
        sign = ">" if row["decision"] != "NORMAL" else "≤"
        return f"P(pneumonia) {row['p_pneumonia']:.3f} {sign} {row['threshold']:.3f}: {row['decision']}"
    return f"{row['decision']} ({', '.join(f'{k[2:]} {v:.2f}' for k, v in row.items() if k.startswith('p_'))})"


SCALED = "Scaled per image: read the colour with the score; do not compare it across images."


def reading(label: str) -> tuple[str, tuple[str, str], str]:
    """What the colour bar says for `saliency`'s method `label`: its caption, the words at 0 and at 1, and one line
    on how to read the figure. Grad-CAM is rectified (0: nothing for pneumonia, the evidence against is cut
    away); the input gradient is a magnitude (0: no effect; red sways P(pneumonia) up or down). Both are divided
    by the image's own 99.5th percentile, hence "relative to this image"."""
    if label.startswith("Grad-CAM"):
        return ("evidence for pneumonia, relative to this image's strongest",
                ("0: none here", "1: this image's strongest"),
                "Red: regions that raised P(pneumonia) most in this image; blue: none (or against).\n" + SCALED)
    return ("|d log-odds / d pixel|, relative to this image's largest",
            ("0: no effect", "1: this image's largest"),
            "Red: pixels whose change would move P(pneumonia) most, up or down.\n" + SCALED)


def figure(image: np.ndarray, heat: np.ndarray, name: str, row: dict[str, Any], label: str) -> Figure:
    """One X-ray as the model saw it, its map over it, the prediction in the title, a colour bar of the map and a
    line on how to read it (`reading`)."""
    caption, ends, how = reading(label)
    fig, ax = plt.subplots(figsize=(5, 6.2), layout="constrained")
    _overlay(ax, image, heat, f"{name}\n{verdict(row)}\n{label}", 9)
    # The bar shows the map's colours at full strength: over the X-ray they are blended at `_overlay`'s alpha.
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=ax, location="bottom", shrink=0.85, aspect=30,
                       pad=0.02, ticks=[0, 1])
    for tick, align in zip(bar.ax.set_xticklabels(ends, fontsize=8), ("left", "right"), strict=True):
        tick.set_horizontalalignment(align)  # under the bar's ends, not past them
    bar.set_label(caption, fontsize=8)
    fig.supxlabel(how, fontsize=8)
    return fig


def pick(p: np.ndarray, y: np.ndarray, called: np.ndarray, k: int = 4) -> dict[str, list[int]]:
    """Indices of the gallery's rows: the k most confident false positives (NORMAL, highest P(pneumonia)), false
    negatives (pneumonia, lowest), true positives and true negatives."""
    order = np.argsort(-p, kind="stable")  # most pneumonia-like first
    rows = {"false positives": (y == 0) & called, "false negatives": (y != 0) & ~called,
            "true positives": (y != 0) & called, "true negatives": (y == 0) & ~called}
    return {title: [int(i) for i in (order if title.endswith("positives") else order[::-1]) if mask[i]][:k]
            for title, mask in rows.items()}


def gallery(images: np.ndarray, heat: np.ndarray, names: list[str], p: np.ndarray, rows: dict[str, list[int]],
            title: str) -> Figure:
    """A row per group of `pick`, each image with its map, name and P(pneumonia)."""
    k = max(1, *map(len, rows.values()))
    fig, axes = plt.subplots(len(rows), k, figsize=(2.6 * k, 2.9 * len(rows)), layout="constrained", squeeze=False)
    for axs, (group, idx) in zip(axes, rows.items(), strict=True):
        for j, ax in enumerate(axs):
            ax.axis("off")
            if j < len(idx):
                i = idx[j]
                short = names[i].rsplit("/", 1)[-1]
                _overlay(ax, images[i], heat[i], f"{short[:28]}\nP(pneumonia) {p[i]:.3f}", 7)
        axs[0].text(-0.08, 0.5, f"{group} ({len(idx)})", transform=axs[0].transAxes, rotation=90, va="center",
                    ha="right", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig
