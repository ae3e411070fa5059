"""Train one variant: batches sliced from a uint8 tensor on the device, augmented there, bf16 autocast on
CUDA, early stopping with the best weights kept, and a checkpoint each epoch to resume from."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cxr.data.store import Split
from cxr.errors import CxrError
from cxr.evaluation import metrics
from cxr.models import Classifier, build_model
from cxr.params import TrainParams
from cxr.training.parts import augment, make_loss, make_optimizer, make_scheduler

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


def autocast(device: torch.device) -> AbstractContextManager:
    # bf16 needs no loss scaling; on CPU autocast is slower than float32, so it stays off there.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batches(x: torch.Tensor, size: int, order: torch.Tensor | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    for i in range(0, x.shape[0], size):
        idx = order[i:i + size] if order is not None else slice(i, i + size)
        xb = x[idx].float().div_(255.0)
        if x.is_cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield idx, xb


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, logits) in float32."""
    with contextlib.suppress(NotImplementedError):  # a pt2 program loaded from MLflow: exported in eval mode
        model.eval()
    with autocast(x.device):
        return torch.cat([model(xb).float() for _, xb in _batches(x, batch_size)])


def probs_of(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """Probabilities for uint8 (N, H, W) images, on the best device, returned on the CPU."""
    device = pick_device()
    return probabilities(predict_logits(model.to(device), to_device(images, device))).cpu()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N,) P(positive) for one logit, else (N, classes) softmax."""
    return logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(1)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def auroc(logits: torch.Tensor, y: torch.Tensor) -> float:
    if y.unique().numel() < max(logits.shape[1], 2):
        return math.nan  # undefined without every class (a rate over no cases would count as 0)
    return metrics.auroc(probabilities(logits), y)


def mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Of a uint8 split scaled to [0, 1], in chunks: never a float copy of the whole split."""
    total = squares = 0.0
    for chunk in x.split(256):
        c = chunk.float().div_(255.0)
        total, squares = total + c.sum().item(), squares + c.square().sum().item()
    mean = total / x.numel()
    return mean, math.sqrt(max(squares / x.numel() - mean * mean, 0.0)) or 1.0


def build_classifier(tp: TrainParams, image_size: int, n_classes: int, mean: float, std: float) -> Classifier:
    logits = 1 if n_classes == 2 else n_classes
    return Classifier(build_model(tp.arch, num_classes=logits, image_size=image_size, **tp.model), mean, std)


def _set_frozen(model: Classifier, frozen: bool) -> None:
    head = model.net.head_name
    for name, param in model.net.named_parameters():
        param.requires_grad_(not frozen or name.startswith(head + "."))


def fit(train: Split, val: Split, tp: TrainParams, seed: int, n_classes: int = 2, name: str = "model",
        on_epoch: Callable[[dict[str, Any]], None] = lambda row: None, state: dict[str, Any] | None = None,
        save_state: Callable[[dict[str, Any]], None] | None = None) -> tuple[Classifier, list[dict[str, Any]]]:
    """Train, evaluate on val each epoch, stop after `patience` epochs without a lower val loss, and return
    the model with the best epoch's weights and the per-epoch history. `save_state` gets a resumable state
    after each epoch; passing that back as `state` continues from there (identically on CPU)."""
    seed_everything(seed)
    device = pick_device()
    image_size = train.images.shape[-1]
    x_tr, x_va = to_device(train.images, device), to_device(val.images, device)
    y_tr, y_va = torch.from_numpy(train.labels).to(device), torch.from_numpy(val.labels).to(device)
    model = build_classifier(tp, image_size, n_classes, *mean_std(x_tr)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if tp.freeze_epochs and not hasattr(model.net, "head_name"):
        raise CxrError(f"{name}: arch {tp.arch!r} has no pretrained base to freeze; set freeze_epochs: 0")
    step_model = torch.compile(model) if tp.compile else model
    loss_fn = make_loss(tp, train.labels, n_classes, device)
    opt = make_optimizer(tp, model)
    steps = math.ceil(len(y_tr) / tp.batch_size)
    sched, sched_every = make_scheduler(tp, opt, steps)
    shuffle = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    history: list[dict[str, Any]] = []
    best, best_state, since_best, start = float("inf"), copy.deepcopy(model.state_dict()), 0, 1
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best, best_state = state["history"], state["best"], state["best_state"]
        since_best = state["since_best"]
        shuffle.set_state(state["shuffle_rng"])
        aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start = state["epoch"] + 1
        log.info("%s: resuming after epoch %d", name, state["epoch"])
    for epoch in range(start, tp.epochs + 1):
        t0 = time.perf_counter()
        if tp.freeze_epochs:
            _set_frozen(model, frozen=epoch <= tp.freeze_epochs)
        step_model.train()
        order = torch.randperm(len(y_tr), generator=shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for idx, xb in tqdm(_batches(x_tr, tp.batch_size, order), total=steps, desc=f"{name} epoch {epoch}/{tp.epochs}",
                            unit="batch", leave=False):
            yb = y_tr[idx]
            if tp.augment:
                xb = augment(xb, tp, aug_gen)
            with autocast(device):
                logits = step_model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tp.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
            opt.step()
            if sched_every == "batch":
                sched.step()
            # Sums stay on the device: no host sync per batch.
            loss_sum += loss.detach() * len(yb)
            correct += (predictions(logits.detach().float()) == yb).sum()
        train_loss = loss_sum.item() / len(y_tr)
        if not math.isfinite(train_loss):
            raise CxrError(f"{name}: training diverged (loss {train_loss}) in epoch {epoch}; lower its lr "
                           "or set grad_clip")
        seconds = time.perf_counter() - t0
        val_logits = predict_logits(step_model, x_va)
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": correct.item() / len(y_tr),
               "val_loss": loss_fn(val_logits, y_va).item(),
               "val_accuracy": (predictions(val_logits) == y_va).float().mean().item(),
               "val_auroc": auroc(val_logits, y_va), "lr": opt.param_groups[0]["lr"],
               "seconds": seconds, "images_per_s": len(y_tr) / seconds}
        if sched_every == "epoch":
            sched.step(row["val_loss"])
        history.append(row)
        log.info("%s epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %.3f | %.1fs", name, epoch,
                 row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"], row["val_auroc"],
                 seconds)
        if row["val_loss"] < best:
            best, best_state, since_best = row["val_loss"], copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
        stop = since_best >= tp.patience
        if save_state and not stop and epoch < tp.epochs:
            save_state({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "history": history, "best": best, "best_state": best_state,
                        "since_best": since_best, "shuffle_rng": shuffle.get_state(), "aug_rng": aug_gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {})})
        on_epoch(row)
        if stop:
            log.info("%s: early stop, no lower val loss for %d epochs", name, tp.patience)
            break
    model.load_state_dict(best_state)
    return model.cpu(), history


def save_checkpoint(path: Path, model: Classifier, tp: TrainParams, image_size: int, classes: list[str],
                    **extra: Any) -> None:
    torch.save({"arch": tp.arch, "model": tp.model, "image_size": image_size, "classes": classes,
                "mean": model.mean.item(), "std": model.std.item(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[Classifier, dict[str, Any]]:
    if not path.exists():
        raise CxrError(f"{path} is missing; run `dvc repro` to train it")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # pretrained only shapes the start of training; the saved weights replace it (and need no download).
    tp = TrainParams(arch=ckpt["arch"], model={**ckpt["model"], **({"pretrained": False} if "pretrained" in
                                                                  ckpt["model"] else {})})
    model = build_classifier(tp, ckpt["image_size"], len(ckpt["classes"]), ckpt["mean"], ckpt["std"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
