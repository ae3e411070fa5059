"""`dvc exp run` / `dvc repro` of the real pipeline in a temporary git repo, on a small real subset."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, make_imagefolder

# The project's pipeline and params, shrunk to the variants that train in seconds on a CPU (as
# lightning-hydra-template's tests reuse the production config).
VARIANTS = ("linear", "mlp", "tinyvgg", "d_cnn_baseline")


def sh(repo: Path, *cmd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # use the default store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml = ours
    res = subprocess.run(cmd, cwd=repo, env=env, text=True, capture_output=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pipe") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "stages", "src", "data/external/README.md"):
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
         if src.is_dir() else shutil.copy(src, dst))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"] = {k: raw["models"][k] for k in VARIANTS}
    raw["gray"]["extra_sizes"] = []
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dvc = (Path(sys.executable).parent / "dvc").as_posix()
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@localhost")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, dvc, "init", "-q")
    sh(repo, dvc, "config", "core.analytics", "false")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    return repo, dvc


def test_pipeline_runs_then_is_a_noop_then_reruns_one_variant(repo, tmp_path_factory):
    repo, dvc = repo
    folder = make_imagefolder(tmp_path_factory.mktemp("src"), per_class=60)
    log = sh(repo, dvc, "exp", "run", "-S", "data.source=imagefolder", "-S", f"data.path={folder}",
             "-S", "gray.image_size=32", "-S", "train.epochs=2")
    expected = {"download", "grayscale", "split", "compare"} | {f"{s}@{v}" for s in ("train", "evaluate")
                                                                 for v in VARIANTS}
    assert ran(log) == expected
    for v in VARIANTS:
        test = json.loads((repo / "reports" / v / "metrics.json").read_text())["test"]
        assert {"accuracy", "precision", "recall", "specificity", "f1", "auroc"} <= set(test)
    board = (repo / "leaderboard.md").read_text()
    assert all(f"| {v} |" in board for v in VARIANTS)
    split_report = json.loads((repo / "reports" / "split.json").read_text())
    assert split_report["carved"] == ["val"] and split_report["duplicates"]["within_split_extra_copies"]["train"] > 0

    noop = sh(repo, dvc, "repro")
    assert ran(noop) == set() and "Data and pipelines are up to date" in noop

    one = sh(repo, dvc, "exp", "run", "-S", "models.mlp.lr=0.002")
    assert ran(one) == {"train@mlp", "evaluate@mlp", "compare"}

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chest-xray")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted([*VARIANTS, "mlp"])
    assert all(r.data.tags.get("dvc_exp_name") and "test/auroc" in r.data.metrics for r in runs)
    assert len(client.search_logged_models([exp.experiment_id])) == len(VARIANTS) + 1
    assert not (repo / "checkpoints").exists() or not any((repo / "checkpoints").iterdir())
