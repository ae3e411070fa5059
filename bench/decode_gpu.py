"""Grayscale conversion on the GPU against the grayscale stage, on the same real JPEGs, in one run:

1. stage:  the grayscale stage's decode (`cxr.data.gray.decode`: Pillow, JPEG draft scaling, Lanczos) on
           every core;
2. device: `torchvision.io.decode_jpeg` on the device (nvJPEG on CUDA) in batches, straight to gray, then an
           antialiased bilinear resize there and the uint8 images back on the host.

It prints images/s, the speed-up and how far the device's images are from the stage's (mean and max absolute
difference in gray levels: the resize filters and draft scaling differ).

    python bench/decode_gpu.py                           # the full-resolution sample at 224 px, on CUDA
    python bench/decode_gpu.py --device cpu --limit 20   # the same code on the CPU (the tests' twin)
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from cxr.data.gray import decode

SHARED = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def on_device(files: list[Path], size: int, device: torch.device, batch: int) -> tuple[np.ndarray, float]:
    """(images, images/s). The files' bytes are read first: the decode is timed, not the disk."""
    data = [read_file(str(f)) for f in files]
    out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for i in range(0, len(data), batch):
        for im in decode_jpeg(data[i:i + batch], mode=ImageReadMode.GRAY, device=device):
            small = F.interpolate(im[None].float(), size=(size, size), mode="bilinear", antialias=True)
            out.append(small.round_().clamp_(0, 255).to(torch.uint8)[0, 0])
    images = torch.stack(out).cpu().numpy()  # on the host, as the stage's arrays are
    return images, len(files) / (time.perf_counter() - t0)


def stage(files: list[Path], size: int, workers: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    with Pool(workers) as pool:
        results = pool.map(partial(decode, sizes=[size], fit="stretch"), [(f.name, str(f)) for f in files],
                           chunksize=8)
    rate = len(files) / (time.perf_counter() - t0)
    return np.stack([r[0][0] for r in results]), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=SHARED / "chest_xray_fullres_sample")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="the first N files only")
    args = parser.parse_args()
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:args.limit or None]
    if not files:
        raise SystemExit(f"error: no JPEGs under {args.folder}: set CXR_SHARED_DATA or --folder")
    device = torch.device(args.device)
    on_device(files[:2], args.size, device, args.batch)  # warm-up: CUDA context and nvJPEG handles
    ours, ours_rate = stage(files, args.size, os.cpu_count() or 1)
    dev, dev_rate = on_device(files, args.size, device, args.batch)
    diff = np.abs(ours.astype(np.int16) - dev.astype(np.int16))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (torchvision's libjpeg)"
    print(f"{len(files)} JPEGs from {args.folder} to {args.size} px; device: {name}; stage: {os.cpu_count()} cores")
    print("| method | img/s | vs stage | mean abs diff | max abs diff |")
    print("|---|---|---|---|---|")
    print(f"| stage (Pillow, every core) | {ours_rate:,.0f} | 1.00x | 0 | 0 |")
    print(f"| decode_jpeg on {device.type} | {dev_rate:,.0f} | {dev_rate / ours_rate:.2f}x | {diff.mean():.2f} | "
          f"{diff.max()} |")


if __name__ == "__main__":
    main()
