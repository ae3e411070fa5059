"""A bounded load test of the champion served on 127.0.0.1, one worker, three ways: plain `mlflow models serve
--env-manager local`, `cxr serve` (its checks, request limits and one-line errors), and `cxr serve` writing the
prediction log (CXR_PREDICTION_LOG). Per server: 500 POSTs of one image and 100 of batches of 32 real test JPEGs
(base64, as the server documents), 1 and 8 at a time. Prints latency percentiles, images/s and errors per case,
beside `cxr predict` on the same images in the same run: the command as a user runs it (start-up and model load
included) and its scoring alone (cxr.serving.score, in this process); then what writing the log costs per
image, in this process.

    make quick DATA=../shared/data/chest_xray_224 && .venv/bin/cxr promote   # a champion to serve
    python bench/serve_load.py
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr import serving
from cxr.inference import load_logged
from cxr.jobs.serve import served
from cxr.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def body(images: list[bytes]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode()] for b in images]}}).encode()


def post(url: str, data: bytes) -> tuple[float, bool]:
    """Seconds for one request, and whether it was answered with 200."""
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
            ok = r.status == 200
    except (urllib.error.URLError, OSError):
        ok = False
    return time.perf_counter() - t0, ok


def load(url: str, bodies: list[bytes], per: int, requests: int, concurrent: int) -> dict[str, float]:
    """`requests` POSTs (cycling over `bodies`, `per` images each), `concurrent` in flight at a time."""
    post(url, bodies[0])  # warm: the first request pays for lazy imports
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        done = list(pool.map(lambda i: post(url, bodies[i % len(bodies)]), range(requests)))
    wall = time.perf_counter() - t0
    ms = np.array([s for s, _ in done]) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": p50, "p95": p95, "p99": p99, "errors": sum(not ok for _, ok in done),
            "images_s": requests * per / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/chest-xray-classifier@champion")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray_224" / "test",
                        help="a folder of images (searched recursively)")
    parser.add_argument("--requests", type=int, default=500, help="requests per case of one image")
    parser.add_argument("--batch-requests", type=int, default=100, help="requests per case of more images")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--batches", default="1,32", help="images per request")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(ROOT))
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not files:
        sys.exit(f"error: no images in {args.images}; pass --images FOLDER")
    data = [f.read_bytes() for f in files]
    _, card = load_logged(args.model)
    print(f"{args.model}: {card.variant} ({card.arch}, {card.image_size} px, TTA {len(card.tta_views)}); "
          f"{len(files)} images from {args.images}; {os.cpu_count()} CPUs, shared by the server and this client\n")
    print("| server | images/request | concurrent | requests | errors | p50 ms | p95 ms | p99 ms | images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as logs:
        for name, cxr_serve, env in (("mlflow models serve", False, {}), ("cxr serve", True, {}),
                                     ("cxr serve, logging", True, {serving.LOG_ENV: logs})):
            with served(args.model, dict(os.environ) | env, cxr_serve=cxr_serve, cwd=ROOT) as url:
                for per in map(int, args.batches.split(",")):
                    bodies = [body(data[i:i + per]) for i in range(0, len(data) - per + 1, per)]
                    n = args.requests if per == 1 else args.batch_requests
                    for concurrent in map(int, args.concurrency.split(",")):
                        r = load(url, bodies, per, n, concurrent)
                        print(f"| {name} | {per} | {concurrent} | {n} | {r['errors']} | {r['p50']:.1f} | "
                              f"{r['p95']:.1f} | {r['p99']:.1f} | {r['images_s']:.0f} |", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cxr", "predict", "--csv", "--model", args.model, *map(str, files)],
                   check=True, stdout=subprocess.DEVNULL)
    cli = time.perf_counter() - t0
    model, card = load_logged(args.model)
    decoded = [serving.read(f, card) for f in files]
    images = [d.gray for d in decoded]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        rows = serving.score(model, card, images)
        times.append(time.perf_counter() - t0)
    n = len(files)
    score_s = statistics.median(times)
    print(f"| cxr predict (command, model load included) | {n} | 1 | 1 | 0 | {cli * 1000:.0f} | | | {n / cli:.0f} |")
    print(f"| cxr predict's scoring alone (median of 3) | {n} | 1 | 3 | 0 | {score_s * 1000:.0f} | | | "
          f"{n / score_s:.0f} |")
    print(f"\nThe prediction log, in this process: {log_cost(decoded, rows) * 1e6:.0f} µs per image (a line each, "
          f"written 32 at a time, median of 5 rounds over the {n} images), against {score_s / n * 1e6:.0f} µs per "
          "image to score them.")


def log_cost(decoded: list[serving.Decoded], rows: list[dict]) -> float:
    """Seconds per image to write its line: grey statistics, JSON and one append per 32 images."""
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        log = serving.PredictionLog(folder, {"model": "bench", "version": "0", "model_id": "m-0", "variant": ""})
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(0, len(decoded), 32):
                log.write(decoded[i:i + 32], rows[i:i + 32])
            rounds.append((time.perf_counter() - t0) / len(decoded))
    return statistics.median(rounds)


if __name__ == "__main__":
    main()
