"""Beyond one process: data-parallel training under torchrun (gloo, 2 CPU processes) gives the one-process
result, and the train stage launches it itself. Run with `make test-scale` (marker `scale`)."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from conftest import ROOT, make_imagefolder, make_project, ran, sh, shared, tracking_at
from cxr import inference
from cxr.training import ddp

pytestmark = pytest.mark.scale


def run(out: Path, settings: dict, nproc: int) -> dict:
    worker = [str(ROOT / "tests" / "ddp_fit.py"), str(out), json.dumps(settings), str(shared("chest_xray_224"))]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    res = subprocess.run([*(launcher if nproc > 1 else [sys.executable]), *worker], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_same(one: dict, two: dict) -> None:
    assert (one["world"], two["world"]) == (1, 2)
    for a, b in zip(one["history"], two["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auroc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
    for (name, a), b in zip(one["weights"].items(), two["weights"].values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("settings", [
    # no BatchNorm: 2 ranks at half the batch each are the one-process run, augmentation, class weights, the
    # schedule and the EMA included
    {"arch": "tinyvgg", "epochs": 3, "batch_size": 16, "augment": True, "aug_noise": 0.05, "aug_gamma": 0.2,
     "class_weights": "balanced", "scheduler": "cosine", "ema": 0.9, "patience": 1},
    # BatchNorm with sync_batchnorm: the statistics are the whole batch's, as in one process (dropout off: each
    # rank draws its own masks)
    {"arch": "cnn5", "model": {"filters": [8, 8, 16, 16, 16], "dropout": 0.0}, "epochs": 2, "batch_size": 16,
     "augment": True, "sync_batchnorm": True, "patience": 0},
], ids=["no-batchnorm", "sync-batchnorm"])
def test_two_ranks_at_half_the_batch_train_the_one_process_weights(tmp_path, settings):
    one = run(tmp_path / "one.pt", settings | {"devices": 1}, 1)
    two = run(tmp_path / "two.pt", settings | {"devices": 2}, 2)
    assert_same(one, two)


def test_the_train_stage_launches_torchrun_and_a_resnet_with_sync_batchnorm_trains_and_evaluates(tmp_path):
    """`train.devices: 2` in params.yaml: `dvc repro` runs the stage, which starts torchrun with 2 (gloo) ranks;
    rank 0 alone logs the MLflow run and writes the model, a plain ResNet that evaluate and predict load."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    resnet = {"arch": "resnet18", "epochs": 2, "batch_size": 32, "devices": 2, "sync_batchnorm": True}
    repo = make_project(tmp_path / "repo", {"linear": raw["models"]["linear"], "resnet": resnet},
                        gray={"image_size": 32, "extra_sizes": []})
    folder = make_imagefolder(tmp_path / "src", per_class=40)
    store = tmp_path / "mlflow.db"
    log = sh(repo, "dvc", "exp", "run", "-S", "data.source=imagefolder", "-S", f"data.path={folder}",
             env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert "launching 2 processes" in log and log.count("resnet epoch 2:") == 1  # rank 0 alone reports
    assert {"train@resnet", "evaluate@resnet"} <= ran(log)
    metrics = json.loads((repo / "reports/resnet/metrics.json").read_text())
    assert 0 <= metrics["test"]["auroc"] <= 1
    model, card = inference.load(repo / "models/resnet/model.pt")
    assert not any(isinstance(m, torch.nn.SyncBatchNorm | ddp.SyncBatchNorm) for m in model.modules())
    with tracking_at(f"sqlite:///{store}"):
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.variant = 'resnet'")
    assert len(runs) == 1 and runs.iloc[0]["params.device"] == "cpu x2" and runs.iloc[0]["params.train.devices"] == "2"
