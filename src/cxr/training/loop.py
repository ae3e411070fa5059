"""Train one variant, torchvision-style: `train_one_epoch` and `evaluate` are small, `fit` wires them with early
stopping (best weights kept). Batches are sliced from a uint8 tensor on the device and augmented there; bf16
autocast and channels_last on CUDA, and on CPUs with native bf16 for the archs it speeds up, for training steps only
(cxr.training.precision; evaluation is float32, as everywhere). Under torchrun each process trains its part of
every batch (cxr.training.ddp)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cxr import metrics, task
from cxr.data.store import Split
from cxr.errors import CxrError
from cxr.inference import ModelCard, predict_logits, to_device
from cxr.io import progress
from cxr.models import Classifier
from cxr.params import TrainParams
from cxr.training import ddp
from cxr.training.parts import (
    Loss,
    augment,
    epoch_order,
    make_loss,
    make_optimizer,
    make_scheduler,
    mixup_pairs,
    trained_prior,
)
from cxr.training.precision import FLOAT32, Mode, autocast, training_mode

log = logging.getLogger(__name__)
State = dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_std(images: np.ndarray) -> tuple[float, float]:
    """Of uint8 images scaled to [0, 1], in chunks: never a float copy of the whole split."""
    total = squares = 0.0
    for i in range(0, len(images), 256):
        c = torch.from_numpy(np.ascontiguousarray(images[i:i + 256])).double().div_(255.0)
        total, squares = total + c.sum().item(), squares + c.square().sum().item()
    mean = total / images.size
    return mean, math.sqrt(max(squares / images.size - mean * mean, 0.0)) or 1.0


def make_card(tp: TrainParams, train: Split, classes: list[str], variant: str = "model", fit: str = "stretch",
              draft: int = 0, equalize: str = "none") -> ModelCard:
    """The card of a model trained with `tp` on `train` (its normalisation comes from there)."""
    size = train.images.shape[-1]
    return ModelCard(variant=variant, arch=tp.arch, image_size=size, classes=tuple(classes), fit=fit,
                     draft=draft or size, equalize=equalize, mean=(ms := mean_std(train.images))[0], std=ms[1],
                     settings=tp.model, prior=trained_prior(tp, train.labels, len(classes)))


def set_frozen(model: Classifier, frozen: bool) -> None:
    """Train only the head: the base's weights get no gradient and its BatchNorm layers keep their running
    statistics (eval mode), as a frozen Keras base does. Call after model.train()."""
    head = model.net.head_name
    for name, param in model.net.named_parameters():
        param.requires_grad_(not frozen or name.startswith(head + "."))
    if frozen:
        for name, module in model.net.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(head):
                module.eval()


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tp: TrainParams, loss_fn: Loss,
                    opt: torch.optim.Optimizer, sched: Any, sched_every: str, shuffle: torch.Generator,
                    aug_gen: torch.Generator, desc: str, ema: AveragedModel | None = None,
                    mode: Mode = FLOAT32) -> tuple[float, float, int]:
    """One pass over the training images (shuffled, or class-balanced draws); returns mean loss and accuracy
    (at p > 0.5, of the unmixed labels) and the number of images trained. `ema` is updated after every step.
    `x` and `y` hold every image and label, on every rank. `mode`: bf16 autocast, channels_last or neither."""
    world = ddp.world_size()
    labels = y.cpu()  # the epoch's plan is made on the CPU (one copy of the labels, not one sync per step)
    order = epoch_order(labels, tp.sampler, shuffle)  # the same on every rank: one generator, one seed
    plan = ddp.steps(order, tp.batch_size, y.device, world, ddp.rank())
    loss_sum, correct = torch.zeros((), device=y.device), torch.zeros((), device=y.device)
    for step in progress(plan, ddp.rank() > 0, desc=desc, unit="batch", leave=False):  # one bar, on a terminal
        rows, n, index, k = step.rows, len(step.batch), step.images, len(step.images)
        if tp.mixup:  # one weight and one pairing for the whole batch, the same on every rank
            lam, perm = mixup_pairs(tp.mixup, shuffle, n, y.device)
            if rows is not None:  # a rank's partners may be in other ranks' rows: it holds every image
                partners = perm[rows]
                index, rows = torch.cat([index, step.batch.to(y.device)[partners]]), torch.cat([rows, partners])
        xb = x[index].float().div_(255.0)
        if mode.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if tp.augment:
            xb = augment(xb, tp, aug_gen, rows, n)
        yb = y[index[:k]]
        if tp.mixup:  # this rank's images blended with their partners, as in one process
            yp = y[index[k:]] if step.rows is not None else yb[perm]
            xb = lam * xb[:k] + (1 - lam) * (xb[k:] if step.rows is not None else xb[perm])
        with autocast(x.device, mode):
            logits = model(xb)
        # Over the whole batch's weight, times the ranks (DDP averages their gradients): the one-process loss.
        norm = loss_fn.norm(labels[step.batch]) / world
        loss = loss_fn(logits, yb, norm)
        if tp.mixup:
            loss = lam * loss + (1 - lam) * loss_fn(logits, yp, norm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tp.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(ddp.unwrap(model))
        if sched_every == "batch":
            sched.step()
        # Sums stay on the device: no host sync per batch, and one all-reduce per epoch.
        loss_sum += loss.detach() / world * n
        correct += (task.predicted(task.probabilities(logits.detach())) == yb).sum()
    loss_sum, correct = ddp.all_sum(loss_sum, correct.float())
    seen = len(order)  # every image of the epoch's order is trained, on one rank or another
    return loss_sum.item() / seen, correct.item() / seen, seen


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss) -> dict[str, float | None]:
    """Validation loss, accuracy (at p > 0.5) and AUROC (None when a class is missing), in float32."""
    logits = predict_logits(model, x)
    probs = task.probabilities(logits)
    return {"val_loss": loss_fn(logits, y).item(), "val_accuracy": (task.predicted(probs) == y).float().mean().item(),
            "val_auroc": metrics.metric("auroc", probs, y, [], 0.5)}


def _snapshot(epoch: int, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, history: list, best: float,
              best_state: State, since_best: int, shuffle: torch.Generator, aug_gen: torch.Generator,
              ema: AveragedModel | None) -> State:
    """The resume state: everything to continue after `epoch` exactly, copied to the CPU (it is written while
    training goes on). The best weights are left out when they are the current ones."""
    return _cpu_copy({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(),
                      "ema": ema.state_dict() if ema is not None else None, "history": history, "best": best,
                      "best_state": best_state if since_best else None, "since_best": since_best,
                      "shuffle_rng": shuffle.get_state(), "aug_rng": aug_gen.get_state(),
                      "aug_device": aug_gen.device.type,
                      "torch_rng": torch.get_rng_state(),
                      **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})})


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _restore(state: State, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, shuffle: torch.Generator,
             aug_gen: torch.Generator, ema: AveragedModel | None) -> tuple[int, list, float, State, int]:
    """Load a _snapshot back; returns (first epoch to run, history, best, best_state, since_best)."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    shuffle.set_state(state["shuffle_rng"])
    if state.get("aug_device", aug_gen.device.type) == aug_gen.device.type:
        aug_gen.set_state(state["aug_rng"])
    else:  # CUDA and CPU generators are different algorithms: the state cannot cross, a fixed new seed can
        aug_gen.manual_seed(int(state["shuffle_rng"].sum()) + state["epoch"])
        log.info("resuming on %s a state written on %s: augmentation reseeded", aug_gen.device.type,
                 state["aug_device"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    kept = ema.module if ema is not None else model
    best_state = state["best_state"] if state["best_state"] is not None else copy.deepcopy(kept.state_dict())
    return state["epoch"] + 1, state["history"], state["best"], best_state, state["since_best"]


@dataclasses.dataclass
class _Parts:
    """What `fit` trains with: the model as built, as stepped (DDP, compiled) and as evaluated and kept (its EMA
    where on), the data on the device, the loss, the optimiser and its schedule, and the two generators."""
    model: Classifier
    step_model: nn.Module
    val_model: nn.Module
    kept: nn.Module
    ema: AveragedModel | None
    loss_fn: Loss
    opt: torch.optim.Optimizer
    sched: Any
    sched_every: str
    shuffle: torch.Generator
    aug_gen: torch.Generator
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_va: torch.Tensor
    y_va: torch.Tensor
    mode: Mode


def _setup(train: Split, val: Split, tp: TrainParams, card: ModelCard, seed: int, mode: Mode | None) -> _Parts:
    """Seed, then build everything `fit` trains with. The order of the random draws (the model's initial weights
    first) is what makes a run repeatable and a resumed one identical."""
    seed_everything(seed)
    device = ddp.device()
    mode = training_mode(device, tp.arch, tp.cpu_bf16) if mode is None else mode
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once (training only)
    x_tr, x_va = to_device(train.images, device), to_device(val.images, device)
    y_tr, y_va = torch.from_numpy(train.labels).to(device), torch.from_numpy(val.labels).to(device)
    model = card.build(start=True).to(device)
    if tp.sync_batchnorm and ddp.world_size() > 1:
        model = ddp.sync_batchnorm(model)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tp.freeze_epochs and not hasattr(model.net, "head_name"):
        raise CxrError(f"{card.variant}: arch {tp.arch!r} has no pretrained base to freeze; set freeze_epochs: 0")
    step_model = ddp.wrap(model, find_unused=bool(tp.freeze_epochs))
    step_model = torch.compile(step_model) if tp.compile else step_model
    loss_fn = make_loss(tp, train.labels, len(card.classes), device)
    opt = make_optimizer(tp, model)
    sched, sched_every = make_scheduler(tp, opt, math.ceil(len(y_tr) / tp.batch_size))
    shuffle = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    # With EMA on, the average is what is evaluated, early-stopped on and kept (BatchNorm statistics averaged too).
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True) if tp.ema else None
    kept = ema.module if ema is not None else model
    # Every rank evaluates all of val: the same weights give the same scores, with no gather.
    val_model = kept if ema is not None or ddp.world_size() > 1 else step_model
    return _Parts(model, step_model, val_model, kept, ema, loss_fn, opt, sched, sched_every, shuffle, aug_gen,
                  x_tr, y_tr, x_va, y_va, mode)


def _epoch(t: _Parts, tp: TrainParams, epoch: int, name: str) -> dict[str, Any]:
    """Train one epoch and score val: the epoch's history row. Its val loss is rank 0's, on every rank, and an
    epoch-wise schedule steps on it."""
    t0 = time.perf_counter()
    t.step_model.train()
    if tp.freeze_epochs:
        set_frozen(t.model, frozen=epoch <= tp.freeze_epochs)
    desc = f"{name} epoch {epoch}/{tp.epochs}"
    train_loss, train_acc, trained = train_one_epoch(t.step_model, t.x_tr, t.y_tr, tp, t.loss_fn, t.opt, t.sched,
                                                     t.sched_every, t.shuffle, t.aug_gen, desc, t.ema, t.mode)
    if not math.isfinite(train_loss):
        raise CxrError(f"{name}: training diverged (loss {train_loss}) in epoch {epoch}; lower its lr "
                       "or set grad_clip")
    seconds = time.perf_counter() - t0
    row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
           **evaluate(t.val_model, t.x_va, t.y_va, t.loss_fn), "lr": t.opt.param_groups[0]["lr"], "seconds": seconds,
           "images_per_s": trained / seconds}
    row["val_loss"] = ddp.from_rank0(row["val_loss"])  # one decision, taken on every rank alike
    if t.sched_every == "epoch":
        t.sched.step(row["val_loss"])
    return row


