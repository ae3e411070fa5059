"""Training speed of every registered arch: our loop (the real `fit`: the split as uint8 on the device, batches
sliced and scaled there) in each precision mode, against a naive loop (a DataLoader over per-image float32
tensors, float32, a `loss.item()` per batch), in the same run on the same images.

    python bench/train_speed.py                       # every arch at 64 and 128 px (CUDA: 224 px)
    python bench/train_speed.py --archs xrnet --sizes 128 --compile --repeats 5

Each cell is images/s over one epoch, as `median (min)` of --repeats epochs after a warm-up epoch. Modes:
float32; bf16 autocast; float32 in channels_last; bf16 + channels_last; with --compile, the last under
torch.compile (inductor), whose first epoch (compile included) is reported as seconds beyond a warm epoch.
`auto` is the mode `train.cpu_bf16: auto` picks on this machine (cxr.training.precision). Synthetic images:
speed does not depend on content.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxr.data.store import Split
from cxr.inference import pick_device
from cxr.models import list_models
from cxr.params import TrainParams
from cxr.training.loop import fit, make_card, seed_everything
from cxr.training.precision import Mode, native_bf16, training_mode

MODES = {"float32": Mode(), "bf16": Mode(bf16=True), "float32+cl": Mode(channels_last=True),
         "bf16+cl": Mode(bf16=True, channels_last=True)}
CLASSES = ["NORMAL", "PNEUMONIA"]


def ours(split: Split, tp: TrainParams, mode: Mode, repeats: int) -> tuple[list[float], float]:
    """Images/s of each epoch after the first, and the first epoch's extra seconds (warm-up, compiling)."""
    val = Split(split.images[:16], split.labels[:16], split.meta[:16])
    tp = dataclasses.replace(tp, epochs=repeats + 1)
    _, history = fit(split, val, tp, make_card(tp, split, CLASSES), seed=0, mode=mode)
    warm = statistics.median(r["seconds"] for r in history[1:])
    return [r["images_per_s"] for r in history[1:]], history[0]["seconds"] - warm


def naive(split: Split, tp: TrainParams, repeats: int) -> list[float]:
    """The usual tutorial loop: per-image float tensors, DataLoader batching on the host, float32."""
    seed_everything(0)
    device = pick_device()
    data = [(torch.from_numpy(im).float().div(255).unsqueeze(0), torch.tensor(float(y)))
            for im, y in zip(split.images, split.labels, strict=True)]
    loader = DataLoader(data, batch_size=tp.batch_size, shuffle=True)
    model = make_card(tp, split, CLASSES).build().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tp.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    rates = []
    for _ in range(repeats + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x).reshape(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the running-loss print of most loops: a host sync per batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(data) / (time.perf_counter() - t0))
    return rates[1:]


def images_for(model: nn.Module, size: int, batch: int, seconds: float) -> int:
    """On a CPU: as many whole batches as train in about `seconds` in float32 (1 to 4077/batch of them), so
    fast archs are not timed on a few milliseconds and slow ones do not take minutes."""
    x = torch.rand(8, 1, size, size)
    for _ in range(2):  # the second step is warm
        t0 = time.perf_counter()
        model(x).sum().backward()
    per_image = (time.perf_counter() - t0) / 8
    return min(max(int(seconds / per_image / batch), 1), 4077 // batch) * batch


def cell(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(a for a in list_models() if a != "ensemble"))  # trained members
    parser.add_argument("--sizes", default="", help="comma-separated; default 64,128 on a CPU, 224 on CUDA")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=0, help="per epoch; default 4077 on CUDA (the hub train "
                        "split), on a CPU enough for about --seconds per float32 epoch")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--modes", default=",".join(MODES), help=f"ours' modes, of {', '.join(MODES)}")
    parser.add_argument("--compile", action="store_true", help="also bf16+cl under torch.compile (inductor)")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    device = pick_device()
    cuda = device.type == "cuda"
    sizes = [int(s) for s in (args.sizes or ("224" if cuda else "64,128")).split(",")]
    modes = {m: MODES[m] for m in args.modes.split(",")}
    name = torch.cuda.get_device_name() if cuda else \
        f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads, native bf16: {native_bf16()}"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; images/s as median (min) of "
          f"{args.repeats} epochs after a warm-up epoch")
    cols = [*modes, *(["bf16+cl compiled", "compile s"] if args.compile else []), "naive", "auto", "auto/naive"]
    print(f"| arch | px | images/epoch | {' | '.join(cols)} |")
    print("|---|---|---|" + "---|" * len(cols))
    rng = np.random.default_rng(0)
    for size in sizes:
        pool = rng.integers(0, 256, (4077, size, size), dtype=np.uint8)
        for arch in args.archs.split(","):
            tp = TrainParams(arch=arch, batch_size=args.batch, patience=0)
            model = make_card(tp, Split(pool[:8], np.zeros(8, dtype=np.int64), []), CLASSES).build()
            n = args.images or (4077 if cuda else images_for(model, size, args.batch, args.seconds))
            split = Split(pool[:n], (rng.random(n) < 0.7).astype(np.int64), [{} for _ in range(n)])
            rates = {m: ours(split, tp, mode, args.repeats)[0] for m, mode in modes.items()}
            extra = []
            if args.compile:
                compiled, compile_s = ours(split, dataclasses.replace(tp, compile=True),
                                           MODES["bf16+cl"], args.repeats)
                extra = [cell(compiled), f"{compile_s:.1f}"]
            slow = naive(split, tp, args.repeats)
            auto = training_mode(device, arch)
            auto_name = next((m for m, mode in MODES.items() if mode == auto), auto.name)
            auto_rates = rates.get(auto_name) or ours(split, tp, auto, args.repeats)[0]
            speedup = statistics.median(auto_rates) / statistics.median(slow)
            cells = [arch, str(size), str(n), *(cell(rates[m]) for m in modes), *extra, cell(slow), auto_name,
                     f"{speedup:.2f}x"]
            print(f"| {' | '.join(cells)} |", flush=True)
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
