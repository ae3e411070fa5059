"""Training speed of every registered arch: our loop (the split as uint8 on the device, batches sliced and
scaled there, channels_last + bf16 autocast on CUDA) against a naive loop (a DataLoader over per-image
float32 tensors, no channels_last, no autocast), in the same run on the same images.

    python bench/train_speed.py                      # every arch, 224 px, on CUDA if present
    python bench/train_speed.py --archs resnet18 --images 4077 --compile

Images/s are of the second epoch (the first warms up cuDNN and the allocator). Synthetic images: speed
does not depend on content.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
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


def ours(split: Split, tp: TrainParams) -> float:
    val = Split(split.images[:64], split.labels[:64], split.meta[:64])
    _, history = fit(split, val, tp, make_card(tp, split, ["NORMAL", "PNEUMONIA"]), seed=0)
    return history[-1]["images_per_s"]


def naive(split: Split, tp: TrainParams) -> float:
    """The usual tutorial loop: per-image float tensors, DataLoader batching on the host, float32."""
    seed_everything(0)
    device = pick_device()
    data = [(torch.from_numpy(im).float().div(255).unsqueeze(0), torch.tensor(float(y)))
            for im, y in zip(split.images, split.labels, strict=True)]
    loader = DataLoader(data, batch_size=tp.batch_size, shuffle=True)
    model = make_card(tp, split, ["NORMAL", "PNEUMONIA"]).build().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tp.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    rate = 0.0
    for _ in range(tp.epochs):
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
        rate = len(data) / (time.perf_counter() - t0)
    return rate


def images_for(model: nn.Module, args: argparse.Namespace) -> int:
    """On a CPU: as many images as train in about args.seconds (whole batches, 2 to 4077/batch of them),
    so fast archs are not timed on a few milliseconds and slow ones do not take minutes."""
    x = torch.rand(8, 1, args.size, args.size)
    for _ in range(2):  # the second step is warm
        t0 = time.perf_counter()
        model(x).sum().backward()
    per_image = (time.perf_counter() - t0) / 8
    batches = int(args.seconds / per_image / args.batch)
    return min(max(batches, 2), 4077 // args.batch) * args.batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(list_models()))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=0, help="per epoch; default 4077 on CUDA (the hub train "
                        "split), on CPU enough for about --seconds per epoch")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile our loop's model")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    device = pick_device()
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (4077, args.size, args.size), dtype=np.uint8)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.size} px, batch {args.batch}; "
          f"ours: {'bf16 autocast, channels_last' if device.type == 'cuda' else 'float32'}"
          f"{', torch.compile' if args.compile else ''}")
    print("| arch | params (M) | images/epoch | ours img/s | naive img/s | speed-up | ours s/epoch (4077 img) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        tp = TrainParams(arch=arch, epochs=2, batch_size=args.batch, patience=99, compile=args.compile)
        model = make_card(tp, Split(pool[:8], np.zeros(8, dtype=np.int64), []), ["NORMAL", "PNEUMONIA"]).build()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        n = args.images or (4077 if device.type == "cuda" else images_for(model, args))
        split = Split(pool[:n], (rng.random(n) < 0.7).astype(np.int64), [{} for _ in range(n)])
        a, b = ours(split, tp), naive(split, tp)
        print(f"| {arch} | {params:.1f} | {n} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x | {4077 / a:.2f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