def _log_epoch(name: str, row: dict[str, Any]) -> None:
    auroc = "n/a" if row["val_auroc"] is None else f"{row['val_auroc']:.3f}"
    log.info("%s epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %s | %.1fs", name, row["epoch"],
             row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"], auroc, row["seconds"])


def fit(train: Split, val: Split, tp: TrainParams, card: ModelCard, seed: int,
        on_epoch: Callable[[dict[str, Any]], None] = lambda row: None, state: State | None = None,
        save_state: Callable[[State], None] | None = None,
        mode: Mode | None = None) -> tuple[Classifier, list[dict[str, Any]]]:
    """Train, evaluate on val each epoch, stop after `patience` epochs without a lower val loss (0: never),
    and return the model with the best epoch's weights and the per-epoch history. `save_state` gets a
    resumable state after each epoch; passing that back as `state` continues from there (identically on CPU).
    `mode` (default: `precision.training_mode`, from the device, the arch and `tp.cpu_bf16`) says whether
    training steps run in bf16 autocast and channels_last. Under torchrun
    every rank calls this; the returned model is the same everywhere, and a plain one (no DDP, no
    SyncBatchNorm), so its card and file are those of a one-device run."""
    name, world, rank = card.variant, ddp.world_size(), ddp.rank()
    t = _setup(train, val, tp, card, seed, mode)
    history: list[dict[str, Any]] = []
    best, best_state, since_best, start = float("inf"), copy.deepcopy(t.kept.state_dict()), 0, 1
    if state:
        start, history, best, best_state, since_best = _restore(state, t.model, t.opt, t.sched, t.shuffle, t.aug_gen,
                                                                t.ema)
        log.info("%s: resuming after epoch %d", name, start - 1)
    if world > 1:  # dropout: one seed would give every rank's k-th image rank 0's k-th mask
        torch.manual_seed(seed + 7919 * (rank + 1) + start)
    for epoch in range(start, tp.epochs + 1):
        row = _epoch(t, tp, epoch, name)
        history.append(row)
        if rank == 0:
            _log_epoch(name, row)
        if row["val_loss"] < best:
            best, best_state, since_best = row["val_loss"], copy.deepcopy(t.kept.state_dict()), 0
        else:
            since_best += 1
        stop = bool(tp.patience) and since_best >= tp.patience
        if rank == 0 and save_state and not stop and epoch < tp.epochs and epoch % tp.checkpoint_every == 0:
            save_state(_snapshot(epoch, t.model, t.opt, t.sched, history, best, best_state, since_best, t.shuffle,
                                 t.aug_gen, t.ema))
        if rank == 0:
            on_epoch(row)
        if stop:
            if rank == 0:
                log.info("%s: early stop, no lower val loss for %d epochs", name, tp.patience)
            break
    out = card.build()  # plain modules and contiguous weights, whatever trained them
    out.load_state_dict(best_state)
    return out, history
