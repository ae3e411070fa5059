"""Train one variant: batches sliced from a uint8 tensor on the device, early stopping, best weights kept."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from cxr.data.store import Split
from cxr.errors import CxrError
from cxr.models import Classifier, build_model
from cxr.params import TrainParams

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The whole split as uint8 (N, 1, H, W) on the device: 4x smaller than float32, converted per batch."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int,
             order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, ...]]:
    n = x.shape[0]
    for i in range(0, n, size):
        idx = order[i:i + size] if order is not None else slice(i, i + size)
        yield x[idx].float().div_(255.0), y[idx]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    dummy = torch.zeros(x.shape[0], device=x.device)
    return torch.cat([model(xb).reshape(-1).float() for xb, _ in _batches(x, dummy, batch_size, None)])


def build_classifier(tp: TrainParams, image_size: int, mean: float, std: float) -> Classifier:
    return Classifier(build_model(tp.arch, image_size=image_size, **tp.model), mean, std)


def _pos_weight(tp: TrainParams, labels: np.ndarray) -> float:
    if tp.pos_weight != "auto":
        return float(tp.pos_weight)
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise CxrError("the training split has no PNEUMONIA images; pos_weight=auto needs both classes")
    return (len(labels) - n_pos) / n_pos


def fit(train: Split, val: Split, tp: TrainParams, seed: int,
        on_epoch: Callable[[dict[str, Any]], None] = lambda row: None) -> tuple[Classifier, list[dict[str, Any]]]:
    """Train, evaluate on val each epoch, stop after `patience` epochs without a lower val loss, and
    return the model with the best epoch's weights and the per-epoch history."""
    seed_everything(seed)
    device = pick_device()
    image_size = train.images.shape[-1]
    scaled = train.images.astype(np.float32) / 255.0
    model = build_classifier(tp, image_size, float(scaled.mean()), float(scaled.std()) or 1.0).to(device)
    del scaled
    x_tr, y_tr = to_device(train.images, device), torch.from_numpy(train.labels).float().to(device)
    x_va, y_va = to_device(val.images, device), torch.from_numpy(val.labels).float().to(device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(_pos_weight(tp, train.labels), device=device))
    if tp.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=tp.lr, momentum=tp.momentum,
                                                     weight_decay=tp.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    best, best_state, since_best = float("inf"), copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, tp.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y_tr), generator=gen).to(device)
        loss_sum = correct = 0.0
        for xb, yb in tqdm(_batches(x_tr, y_tr, tp.batch_size, order), total=-(-len(y_tr) // tp.batch_size),
                           desc=f"epoch {epoch}/{tp.epochs}", unit="batch", leave=False):
            logits = model(xb).reshape(-1)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(yb)
            correct += ((logits > 0).float() == yb).sum().item()
        if not np.isfinite(loss_sum):
            raise CxrError(f"training diverged (loss is {loss_sum}) at epoch {epoch}; lower models.<variant>.lr")
        seconds = time.perf_counter() - t0
        val_logits = predict_logits(model, x_va)
        row = {"epoch": epoch, "train_loss": loss_sum / len(y_tr), "train_accuracy": correct / len(y_tr),
               "val_loss": loss_fn(val_logits, y_va).item(),
               "val_accuracy": ((val_logits > 0).float() == y_va).float().mean().item(),
               "val_auroc": binary_auroc(val_logits.sigmoid(), y_va.long()).item(),
               "seconds": seconds, "images_per_s": len(y_tr) / seconds}
        history.append(row)
        on_epoch(row)
        log.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %.3f | %.1fs", epoch,
                 row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"], row["val_auroc"],
                 seconds)
        if row["val_loss"] < best:
            best, best_state, since_best = row["val_loss"], copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= tp.patience:
                log.info("early stop: no lower val loss for %d epochs", tp.patience)
                break
    model.load_state_dict(best_state)
    return model.cpu(), history


def save_checkpoint(path: Path, model: Classifier, tp: TrainParams, image_size: int, **extra: Any) -> None:
    torch.save({"arch": tp.arch, "model": tp.model, "image_size": image_size, "mean": model.mean.item(),
                "std": model.std.item(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[Classifier, dict[str, Any]]:
    if not path.exists():
        raise CxrError(f"{path} is missing; run `dvc repro` to train it")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tp = TrainParams(arch=ckpt["arch"], model=ckpt["model"])
    model = build_classifier(tp, ckpt["image_size"], ckpt["mean"], ckpt["std"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
