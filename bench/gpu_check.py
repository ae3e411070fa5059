"""Everything that needs a GPU, measured in one call, ending with one table (`bash bench/gpu_check.sh`):

1. the `gpu`-marked tests;
2. training speed, ResNet-18 at 224 px in bf16: our loop against the naive loop, torch.compile off and on,
   batch 64, 128 and 256 (target: 5,000 img/s or more and 3x the naive loop);
3. one small end-to-end pipeline on the GPU (report A's variants and ResNet-18 at 64 px, 2 epochs);
4. with 2 or more GPUs, the DDP equality test over NCCL;
5. grayscale conversion with nvJPEG against the grayscale stage.

Each step's output is kept in --logs. About 5 minutes on one H100/H200. On a CPU it runs too (slowly, and
steps 1 and 4 report what they skip), which is how it is tried before a GPU is lent.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: one table, no progress bars

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
SHARED = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
Row = tuple[str, str, str]  # check, result, seconds


def step(logs: Path, name: str, cmd: list[str], timeout: float, cwd: Path = ROOT,
         env: dict[str, str] | None = None) -> tuple[str, float, bool]:
    """Run a command; keep its output in logs/<name>.log; return (output, seconds, whether it exited 0)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        out, ok = res.stdout + res.stderr + f"\nexit {res.returncode}\n", res.returncode == 0
    except subprocess.TimeoutExpired as e:
        out, ok = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s\n", False
    (logs / f"{name}.log").write_text(out)
    return out, time.perf_counter() - t0, ok


def pytest_result(out: str) -> str:
    found = re.findall(r"(\d+ (?:passed|failed|skipped|deselected|error)s?)", out)
    return ", ".join(found) or out.strip().splitlines()[-1]


def train_speed(batches: list[int], images: int) -> list[Row]:
    """ResNet-18, 224 px, bf16 on CUDA: ours with compile off and on, and the naive loop, per batch size."""
    import logging

    from cxr.data.store import Split
    from cxr.params import TrainParams
    from train_speed import naive, ours

    logging.disable(logging.INFO)
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (images, 224, 224), dtype=np.uint8), (rng.random(images) < 0.7).astype(
        np.int64), [{} for _ in range(images)])
    rows: list[Row] = []
    for b in batches:
        t0 = time.perf_counter()
        tp = TrainParams(arch="resnet18", epochs=2, batch_size=b, patience=99)
        base = naive(split, tp)
        eager = ours(split, tp)
        compiled = ours(split, TrainParams(arch="resnet18", epochs=2, batch_size=b, patience=99, compile=True))
        best = max(eager, compiled)
        verdict = "meets" if best >= 5000 and best >= 3 * base else "misses"
        rows.append((f"ResNet-18 224 px bf16, batch {b} (img/s)",
                     f"ours {eager:,.0f}, compiled {compiled:,.0f}, naive {base:,.0f}: {best / base:.1f}x; "
                     f"{verdict} the target (5,000 and 3x)", f"{time.perf_counter() - t0:.0f}"))
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def pipeline(logs: Path) -> Row:
    """Report A's variants and a ResNet-18 through every stage, in a scratch project, on the shared folder."""
    import yaml

    from conftest import make_project

    data = SHARED / "chest_xray_224"
    if not data.exists():
        return ("pipeline end to end", f"skipped: {data} is absent (set CXR_SHARED_DATA)", "0")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    models = {v: raw["models"][v] for v in ("linear", "mlp", "tinyvgg")} | {"resnet18": {"arch": "resnet18"}}
    repo = make_project(Path(tempfile.mkdtemp(prefix="gpu-check-")) / "repo", models,
                        gray={"image_size": 64, "extra_sizes": []}, train={"epochs": 2})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the scratch project's own store
    out, s, ok = step(logs, "pipeline", ["dvc", "exp", "run", "-S", "data.source=imagefolder", "-S",
                                         f"data.path={data}"], 600, repo, env)
    shutil.rmtree(repo.parent, ignore_errors=True)  # its output is in the log; its arrays and cache are not needed
    board = [line for line in out.splitlines() if re.match(r"^(linear|mlp|tinyvgg|resnet18)\s", line)]
    result = "ok: " + "; ".join(" ".join(line.split()[:4]) for line in board) if ok else "failed, see pipeline.log"
    return ("pipeline end to end (64 px, 2 epochs; variant, val AUROC, test acc, sens)", result, f"{s:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--images", type=int, default=4096, help="per epoch, a multiple of every batch size "
                        "(a smaller last batch would make torch.compile compile again)")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name() if gpus else "no GPU: CPU"
    rows: list[Row] = []

    out, s, _ = step(args.logs, "gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                           "no:cacheprovider", "tests/"], 300)
    rows.append(("gpu-marked tests", pytest_result(out), f"{s:.0f}"))
    rows += train_speed([int(b) for b in args.batches.split(",")], args.images)
    rows.append(pipeline(args.logs))
    if gpus >= 2:
        out, s, _ = step(args.logs, "ddp_nccl", [sys.executable, "-m", "pytest", "-q", "-m", "scale", "-k",
                                              "two_ranks", "-p", "no:cacheprovider", "tests/test_scale.py"], 300)
        rows.append(("DDP, 2 ranks over NCCL = 1 process", pytest_result(out), f"{s:.0f}"))
    else:
        rows.append(("DDP over NCCL", f"skipped: {gpus} GPU(s)", "0"))
    out, s, _ = step(args.logs, "decode", [sys.executable, "bench/decode_gpu.py"], 300)
    dev = re.search(r"^\| decode_jpeg on \w+ \| ([\d,]+) \| ([\d.]+x) \| ([\d.]+) \|", out, re.M)
    stage = re.search(r"^\| stage \(Pillow, every core\) \| ([\d,]+) \|", out, re.M)
    rows.append(("grayscale: nvJPEG vs the stage (img/s)", f"{dev[1]} vs {stage[1]} ({dev[2]}), mean abs diff "
                 f"{dev[3]} gray levels" if dev and stage else "failed, see decode.log", f"{s:.0f}"))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"\n{name} x{max(gpus, 1)}; torch {torch.__version__}; commit {commit.strip() or '?'}")
    print("| check | result | s |\n|---|---|---|")
    for check, result, seconds in rows:
        print(f"| {check} | {result} | {seconds} |")


if __name__ == "__main__":
    main()
