"""What DVC costs when iterating: the whole pipeline at a small size, `dvc repro` when nothing changed, and
`dvc repro` after one variant's param changed (only that variant and compare may re-run).

    python bench/pipeline_overhead.py                        # report A's 3 variants, Kaggle 224 set at 32 px
    python bench/pipeline_overhead.py --size 64 --epochs 3

It builds a scratch git + DVC project from this checkout's pipeline (dvc.yaml, params.yaml, stages/, src/)
with the tests' `make_project`, in a temporary folder, so the project's own params.yaml, dvc.lock and
MLflow store are never touched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED, make_project, project_env, ran  # noqa: E402  (the tests' scratch git + DVC project)


def sh(repo: Path, *cmd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=repo, env=project_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return seconds, out.stdout + out.stderr


def project(dest: Path, variants: list[str], size: int, epochs: int) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return make_project(dest, {k: raw["models"][k] for k in variants},
                        data={"source": "imagefolder", "path": str(SHARED / "chest_xray_224")},
                        gray={"image_size": size, "extra_sizes": []}, train={"epochs": epochs})


def stages_run(log: str) -> str:
    return ", ".join(sorted(ran(log))) or "none"


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
                     seconds, stages_run(log)))
        noop = []
        for _ in range(args.repeats):
            seconds, log = sh(repo, "dvc", "repro")
            noop.append(seconds)
        rows.append((f"nothing changed (median of {args.repeats})", statistics.median(noop), stages_run(log)))
        seconds, log = sh(repo, "dvc", "status")
        rows.append(("dvc status, nothing changed", seconds, "none"))
        p = yaml.safe_load((repo / "params.yaml").read_text())
        p["models"][variants[-1]]["lr"] = p["models"][variants[-1]].get("lr", 1e-3) / 2
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        seconds, log = sh(repo, "dvc", "repro")
        rows.append((f"models.{variants[-1]}.lr changed", seconds, stages_run(log)))
    print(f"{os.cpu_count()} cores; dvc and the stages run as `dvc repro` would from a shell\n")
    print("| case | seconds | stages run |")
    print("|---|---|---|")
    for case, seconds, stages in rows:
        print(f"| {case} | {seconds:.2f} | {stages} |")


if __name__ == "__main__":
    main()
