"""What DVC and the stages cost when iterating, for this checkout and (with --before REV) an earlier commit, in
one run: each stage script's start-up (its imports), the whole pipeline at a small size, `dvc repro` when
nothing changed beside `dvc status`, and `dvc repro` after one variant's param changed.

    python bench/pipeline_overhead.py                        # this checkout
    python bench/pipeline_overhead.py --before 2b78534       # and that commit, side by side

It builds scratch git + DVC projects (the tests' `make_project`) from each tree's pipeline (dvc.yaml, params.yaml,
stages/, src/) in a temporary folder, runs each with that tree's `src` first on PYTHONPATH, and never touches the
project's own params.yaml, dvc.lock or MLflow store. Start-up is `python stages/<stage>.py --help`: the imports a
stage makes before its work, median of --repeats runs.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED, make_project, project_env, ran  # noqa: E402  (the tests' scratch git + DVC project)


def sh(repo: Path, env: dict[str, str], *cmd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return seconds, out.stdout + out.stderr


def median_of(repeats: int, repo: Path, env: dict[str, str], *cmd: str) -> float:
    return statistics.median(sh(repo, env, *cmd)[0] for _ in range(repeats))


def checkout(rev: str, dest: Path) -> Path:
    """The files of commit `rev` of this repository, in `dest`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(dest, filter="data")
    return dest


def measure(root: Path, repo: Path, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, tuple[float, str]]]:
    """(stage -> start-up seconds, case -> (seconds, stages run)) for the pipeline of the tree at `root`."""
    variants = args.variants.split(",")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    make_project(repo, {k: raw["models"][k] for k in variants}, root=root,
                 data={"source": "imagefolder", "path": str(SHARED / "chest_xray_224")},
                 gray={"image_size": args.size, "extra_sizes": []}, train={"epochs": args.epochs})
    env = project_env() | {"PYTHONPATH": str(root / "src"), "TQDM_DISABLE": "1"}
    python = sys.executable
    startup = {"python -c pass": median_of(args.repeats, repo, env, python, "-c", "pass"),
               "python -c 'import torch'": median_of(args.repeats, repo, env, python, "-c", "import torch")}
    for script in sorted((repo / "stages").glob("*.py")):
        startup[script.stem] = median_of(args.repeats, repo, env, python, f"stages/{script.name}", "--help")
    cases = {}
    seconds, log = sh(repo, env, "dvc", "repro")
    cases[f"whole pipeline: 5840 images at {args.size} px, {len(variants)} variants x {args.epochs} epochs"] = \
        (seconds, log)
    cases[f"dvc repro, nothing changed (median of {args.repeats})"] = \
        (median_of(args.repeats, repo, env, "dvc", "repro"), "")
    cases[f"dvc status, nothing changed (median of {args.repeats})"] = \
        (median_of(args.repeats, repo, env, "dvc", "status"), "")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["models"][variants[-1]]["lr"] = p["models"][variants[-1]].get("lr", 1e-3) / 2
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    cases[f"models.{variants[-1]}.lr changed"] = sh(repo, env, "dvc", "repro")
    return startup, {case: (s, ", ".join(sorted(ran(log))) or "none") for case, (s, log) in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="", help="a git revision to measure beside this checkout")
    parser.add_argument("--variants", default="linear,mlp,tinyvgg")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="runs to take the median of (start-up, no-op)")
    args = parser.parse_args()
    if not (SHARED / "chest_xray_224").is_dir():
        sys.exit(f"{SHARED / 'chest_xray_224'} is absent: put the shared data there or set CXR_SHARED_DATA")
    with tempfile.TemporaryDirectory(prefix="cxr-overhead-") as tmp:
        trees = {"now": ROOT}
        if args.before:
            trees = {args.before: checkout(args.before, Path(tmp) / "before-tree"), **trees}
        results = {name: measure(root, Path(tmp) / f"repo-{i}", args) for i, (name, root) in enumerate(trees.items())}
    names = list(results)
    print(f"{os.cpu_count()} cores; dvc and the stages run as `dvc repro` would from a shell; seconds\n")
    print(f"| stage start-up | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for stage in dict.fromkeys(k for startup, _ in results.values() for k in startup):
        cells = [f"{results[n][0][stage]:.2f}" if stage in results[n][0] else "-" for n in names]
        print(f"| {stage} | {' | '.join(cells)} |")
    print(f"\n| case | {' | '.join(names)} | stages run ({names[-1]}) |\n|---|{'---|' * (len(names) + 1)}")
    for case in results[names[-1]][1]:
        cells = [f"{results[n][1][case][0]:.2f}" if case in results[n][1] else "-" for n in names]
        print(f"| {case} | {' | '.join(cells)} | {results[names[-1]][1][case][1]} |")


if __name__ == "__main__":
    main()
