"""Data-parallel training over several processes (torch.distributed): how many, launching them with torchrun,
the process group, which images each rank holds, and a batch norm that sees the whole batch on any device.

A global batch is the one a single process would train on; each rank holds every training image and computes
every world-th image of the batch, and DDP averages the gradients. Losses are divided by the whole batch's weight, so
the update equals the one-process update (BatchNorm aside: per rank unless `sync_batchnorm`)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from cxr.errors import CxrError

log = logging.getLogger(__name__)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device_count(setting: int | str) -> int:
    """`train.devices` as a number of processes: `auto` is every visible GPU (1 without one). More processes
    than GPUs is refused; on a machine without GPUs a number runs that many CPU processes (gloo), which is
    for testing: they share the cores."""
    gpus = torch.cuda.device_count()
    if setting == "auto":
        return max(gpus, 1)
    n = int(setting)
    if gpus and n > gpus:
        raise CxrError(f"train.devices: {n}, but {gpus} GPU(s) are visible; use {gpus} or auto")
    return n


def launch(n: int, argv: Sequence[str]) -> int:
    """Run this script again as `n` torchrun processes on this machine; returns their exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *argv]
    log.info("launching %d processes: %s", n, " ".join(cmd))
    return subprocess.run(cmd).returncode


def launched() -> bool:
    """Whether this process is one of torchrun's (it sets these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def device() -> torch.device:
    """This process's device: its own GPU under torchrun, else the one GPU or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The process group of a torchrun launch (NCCL on GPUs, gloo on CPUs); nothing outside one."""
    if not launched() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


class Step(NamedTuple):
    images: torch.Tensor  # this rank's images of the batch, as indices into the split (on the device)
    rows: torch.Tensor | None  # their positions in the batch (on the device); None in one process (all of them)
    batch: torch.Tensor  # the whole batch's indices into the split (on the CPU)


def steps(order: torch.Tensor, batch_size: int, device: torch.device, world: int, me: int) -> list[Step]:
    """Rank `me` of `world`'s steps of an epoch over `order` (the whole split's indices, on the CPU), worked out
    on the CPU and copied to the device in one go: no device sync per step. Each rank takes positions me,
    me + world, ... of every batch (every rank holds every image), so an epoch trains each image of `order` once
    for any batch size and number of ranks. A rank may get no image of a last batch smaller than the world: it
    steps on an empty batch, contributing nothing, since DDP needs every rank to step."""
    batches = list(order.split(batch_size))
    if world == 1:
        return [Step(b, None, c) for b, c in zip(order.to(device).split(batch_size), batches, strict=True)]
    rows = [torch.arange(len(b))[me::world] for b in batches]
    sizes = [len(r) for r in rows]
    mine = torch.cat([b[r] for b, r in zip(batches, rows, strict=True)]).to(device).split(sizes)
    moved = torch.cat(rows).to(device).split(sizes)
    return [Step(m, r, b) for m, r, b in zip(mine, moved, batches, strict=True)]


def all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Each value summed over the ranks (the values themselves with one process)."""
    if world_size() == 1:
        return list(values)
    out = torch.stack(values)
    dist.all_reduce(out)
    return list(out)


def from_rank0(value: float) -> float:
    """Rank 0's value on every rank: decisions (early stopping, best epoch) taken once, the same everywhere."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return float(t.item())


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch across ranks, on any device.
    torch.nn.SyncBatchNorm (used on GPUs) refuses CPU tensors; this one (gloo, CPU) is plain autograd over a
    differentiable all_reduce of the per-channel count, sum and sum of squares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        local = torch.cat([xf.new_tensor([x.shape[0] * x.shape[2] * x.shape[3]]), xf.sum((0, 2, 3)),
                           xf.square().sum((0, 2, 3))])
        with warnings.catch_warnings():  # deprecated for a private API; still the differentiable one
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(local)
        count, c = total[0], self.num_features
        mean = total[1:1 + c] / count
        var = total[1 + c:] / count - mean.square()
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp(min=1), alpha=m)
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm2d computing whole-batch statistics: torch's SyncBatchNorm on GPUs, ours
    on CPUs. The state dict keeps its keys, so the weights load into the plain model."""
    if torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats).to(next(child.buffers(), torch.empty(0)).device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child)
    return model


def wrap(model: nn.Module, find_unused: bool) -> nn.Module:
    """The model as DDP under torchrun (itself in one process). `find_unused`: frozen layers get no gradient."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = device()
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
