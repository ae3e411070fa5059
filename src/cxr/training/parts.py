"""What a variant's settings choose: the loss, optimizer, LR schedule and the batched on-device augmentation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr.errors import CxrError
from cxr.params import TrainParams


def class_weights(tp: TrainParams, labels: np.ndarray, n_classes: int) -> torch.Tensor | None:
    if tp.class_weights == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise CxrError(f"class_weights balanced: the training split lacks a class (counts {counts.tolist()})")
    return torch.tensor(len(labels) / (n_classes * counts), dtype=torch.float32)


class Loss:
    """Per-image losses, weighted: called, their mean over the batch; with `norm`, their sum over `norm`, which
    a rank holding part of a global batch takes from the whole batch's labels (`norm(labels)`, on the CPU: no
    device sync), so that the ranks' losses add up to the one-process loss."""

    def __init__(self, terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weights: torch.Tensor | None):
        self.terms, self.weights = terms, weights
        self._cpu_weights = weights.cpu() if weights is not None else None

    def norm(self, labels: torch.Tensor) -> float:
        return float(len(labels)) if self._cpu_weights is None else float(self._cpu_weights[labels].sum())

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, norm: float | None = None) -> torch.Tensor:
        terms = self.terms(logits, y)
        if norm is not None:
            return terms.sum() / norm
        return terms.mean() if self.weights is None else terms.sum() / self.weights[y].sum()


def make_loss(tp: TrainParams, labels: np.ndarray, n_classes: int, device: torch.device) -> Loss:
    """Binary: BCE on one logit with pos_weight; more classes: cross entropy. Both take class weights
    (normalised by their sum, as cross entropy does) and label smoothing."""
    weights = class_weights(tp, labels, n_classes)
    weights = weights.to(device) if weights is not None else None
    smooth = tp.label_smoothing
    if n_classes > 2:
        if tp.pos_weight != 1.0:
            raise CxrError("pos_weight is for binary labels; with data.labels three_class use class_weights")
        return Loss(lambda logits, y: F.cross_entropy(logits.float(), y, weight=weights, label_smoothing=smooth,
                                                      reduction="none"), weights)
    pos_weight = torch.tensor(_pos_weight(tp, labels), device=device)

    def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = y.float() * (1 - smooth) + smooth / 2
        per = F.binary_cross_entropy_with_logits(logits.reshape(-1).float(), target, pos_weight=pos_weight,
                                                 reduction="none")
        return per if weights is None else per * weights[y]

    return Loss(bce, weights)


def _pos_weight(tp: TrainParams, labels: np.ndarray) -> float:
    if tp.pos_weight != "auto":
        return float(tp.pos_weight)
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise CxrError("the training split has no PNEUMONIA images; pos_weight=auto needs both classes")
    return (len(labels) - n_pos) / n_pos


