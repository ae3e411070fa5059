"""Training and evaluation on real X-rays: repeatable, early stopping, MLflow logs, the logged model."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from conftest import ROOT, data_stages, tracking_at
from cxr import params
from cxr.data.split import split
from cxr.data.store import load_split
from cxr.errors import CxrError
from cxr.evaluation.ensemble import run_ensemble
from cxr.evaluation.variant import evaluate_variant, png_bytes
from cxr.inference import TTA_VIEWS, ModelCard, view
from cxr.inference import load as load_checkpoint
from cxr.jobs.predict import predict
from cxr.metrics import choose_threshold, scores
from cxr.params import DataParams, GrayParams, SplitParams
from cxr.training.parts import trained_prior
from cxr.training.state import fingerprint
from cxr.training.variant import _mlflow_params, train_variant


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_stages(tmp_path_factory.mktemp("tr"), 150, GrayParams(image_size=32, workers=2))


def project_raw(**train) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({"epochs": 4, "batch_size": 32, **train})
    raw["gray"]["image_size"] = 32
    return raw


def project_params(**train) -> params.Params:
    return params.parse(project_raw(**train))


def test_train_is_repeatable_and_logs_every_epoch(data, tmp_path):
    p = project_params()
    a = train_variant(p, "mlp", data, tmp_path / "m1", tmp_path / "r1", tmp_path / "ck")
    b = train_variant(p, "mlp", data, tmp_path / "m2", tmp_path / "r2", tmp_path / "ck")
    ha, hb = (tmp_path / "r1" / "history.csv").read_text(), (tmp_path / "r2" / "history.csv").read_text()
    strip = lambda h: [line.split(",")[:6] for line in h.splitlines()]  # noqa: E731  (drop timings)
    assert strip(ha) == strip(hb) and a["best_epoch"] == b["best_epoch"]
    ma, mb = load_checkpoint(tmp_path / "m1" / "model.pt")[0], load_checkpoint(tmp_path / "m2" / "model.pt")[0]
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True))
    run_id = json.loads((tmp_path / "m1" / "run.json").read_text())["run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.run_name == "mlp" and run.data.tags["variant"] == "mlp"
    assert run.data.params["train.lr"] == str(p.variant("mlp").lr)
    assert run.data.params["train.model.hidden_units"] == "10"
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    assert steps == list(range(1, a["epochs_run"] + 1))


def test_early_stopping_keeps_the_best_epoch(data, tmp_path):
    p = project_params(epochs=30, patience=2, lr=0.01)  # a high lr overfits 240 images quickly
    summary = train_variant(p, "tinyvgg", data, tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    assert summary["epochs_run"] == summary["best_epoch"] + 2 < 30
    model, ckpt = load_checkpoint(tmp_path / "m" / "model.pt")
    val = load_split(data / "32", "val")
    x = torch.from_numpy(val.images[:, None].astype(np.float32) / 255)
    logits = model(x).reshape(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(val.labels).float())
    assert loss.item() == pytest.approx(summary["best_val_loss"], rel=1e-4)


def test_evaluate_writes_metrics_and_the_mlflow_model_predicts_the_same(data, tmp_path):
    p = project_params()
    train_variant(p, "tinyvgg", data, tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    metrics = evaluate_variant(p, "tinyvgg", data, tmp_path / "m", tmp_path / "r")
    on_disk = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    headline = json.loads((tmp_path / "r" / "metrics.json").read_text())  # what the README shows
    assert headline == {"test": {k: on_disk["test"][k] for k in ("accuracy", "recall", "specificity", "f1", "auroc")},
                        "val": {"auroc": on_disk["val"]["auroc"]}}
    test = load_split(data / "32", "test")
    # The per-image predictions, scored independently (scikit-learn), give the reported test scores.
    rows = list(csv.DictReader((tmp_path / "r" / "predictions.csv").open()))
    assert [r["name"] for r in rows] == [m["name"] for m in test.meta]
    assert [r["label"] for r in rows] == [("NORMAL", "PNEUMONIA")[y] for y in test.labels]
    probs = np.array([float(r["p_pneumonia"]) for r in rows])
    decided = np.array([r["predicted"] == "PNEUMONIA" for r in rows])
    assert np.array_equal(decided, probs > on_disk["threshold"])
    assert on_disk["test"]["accuracy"] == pytest.approx(accuracy_score(test.labels, decided), abs=1e-12)
    assert on_disk["test"]["f1"] == pytest.approx(f1_score(test.labels, decided), abs=1e-12)
    assert on_disk["test"]["auroc"] == pytest.approx(roc_auc_score(test.labels, probs), abs=1e-6)
    assert on_disk["test"]["auroc"] > 0.8  # real signal from 240 images at 32 px
    assert len(json.loads((tmp_path / "r" / "confusion.json").read_text())) == len(test.labels)
    run_id = json.loads((tmp_path / "m" / "run.json").read_text())["run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["test/auroc"] == pytest.approx(metrics["test"]["auroc"])
    arts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/pr.png", "plots/history.png",
            "predictions.csv", "plots/error_gallery.jpg", "error_gallery.json"} <= arts
    # The gallery: the most confident errors and right answers of the predictions, at the chosen threshold.
    listed = mlflow.artifacts.load_dict(f"runs:/{run_id}/error_gallery.json")
    scored = sorted(((float(r["p_pneumonia"]), r["name"], r["label"], r["predicted"]) for r in rows), reverse=True)
    fp = [pr for pr, _, label, called in scored if label == "NORMAL" and called == "PNEUMONIA"][:4]
    fn = [pr for pr, _, label, called in scored[::-1] if label == "PNEUMONIA" and called == "NORMAL"][:4]
    for group, expected in (("false positives", fp), ("false negatives", fn)):  # by score: ties may swap names
        assert [g["p_pneumonia"] for g in listed[group]] == pytest.approx(expected, abs=1e-7)
        assert all(g["label"] == ("NORMAL" if group == "false positives" else "PNEUMONIA") for g in listed[group])
    assert len(listed["true positives"]) == len(listed["true negatives"]) == 4
    assert (tmp_path / "r" / "gallery.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG, for dvc plots
    [logged] = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id='{run_id}'")
    card = ModelCard.from_dict(get_model_info(f"models:/{logged.model_id}").metadata, "logged")
    assert card.threshold == on_disk["threshold"] and card.image_size == 32 and card.fit == "stretch"
    # MLflow's model takes image files and scores them as evaluate did: here the test arrays as PNGs, 7 of them
    # (another batch size than the input example's)
    served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}").predict(
        pd.DataFrame({"image": [png_bytes(a) for a in test.images[:7]]}))
    assert np.allclose(served["p_pneumonia"], probs[:7], atol=1e-6)
    assert list(served["decision"]) == [r["predicted"] for r in rows[:7]]

    # Every test and val score has its 95% interval around it; the subtypes' sensitivities are those of the
    # predictions (Kaggle's names say bacteria or virus); the threshold lies in the range of equally good ones.
    for part in ("test", "val"):
        for k, (lo, hi) in on_disk[f"{part}_ci95"].items():
            assert lo <= on_disk[part][k] <= hi and (hi - lo > 0.005 or on_disk[part][k] in (0, 1)), (part, k)
    assert run.data.metrics["test/accuracy_ci95_low"] == on_disk["test_ci95"]["accuracy"][0]
    for cause in ("bacteria", "virus"):
        mine = [d for r, d in zip(rows, decided, strict=True) if r["label"] == "PNEUMONIA" and cause in r["name"]]
        sub = on_disk["subtypes"]["test"][cause]
        assert sub["images"] == len(mine) > 0 and sub["recall"] == pytest.approx(np.mean(mine), abs=1e-12)
        assert sub["recall_ci95"][0] <= sub["recall"] <= sub["recall_ci95"][1]
    # Per series (params.yaml's split.series: Kaggle's IM and NORMAL2-IM normals, bacteria and virus pneumonia):
    # the share of each series' normals called normal and of its pneumonia called pneumonia, with intervals, in
    # evaluation.json, the run's metrics and its description.
    found = {"IM": ("IM-", "NORMAL"), "NORMAL2-IM": ("NORMAL2-IM-", "NORMAL"), "bacteria": ("_bacteria_", "PNEUMONIA"),
             "virus": ("_virus_", "PNEUMONIA")}
    series = on_disk["series"]["test"]
    assert set(series) == set(found)
    for name, (mark, label) in found.items():
        mine = [d for r, d in zip(rows, decided, strict=True) if r["label"] == label and
                (r["name"].split("/")[-1].startswith(mark) if mark.endswith("-") else mark in r["name"])]
        key = "specificity" if label == "NORMAL" else "recall"
        share = np.mean([not d for d in mine]) if label == "NORMAL" else np.mean(mine)
        assert series[name]["images"] == len(mine) > 0 and series[name][key] == pytest.approx(share, abs=1e-12)
        assert series[name][f"{key}_ci95"][0] <= series[name][key] <= series[name][f"{key}_ci95"][1]
        assert run.data.metrics[f"test/{key}_{name}"] == pytest.approx(series[name][key])
    assert "By series: specificity IM " in run.data.tags["mlflow.note.content"]
    span = on_disk["threshold_range"]
    assert span["low"] <= span["best"][0] <= on_disk["threshold"] <= span["best"][1] <= span["high"]
    assert span["wide"] == (span["width"] >= 0.1)
    val = load_split(data / "32", "val")
    for op in on_disk["operating_points"]:
        assert op["val"]["specificity"] >= op["val_specificity_at_least"]
    # Lineage: the card names the source and digests the train and val images; the logged model lists them.
    train = load_split(data / "32", "train")
    digest = lambda meta: hashlib.sha256("\n".join(sorted(m["sha256"] for m in meta)).encode()).hexdigest()  # noqa: E731
    assert (card.train_digest, card.val_digest) == (digest(train.meta), digest(val.meta))
    assert card.source == "https://huggingface.co/datasets/keremberke/chest-xray-classification"  # params.yaml's
    assert card.tta_views == ((1.0, 0.0, 0.0),)
    listed = list(csv.DictReader(open(mlflow.artifacts.download_artifacts(
        f"{logged.artifact_location}/artifacts/image_hashes.csv"))))
    assert sorted((r["split"], r["sha256"], r["patient_id"]) for r in listed) == sorted(
        [("train", m["sha256"], m["patient_id"]) for m in train.meta] +
        [("val", m["sha256"], m["patient_id"]) for m in val.meta])  # promotion removes these patients from test
    # Every interval says what it resampled: patients here, as Kaggle's file names give them.
    for part, data_ in (("test", test), ("val", val)):
        rec = on_disk[f"{part}_intervals"]
        assert rec["unit"] == "patient" and rec["images"] == len(data_.meta) and rec["resamples"] == 2000
        assert rec["patients"] == len({m["patient_id"] for m in data_.meta}) < len(data_.meta)
    assert run.data.tags["ci95.unit"] == "patient"
    assert "(95% intervals, bootstrap by patient)" in run.data.tags["mlflow.note.content"]
    assert card.prior == pytest.approx(trained_prior(p.variant("tinyvgg"), train.labels, 2))  # what EM starts from


def test_resume_state_is_tied_to_the_arrays_not_only_their_names(tmp_path):
    # Two sizes of the same images have identical meta.csv files (what the old fingerprint hashed).
    data_stages(tmp_path, 20, GrayParams(image_size=32, extra_sizes=[48], workers=1))
    a, b = tmp_path / "split" / "32", tmp_path / "split" / "48"
    assert (a / "train_meta.csv").read_bytes() == (b / "train_meta.csv").read_bytes()
    settings = {"arch": "tinyvgg", "seed": 0}
    before = fingerprint(settings, a)
    assert before != fingerprint(settings, b) and before == fingerprint(settings, a)
    (a / "preprocessing.json").write_text(json.dumps({"fit": "pad", "draft": 48}))  # as if made another way
    assert fingerprint(settings, a) != before


def test_threshold_rules():
    probs = torch.tensor([0.1, 0.3, 0.35, 0.6, 0.8, 0.9])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    assert choose_threshold(probs, labels, 0.5) == 0.5
    # F1 is best calling 0.35 and up positive: the threshold sits halfway to the next lower score.
    assert choose_threshold(probs, labels, "f1") == pytest.approx(0.325)
    assert scores(probs, labels, 0.325)["f1"] == pytest.approx(6 / 7)
    t = choose_threshold(probs, labels, "youden")  # J = 2/3 at 0.8 and at 0.35; the first (higher) wins
    assert t == pytest.approx(0.7)
    s = scores(probs, labels, t)
    assert s["recall"] + s["specificity"] - 1 == pytest.approx(2 / 3)
    assert (s["tn"], s["fp"], s["fn"], s["tp"]) == (3, 0, 1, 2)


def test_three_class_task_end_to_end(data, tmp_path):
    report = split(data.parent / "gray", tmp_path / "s", SplitParams(val_fraction=0.2), seed=0, labels="three_class")
    assert set(report["counts"]["train"]) == {"NORMAL", "BACTERIA", "VIRUS"}
    assert all(n > 20 for n in report["counts"]["train"].values())
    p = project_params(epochs=3)
    train_variant(p, "tinyvgg", tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    metrics = evaluate_variant(p, "tinyvgg", tmp_path / "s", tmp_path / "m", tmp_path / "r")
    assert metrics["classes"] == ["NORMAL", "BACTERIA", "VIRUS"] and "threshold" not in metrics
    test = metrics["test"]
    assert {"accuracy", "f1", "auroc", "recall_VIRUS", "precision_BACTERIA", "f1_NORMAL"} <= set(test)
    assert test["f1"] == pytest.approx(np.mean([test[f"f1_{c}"] for c in metrics["classes"]]))  # macro
    # It ranks the classes better than chance with 95% confidence (the interval's low end above 0.5), where a
    # chance-level model's interval would straddle 0.5.
    lo, hi = metrics["test_ci95"]["auroc"]
    assert 0.5 < lo <= test["auroc"] <= hi
    pairs = json.loads((tmp_path / "r" / "confusion.json").read_text())
    assert {r["actual"] for r in pairs} == {"NORMAL", "BACTERIA", "VIRUS"}
    run_id = json.loads((tmp_path / "m" / "run.json").read_text())["run_id"]
    run = MlflowClient().get_run(run_id)
    assert run.data.params["classes"] == "NORMAL,BACTERIA,VIRUS" and "test/f1_VIRUS" in run.data.metrics
    model, ckpt = load_checkpoint(tmp_path / "m" / "model.pt")
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_a_killed_training_stage_resumes_into_the_same_mlflow_run(data, tmp_path):
    raw = project_raw(epochs=10, patience=99)
    raw["models"], raw["variants"] = {"cnn": {"arch": "cnn5", "filters": [8, 16, 16], "augment": True}}, ["cnn"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    def stage(out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "stages" / "train.py"), "cnn", "--data", str(data),
                                 "--model-dir", f"{out}/m", "--reports", f"{out}/r", "--checkpoints", f"{out}/ck",
                                 "--params", "params.yaml"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)

    proc = stage("a")
    while not (tmp_path / "a" / "ck" / "state.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "a" / "m").exists()  # nothing that looks complete
    again = stage("a")
    _, log = again.communicate()
    assert again.returncode == 0 and "cnn: resuming after epoch" in log, log[-2000:]
    assert not (tmp_path / "a" / "ck").exists()  # done: the state is gone
    whole = stage("b")
    assert whole.wait() == 0
    a, b = load_checkpoint(tmp_path / "a" / "m" / "model.pt")[0], load_checkpoint(tmp_path / "b" / "m" / "model.pt")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    run_id = json.loads((tmp_path / "a" / "m" / "run.json").read_text())["run_id"]
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "val/loss")]
    assert sorted(set(steps)) == list(range(1, 11))  # one run holds every epoch, before and after the kill


@pytest.mark.scale  # several processes: `make test-scale` (CI runs it too)
def test_two_stage_processes_at_once_both_land_in_one_sqlite_store(data, tmp_path):
    """Two variants' train stages, then their evaluate stages, run side by side against one SQLite store."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_raw(epochs=3, patience=99)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'shared.db'}"}

    def both(stage: str, extra) -> None:
        procs = [subprocess.Popen([sys.executable, str(ROOT / "stages" / f"{stage}.py"), v, "--data", str(data),
                                   "--model-dir", f"m/{v}", "--reports", f"r/{v}", *extra(v), "--params",
                                   "params.yaml"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
                 for v in ("mlp", "tinyvgg")]
        for proc in procs:
            assert proc.wait() == 0, proc.stderr.read()[-2000:]

    both("train", lambda v: ("--checkpoints", f"ck/{v}"))
    both("evaluate", lambda v: ())
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    spans = []
    for v in ("mlp", "tinyvgg"):
        run = client.get_run(json.loads((tmp_path / "m" / v / "run.json").read_text())["run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == v
        for key in ("train/loss", "val/loss", "val/auroc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
        assert {"test/auroc", "test/f1", "threshold", "train/best_epoch"} <= set(run.data.metrics)
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/pr.png", "plots/history.png"} <= arts
        assert len(client.search_logged_models([run.info.experiment_id],
                                               filter_string=f"source_run_id='{run.info.run_id}'")) == 1
        spans.append((run.info.start_time, run.info.end_time))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the runs were open at the same time


def test_an_unreachable_mlflow_server_fails_fast_before_training(data, tmp_path):
    t0 = time.perf_counter()
    with tracking_at("http://127.0.0.1:9"), pytest.raises(CxrError, match="MLflow server at http://127.0.0.1:9 "
                                                                         "does not answer"):
        train_variant(project_params(), "tinyvgg", data, tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    assert time.perf_counter() - t0 < 15  # MLflow's own retries would take minutes
    assert not any(tmp_path.iterdir())  # no model, report or checkpoint


def test_a_non_finite_loss_stops_training_naming_the_variant_and_epoch(data, tmp_path):
    raw = project_raw()
    raw["models"]["linear"].update(optimizer="sgd", lr=1.0e30)  # the weights overflow within the first epoch
    p = params.parse(raw)
    with pytest.raises(CxrError, match=r"^linear: training diverged \(loss (nan|inf)\) in epoch 1; lower its lr"):
        train_variant(p, "linear", data, tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def clahe_data(tmp_path_factory):
    """The same kind of real images, CLAHE-equalized by the grayscale stage: the card must carry it to predict."""
    tmp = tmp_path_factory.mktemp("eq")
    return tmp / "src", data_stages(tmp, 120, GrayParams(image_size=32, equalize="clahe", workers=2))


def tv_view(x: torch.Tensor, zoom: float, dx: float, dy: float) -> torch.Tensor:
    """A TTA view by torchvision's affine, not the project's code: zoom about the centre, the shift (fractions
    of the side, before zooming) scaled by the zoom, bilinear, zeros outside (fill None: no mask blending)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import affine

    w = x.shape[-1]
    return affine(x, angle=0.0, translate=[zoom * dx * w, zoom * dy * w], scale=zoom, shear=[0.0, 0.0],
                  interpolation=InterpolationMode.BILINEAR, fill=None)


def test_an_ensemble_with_tta_and_temperature_is_one_model_that_predict_reproduces(clahe_data, tmp_path,
                                                                                   monkeypatch):
    folder, data = clahe_data
    raw = project_raw(epochs=3)
    raw["ensembles"] = {"ens": ["tinyvgg", "mlp"]}
    raw["evaluate"].update(tta=3, calibrate=True)
    p = params.parse(raw)
    for v in ("tinyvgg", "mlp"):
        train_variant(p, v, data, tmp_path / "models" / v, tmp_path / "r" / v, tmp_path / "ck")
    metrics = run_ensemble(p, "ens", data, tmp_path / "models", tmp_path / "ens", tmp_path / "r" / "ens")
    val, test = load_split(data / "32", "val"), load_split(data / "32", "test")

    # By hand, with torchvision's affine for the views: per view, the members' probabilities averaged; then the
    # temperature; then the views averaged.
    members = [load_checkpoint(tmp_path / "models" / v / "model.pt")[0] for v in ("tinyvgg", "mlp")]
    t = metrics["calibration"]["temperature"]

    def by_hand(images, temperature):
        x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
        with torch.no_grad():
            views = [torch.stack([m(tv_view(x, *v)).reshape(-1).sigmoid() for m in members]).mean(0)
                     for v in ((1.0, 0.0, 0.0), (1.08, 0.0, 0.0), (0.93, 0.0, 0.0))]
        return torch.stack([(torch.logit(p, eps=1e-7) / temperature).sigmoid() for p in views]).mean(0)

    x = torch.from_numpy(test.images[:8, None].astype(np.float32) / 255)
    for v in TTA_VIEWS:  # every view, shifted ones too, as torchvision draws it
        assert torch.allclose(view(x, *v), tv_view(x, *v), atol=1e-4), v
    rows = list(csv.DictReader((tmp_path / "r" / "ens" / "predictions.csv").open()))
    probs = torch.tensor([float(r["p_pneumonia"]) for r in rows])
    assert torch.allclose(probs, by_hand(test.images, t), atol=1e-4)
    assert metrics["tta"] == 3 and metrics["tta_views"] == [list(v) for v in TTA_VIEWS[:3]]
    val_probs = by_hand(val.images, t)  # the threshold comes from these (to float32 rounding)
    assert metrics["threshold"] == pytest.approx(choose_threshold(val_probs, torch.from_numpy(val.labels), "f1"),
                                                 abs=1e-4)
    # Temperature scaling lowers the validation log-loss it was fitted on, and the reports hold the diagram.
    y = torch.from_numpy(val.labels).float()
    nll = lambda pr: F.binary_cross_entropy(pr.double().clamp(1e-12, 1 - 1e-12), y.double()).item()  # noqa: E731
    assert t != 1.0 and nll(by_hand(val.images, t)) <= nll(by_hand(val.images, 1.0))
    cal = metrics["calibration"]
    assert {"val_ece_before", "val_ece_after", "test_ece_before", "test_ece_after"} <= set(cal)
    rel = json.loads((tmp_path / "r" / "ens" / "reliability.json").read_text())
    assert sum(r["count"] for r in rel) == 2 * (len(val.labels) + len(test.labels))  # before and after

    # One MLflow model, a run of its own; `cxr predict`'s path (decode with CLAHE, TTA, temperature) agrees.
    run = MlflowClient().get_run(metrics["mlflow"]["run_id"])
    assert run.info.run_name == "ens" and run.data.params["members"] == "tinyvgg,mlp"
    assert {"calibration/temperature", "test/auroc"} <= set(run.data.metrics)
    uri = metrics["mlflow"]["model_uri"]
    card = ModelCard.from_dict(get_model_info(uri).metadata, uri)
    assert (card.arch, card.tta_views, card.equalize, card.temperature) == ("ensemble", TTA_VIEWS[:3], "clahe", t)
    # The card holds the views themselves: editing the project's list later changes no logged model.
    monkeypatch.setattr("cxr.inference.TTA_VIEWS", tuple(reversed(TTA_VIEWS)))
    got, errors, _ = predict(uri, [folder / r["name"] for r in rows[:12]])
    assert not errors and [g["p_pneumonia"] for g in got] == pytest.approx([float(r["p_pneumonia"])
                                                                            for r in rows[:12]], abs=1e-6)


def test_an_imagefolder_run_has_no_hub_params_and_its_evaluate_stage_logs_the_model_without_mlflow_warnings(
        data, tmp_path):
    """The hub's settings are params of hub runs only. The evaluate stage, run as DVC runs it, logs the served
    model with its own signature (one binary `image` column) and input example, and MLflow prints no warning
    about type hints on `predict` (it did twice per stage). Served one image at a time, the model answers
    exactly what `cxr predict` answers for that file; in a batch, within float32 rounding."""
    raw = project_raw(epochs=1)
    raw["data"] |= {"source": "imagefolder", "path": str(data.parent / "src")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    train_variant(params.parse(raw), "mlp", data, tmp_path / "m", tmp_path / "r", tmp_path / "ck")
    run_id = json.loads((tmp_path / "m" / "run.json").read_text())["run_id"]
    logged = MlflowClient().get_run(run_id).data.params
    assert logged["data.source"] == "imagefolder" and not [k for k in logged if k.startswith("data.hub_")]
    hub = _mlflow_params(project_params(epochs=1), "mlp")  # params.yaml's source: the hub
    assert hub["data.hub_repo"] == DataParams().hub_repo  # a hub run keeps them
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "mlp", "--data", str(data),
                          "--model-dir", "m", "--reports", "r", "--params", "params.yaml"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "type hints" not in out.stderr and "Warning" not in out.stderr, out.stderr[-2000:]
    [model] = MlflowClient().search_logged_models(filter_string=f"source_run_id='{run_id}'",
                                                  experiment_ids=[MlflowClient().get_run(run_id).info.experiment_id])
    info = get_model_info(f"models:/{model.model_id}")
    assert info.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["p_pneumonia", "decision", "threshold", "class"]
    served = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    test = load_split(data / "32", "test")
    files = []
    for i, image in enumerate(test.images[:5]):
        (path := tmp_path / f"{i}.png").write_bytes(png_bytes(image))
        files.append(path)
    rows, _, _ = predict(f"models:/{model.model_id}", files)
    for path, row in zip(files, rows, strict=True):
        one = served.predict(pd.DataFrame({"image": [path.read_bytes()]}))
        # the same arithmetic, alone as in a batch of five, to float32's rounding: equal to the last digit on
        # AVX-512 CPUs, 6e-8 apart on an AVX2 one (there a batch's size picks the kernel, so the order of sums)
        assert one["p_pneumonia"][0] == pytest.approx(row["p_pneumonia"], rel=0, abs=1e-6)
    batch = served.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert np.allclose(batch["p_pneumonia"], [r["p_pneumonia"] for r in rows], rtol=0, atol=1e-6)
