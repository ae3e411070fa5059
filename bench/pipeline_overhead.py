"""What DVC costs when iterating: the whole pipeline at a small size, `dvc repro` when nothing changed, and
`dvc repro` after one variant's param changed (only that variant and compare may re-run).

    python bench/pipeline_overhead.py                        # report A's 3 variants, Kaggle 224 set at 32 px
    python bench/pipeline_overhead.py --size 64 --epochs 3

It builds a scratch git + DVC project from this checkout's pipeline (dvc.yaml, params.yaml, stages/, src/)
in a temporary folder, so the project's own params.yaml, dvc.lock and MLflow store are never touched.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sh(repo: Path, *cmd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return seconds, out.stdout + out.stderr


def project(dest: Path, variants: list[str], size: int, epochs: int) -> Path:
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "stages", "src", "data/external/README.md"):
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
         if src.is_dir() else shutil.copy(src, dst))
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["models"] = {k: p["models"][k] for k in variants}
    p["data"].update(source="imagefolder", path=str(SHARED / "chest_xray_224"))
    p["gray"].update(image_size=size, extra_sizes=[])
    p["train"]["epochs"] = epochs
    (dest / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "b@localhost"], ["git", "config", "user.name",
                "b"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench"]):
        sh(dest, *cmd)
    return dest


def ran(log: str) -> str:
    return ", ".join(sorted(re.findall(r"Running stage '([^']+)'", log))) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="linear,mlp,tinyvgg")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="no-op runs to take the median of")
    args = parser.parse_args()
    if not (SHARED / "chest_xray_224").is_dir():
        sys.exit(f"{SHARED / 'chest_xray_224'} is absent: put the shared data there or set CXR_SHARED_DATA")
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="cxr-overhead-") as tmp:
        repo = project(Path(tmp) / "repo", variants, args.size, args.epochs)
        rows = []
        seconds, log = sh(repo, "dvc", "repro")
        rows.append((f"whole pipeline: 5840 images at {args.size} px, {len(variants)} variants x {args.epochs} epochs",
                     seconds, ran(log)))
        noop = []
        for _ in range(args.repeats):
            seconds, log = sh(repo, "dvc", "repro")
            noop.append(seconds)
        rows.append((f"nothing changed (median of {args.repeats})", statistics.median(noop), ran(log)))
        seconds, log = sh(repo, "dvc", "status")
        rows.append(("dvc status, nothing changed", seconds, "none"))
        p = yaml.safe_load((repo / "params.yaml").read_text())
        p["models"][variants[-1]]["lr"] = p["models"][variants[-1]].get("lr", 1e-3) / 2
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        seconds, log = sh(repo, "dvc", "repro")
        rows.append((f"models.{variants[-1]}.lr changed", seconds, ran(log)))
    print(f"{os.cpu_count()} cores; dvc and the stages run as `dvc repro` would from a shell\n")
    print("| case | seconds | stages run |")
    print("|---|---|---|")
    for case, seconds, stages in rows:
        print(f"| {case} | {seconds:.2f} | {stages} |")


if __name__ == "__main__":
    main()