def trained_prior(tp: TrainParams, labels: np.ndarray, n_classes: int) -> float:
    """P(pneumonia, of any kind) as the training objective weighs the classes: each class equally with balanced
    sampling or class weights, the share of pneumonia times pos_weight otherwise (binary), else the share."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if tp.sampler == "balanced" or tp.class_weights == "balanced":
        mass = (counts > 0).astype(float)
    else:
        mass = counts
        if n_classes == 2 and counts[1] > 0:
            mass[1] *= _pos_weight(tp, labels)
    return float(mass[1:].sum() / mass.sum())


def make_optimizer(tp: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())  # frozen ones get no gradient, and optimizers skip those
    if tp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)
    cls = torch.optim.AdamW if tp.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=tp.lr, weight_decay=tp.weight_decay)


def make_scheduler(tp: TrainParams, opt: torch.optim.Optimizer, steps_per_epoch: int) -> tuple[object, str]:
    """The scheduler and when to step it: "batch" (warm-up, cosine, one-cycle) or "epoch" (plateau, on val loss)."""
    total, warm = tp.epochs * steps_per_epoch, tp.warmup_epochs * steps_per_epoch
    if tp.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.2, patience=max(1, tp.patience // 2)), "epoch"
    if tp.scheduler == "onecycle":
        pct = warm / total if warm else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tp.lr, total_steps=total, pct_start=pct), "batch"

    def factor(step: int) -> float:
        if step < warm:  # linear from lr/100 to lr
            return 0.01 + 0.99 * step / warm
        if tp.scheduler == "cosine":  # from lr at the end of the warm-up to 0 at the last step
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / (total - warm)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), "batch"


def augment(x: torch.Tensor, tp: TrainParams, gen: torch.Generator, rows: torch.Tensor | None = None,
            n: int = 0) -> torch.Tensor:
    """X-ray augmentation of a whole float batch (B, 1, H, W) in [0, 1] at once on its device: rotation, zoom,
    shift (and flip) by one affine resampling, then gamma, contrast, brightness, sharpness, noise and borders.
    With `rows`, x holds those rows of an n-image batch: the whole batch's random numbers are drawn and these
    rows' kept, so every image gets what it would in one process and the generator stays the same on every
    rank."""
    b, dev = x.shape[0], x.device
    n = b if rows is None else n

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t[rows]

    def uniform(scale: float = 1.0) -> torch.Tensor:  # in [-scale, scale), one per image
        return pick((torch.rand(n, device=dev, generator=gen) * 2 - 1) * scale)

    angle, zoom = uniform(math.radians(tp.aug_rotation)), 1 + uniform(tp.aug_scale)
    shift_x, shift_y = uniform(2 * tp.aug_translate), uniform(2 * tp.aug_translate)  # the side spans 2
    flip = pick(torch.where(torch.rand(n, device=dev, generator=gen) < 0.5, -1.0, 1.0)) if tp.aug_hflip \
        else torch.ones(b, device=dev)
    if (tp.aug_rotation or tp.aug_scale or tp.aug_translate or tp.aug_hflip) and b:  # a rank may hold none
        cos, sin = angle.cos() / zoom, angle.sin() / zoom  # theta maps output to input: 1/zoom magnifies
        theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], -1), torch.stack([sin * flip, cos, shift_y], -1)],
                            1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if tp.aug_gamma:
        x = x.clamp(1e-4, 1).pow(uniform(tp.aug_gamma).exp().view(b, 1, 1, 1))
    contrast = (1 + uniform(tp.aug_contrast)).view(b, 1, 1, 1)
    brightness = uniform(tp.aug_brightness).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if tp.aug_sharpness:  # an acquisition's sharpness: unsharp masking with a random sign and strength
        blur = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = x + uniform(tp.aug_sharpness).view(b, 1, 1, 1) * (x - blur)
    if tp.aug_noise:
        sigma = pick(torch.rand(n, 1, 1, 1, device=dev, generator=gen)) * tp.aug_noise
        x = x + sigma * pick(torch.randn((n, *x.shape[1:]), device=dev, generator=gen))
    if tp.aug_border:  # collimation and the text markers at the edges: strips of each side set to black
        top, bottom, left, right = ((uniform(0.5) + 0.5).view(b, 1) * tp.aug_border for _ in range(4))
        along_h, along_w = ((torch.arange(side, device=dev) + 0.5) / side for side in x.shape[-2:])  # pixel centres
        keep = (((along_h >= top) & (along_h < 1 - bottom))[:, :, None]
                & ((along_w >= left) & (along_w < 1 - right))[:, None, :])
        x = x * keep[:, None]
    return x.clamp_(0, 1)


def epoch_order(labels: torch.Tensor, sampler: str, gen: torch.Generator) -> torch.Tensor:
    """One epoch's indices: a permutation, or (balanced) as many draws with replacement, each class equally
    likely, so every batch is about half NORMAL without weighting the loss."""
    if sampler == "shuffle":
        return torch.randperm(len(labels), generator=gen)
    counts = torch.bincount(labels.cpu())
    weights = (1.0 / counts.double())[labels.cpu()]
    return torch.multinomial(weights, len(labels), replacement=True, generator=gen)


def mixup_pairs(alpha: float, gen: torch.Generator, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Mixup (Zhang et al. 2018) for an n-image batch: the weight of each image, from Beta(alpha, alpha), and the
    order of the partners blended into it; the loss is blended with the same weight. Both come from `gen`, the
    epoch's shuffle generator, which every rank holds alike (and resume states keep)."""
    perm = torch.randperm(n, generator=gen)
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).beta(alpha, alpha))
    return lam, perm.to(device)
