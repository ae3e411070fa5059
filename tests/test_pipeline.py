"""`dvc exp run` / `dvc repro` of the real pipeline in a temporary git repo, on a small real subset; then
DVC's plots and experiment table, and the MLflow runs seen through a real `mlflow server`'s REST API."""

import base64
import csv
import io
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import ROOT, make_imagefolder, make_project, mlflow_server, project_env, ran, sh, tracking_at
from cxr.evaluation.variant import png_bytes
from cxr.jobs.serve import served

VARIANTS = ("linear", "mlp", "tinyvgg")  # the ones that train in seconds on a CPU
EPOCHS = 2


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    repo = make_project(tmp_path_factory.mktemp("pipe") / "repo", {k: raw["models"][k] for k in VARIANTS},
                        gray={"extra_sizes": []}, ensembles={"ens": ["tinyvgg", "linear"]},
                        # 132 test images, some of patients Kaggle also has in train: fewer than the defaults
                        promote={"min_test_images": 100, "min_test_patients": 50})
    folder = make_imagefolder(tmp_path_factory.mktemp("src"), per_class=60)
    log = sh(repo, "dvc", "exp", "run", "-S", "data.source=imagefolder", "-S", f"data.path={folder}",
             "-S", "gray.image_size=32", "-S", f"train.epochs={EPOCHS}")
    return repo, log


def test_pipeline_runs_then_is_a_noop_then_reruns_one_variant(repo):
    repo, log = repo
    expected = {"download", "grayscale", "split", "shift", "ensemble@ens", "compare"} | {
        f"{s}@{v}" for s in ("train", "evaluate") for v in VARIANTS}
    assert ran(log) == expected
    assert "\r" not in log  # progress bars only on a terminal: piped, a line per epoch
    for v in (*VARIANTS, "ens"):
        test = json.loads((repo / "reports" / v / "evaluation.json").read_text())["test"]
        assert {"accuracy", "precision", "recall", "specificity", "f1", "auroc"} <= set(test)
    # The compare stage prints the leaderboard's headline columns, best on val first, and where the rest is.
    printed = log[log.index("Leaderboard: test scores"):].splitlines()
    assert printed[1].split() == ["variant", "val", "auroc", "test", "acc", "sens", "spec", "test", "AUROC",
                                  "threshold"]
    assert sorted(line.split()[0] for line in printed[2:6]) == sorted([*VARIANTS, "ens"])
    # every test score with its 95% interval, e.g. 0.917 [.894–.938], within 120 columns
    assert all(len(re.findall(r"\d\.\d{3} \[1?\.\d{3}–1?\.\d{3}\]", line)) == 5 for line in printed[2:6])
    assert max(map(len, printed[1:6])) <= 120
    for line in printed[2:6]:  # each figure as evaluate computed it, rounded once
        test = json.loads((repo / "reports" / line.split()[0] / "evaluation.json").read_text())["test"]
        shown = re.findall(r"(\d\.\d{3}) \[", line)[1:]  # after val auroc: acc, sens, spec, test AUROC
        assert shown == [f"{test[k]:.3f}" for k in ("accuracy", "recall", "specificity", "auroc")], line
    assert any(line.startswith("Full table and figures: comparison/leaderboard.md") for line in printed[6:])
    board = (repo / "comparison" / "leaderboard.md").read_text()
    # the intervals say their unit: Kaggle's names give patients, so the bootstrap drew patients
    assert printed[0].startswith("Leaderboard: test scores [95% interval by patient]")
    assert "Scores [95% interval by patient: 2,000 bootstrap resamples" in board
    assert all(f"| {v} |" in board for v in VARIANTS) and "| ens | ensemble: tinyvgg + linear |" in board
    rows = json.loads((repo / "comparison" / "leaderboard.json").read_text())
    for r in rows:  # the intervals in the JSON, two numeric columns each in the CSV; the subtypes' sensitivity
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] and "recall_virus" in r
        assert r["interval_unit"] == "patient"
    csv_head = (repo / "comparison" / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"accuracy_ci95_low", "accuracy_ci95_high", "recall_bacteria", "specificity_NORMAL2-IM",
            "specificity_IM_ci95_low"} <= set(csv_head)  # and per acquisition series (split.series)
    assert "| specificity_IM | specificity_NORMAL2-IM |" in board
    assert [r["val_auroc"] for r in rows] == sorted((r["val_auroc"] for r in rows), reverse=True)  # never test
    for v in VARIANTS:  # each test image's prediction, for error analysis
        t = json.loads((repo / "reports" / v / "evaluation.json").read_text())["test"]
        preds = (repo / "reports" / v / "predictions.csv").read_text().splitlines()
        assert preds[0] == "name,label,p_pneumonia,predicted"
        assert len(preds) - 1 == t["tp"] + t["fp"] + t["tn"] + t["fn"]
    split_report = json.loads((repo / "reports" / "split.json").read_text())
    assert split_report["carved"] == ["val"] and split_report["duplicates"]["within_split_extra_copies"]["train"] > 0
    # Can validation speak for test? The shift stage says, before any training; the leaderboard repeats it.
    shift = json.loads((repo / "reports" / "shift.json").read_text())
    counts = {s: len((repo / "data" / "split" / "32" / f"{s}_meta.csv").read_text().splitlines()) - 1
              for s in ("val", "test")}
    assert (shift["reference"], shift["target"]) == ({"name": "data/split:val", "images": counts["val"]},
                                                     {"name": "data/split:test", "images": counts["test"]})
    assert shift["domain"]["class_balanced"] and shift["domain"]["ci95"][0] <= shift["domain"]["auroc"]
    assert shift["verdict"] in log and (repo / "reports" / "shift.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Validation against test (shift stage): {shift['verdict']}." in board
    assert f"({shift['target']['name']}). Report and figure: reports/shift.json, reports/shift.png." in board

    noop = sh(repo, "dvc", "repro")
    assert ran(noop) == set() and "Data and pipelines are up to date" in noop

    one = sh(repo, "dvc", "exp", "run", "-S", "models.mlp.lr=0.002")
    # The ensemble depends on the whole models/ folder (DVC cannot template a list of member folders), so it
    # is evaluated again too: seconds.
    assert ran(one) == {"train@mlp", "evaluate@mlp", "ensemble@ens", "compare"}

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chest-xray")
    runs = client.search_runs([exp.experiment_id])
    variant_runs = [r for r in runs if r.data.tags.get("cxr.kind") != "comparison"]
    assert sorted(r.info.run_name for r in variant_runs) == sorted([*VARIANTS, "mlp", "ens", "ens"])
    assert all(r.data.tags.get("dvc_exp_name") and "test/auroc" in r.data.metrics for r in variant_runs)
    assert len(client.search_logged_models([exp.experiment_id])) == len(VARIANTS) + 3
    assert not (repo / "checkpoints").exists() or not any((repo / "checkpoints").iterdir())
    # One comparison run per pipeline run, parent of the variant runs that pipeline run trained.
    compares = sorted((r for r in runs if r.data.tags.get("cxr.kind") == "comparison"),
                      key=lambda r: r.info.start_time)
    children = [sorted(r.info.run_name for r in variant_runs if r.data.tags.get("mlflow.parentRunId") == c.info.run_id)
                for c in compares]
    assert children == [sorted([*VARIANTS, "ens"]), ["ens", "mlp"]]
    # What the UI shows: the runs table (a model-training experiment), parents named after the DVC experiment
    # and described by the leaderboard, variant runs described and with the split as their dataset.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    by_id = {r.info.run_id: r for r in variant_runs}
    for c in compares:
        assert c.info.run_name == c.data.tags["dvc_exp_name"] and c.info.run_name != "compare"
        assert c.data.tags["mlflow.note.content"].startswith("**Leaderboard**")
        assert {f"test_auroc.{v}" for v in VARIANTS} <= set(c.data.metrics)  # the columns of `dvc exp show`
        # Every variant of that pipeline run, reused ones too, is listed and linked from the parent.
        listed = c.data.tags["variant_runs"].split(",")
        assert sorted(by_id[i].info.run_name for i in listed) == sorted([*VARIANTS, "ens"])
        note = c.data.tags["mlflow.note.content"]
        mode = "workflowType=machine_learning"  # MLflow opens the page in "Model training" mode
        assert all(f"(#/experiments/{exp.experiment_id}/runs/{i}?{mode})" in note for i in listed)
        assert f"(#/compare-runs?runs=[{','.join(f'%22{i}%22' for i in listed)}]" in note  # MLflow's comparison
    assert compares[1].data.tags["mlflow.note.content"].count(") (reused) |") == 2  # linear, tinyvgg: not retrained
    assert compares[1].data.tags["shift.verdict"] == shift["verdict"]
    assert shift["verdict"] in compares[1].data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(compares[1].info.run_id, "shift")} == {"shift/shift.json",
                                                                                         "shift/shift.png"}
    for r in variant_runs:  # one name per quantity: the speed per epoch, not also a mean under another name
        assert "train/images_per_s" in r.data.metrics or r.info.run_name == "ens"
        assert not {"images/per_s", "epoch/seconds", "seconds"} & set(r.data.metrics)
    digest = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["split"]["outs"][0]["md5"][:12]
    for r in variant_runs:
        note = r.data.tags["mlflow.note.content"]
        assert note.startswith(f"**{r.info.run_name}**") and "\n\nTest (" in note and "AUROC" in note
        if r.info.run_name != "ens":
            assert "from scratch" in note and "train /" in note
            [dataset] = [d.dataset for d in r.inputs.dataset_inputs]
            assert dataset.digest == digest and dataset.name.endswith(" 32px")

    # `variants` picks which definitions run: with a subset, DVC would train and evaluate nothing again, and
    # the other variant's stages are gone from the pipeline (a dry run: no need to run it).
    text = (repo / "params.yaml").read_text()
    subset = [v for v in VARIANTS if v != "mlp"]
    (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load(text), "variants": subset}, sort_keys=False))
    try:
        stages = sh(repo, "dvc", "stage", "list", "--name-only").split()
        assert "train@mlp" not in stages and {f"train@{v}" for v in subset} <= set(stages)
        dry = sh(repo, "dvc", "repro", "--dry")
        assert not any(s.startswith(("train@", "evaluate@")) for s in ran(dry)) and "compare" in ran(dry)
    finally:
        (repo / "params.yaml").write_text(text)


PLOTS = ("test-scores", "test-roc", "test-pr", "training-history", "test-confusion")
# README's form of `dvc exp show` for a terminal: the best variant of each experiment, whatever its variants.
EXP_SHOW = "dvc exp show --no-pager --drop '.*' --keep 'Experiment|^best\\.'"


def test_dvc_plots_overlay_every_variant_and_exp_show_fits_a_terminal(repo):
    repo, _ = repo
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json"))["data"]
    # one chart per question, not one per variant and file; then the shift stage's figure and each variant's
    # error gallery, images
    galleries = sorted(f"reports/{v}/gallery.jpg" for v in (*VARIANTS, "ens"))
    assert list(plots)[:len(PLOTS)] == list(PLOTS)
    assert sorted(list(plots)[len(PLOTS):]) == sorted([*galleries, "reports/shift.png"])
    assert all(plots[g][0]["type"] == "image" for g in galleries)
    for name in PLOTS:
        [plot] = plots[name]
        values = plot["content"]["data"]["values"]
        assert plot["type"] == "vega" and plot["content"]["title"] and "/" not in plot["content"]["title"]
        assert {v["variant"] for v in values} == {*VARIANTS, *(["ens"] if name != "training-history" else [])}
    history = plots["training-history"][0]["content"]["data"]["values"]
    assert {h["metric"] for h in history} == {"train loss", "validation loss", "validation AUROC"}
    confusion = plots["test-confusion"][0]["content"]["data"]["values"]
    for v in VARIANTS:  # counts per cell, as the evaluation counted them
        t = json.loads((repo / "reports" / v / "evaluation.json").read_text())["test"]
        cells = {(c["actual"], c["predicted"]): c["count"] for c in confusion if c["variant"] == v}
        assert [cells[("NORMAL", "NORMAL")], cells[("NORMAL", "PNEUMONIA")], cells[("PNEUMONIA", "NORMAL")],
                cells[("PNEUMONIA", "PNEUMONIA")]] == [t["tn"], t["fp"], t["fn"], t["tp"]]
    # `dvc plots diff` against the first experiment: both revisions' curves in the one ROC chart.
    first = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    exps = [e for row in first if row.get("experiments") for x in row["experiments"] for e in x["revs"]]
    diff = json.loads(sh(repo, "dvc", "plots", "diff", exps[-1]["rev"], "--json", "--targets", "test-roc"))["data"]
    assert len({v["rev"] for v in diff["test-roc"][0]["content"]["data"]["values"]}) == 2
    # `dvc exp show`: one metrics file, the compare stage's scores: the best variant by validation first.
    metrics = first[0]["data"]["metrics"]
    assert list(metrics) == ["comparison/scores.json"]
    data = metrics["comparison/scores.json"]["data"]
    assert list(data) == ["best", "test_auroc", "val_auroc", "test_acc", "test_sens", "test_spec"]
    assert all(set(d) == {*VARIANTS, "ens"} for k, d in data.items() if k != "best")
    val = {v: json.loads((repo / "reports" / v / "evaluation.json").read_text())["val"]["auroc"]
           for v in data["test_auroc"]}
    assert data["best"]["variant"] == max(val, key=val.get)  # unrounded: the file's rounded digits can tie
    assert data["best"]["test_auroc"] == data["test_auroc"][data["best"]["variant"]]
    assert EXP_SHOW in (ROOT / "README.md").read_text()
    table = sh(repo, "sh", "-c", EXP_SHOW, env={"COLUMNS": "120"})
    assert max(map(len, table.splitlines())) <= 120 and "…" not in table, table
    header = next(line for line in table.splitlines() if "Experiment" in line)
    assert all(f"best.{k}" in header for k in data["best"]), table
    # `cxr results`: the same experiments with intervals, within 120 columns, one row each or one per variant.
    for args, rows in (((), 1), (("--variants",), len(VARIANTS) + 1)):
        out = sh(repo, "cxr", "results", *args, env={"COLUMNS": "120"})
        lines = out.splitlines()
        assert max(map(len, lines)) <= 120, out
        start = next(i for i, line in enumerate(lines) if line.startswith("experiment"))
        body = lines[start + 1:start + 1 + rows]
        assert body[0].split()[:2] == ["workspace", data["best"]["variant"]], out
        assert len(re.findall(r"\d\.\d{3} \[1?\.\d{3}–1?\.\d{3}\]", body[0])) == 4  # each test score, its interval


def test_dvc_plots_show_draws_every_chart_offline(repo):
    """The page `make setup` builds (tools/plots/dvc_plots.html) carries Vega itself: no script from a CDN."""
    repo, _ = repo
    template = ROOT / "tools" / "plots" / "dvc_plots.html"
    if not template.exists():
        pytest.skip("tools/plots/dvc_plots.html is not built: `make setup` builds it where npm is installed")
    sh(repo, "dvc", "plots", "show", "--html-template", str(template), "-o", "page")
    page = (repo / "page" / "index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # nothing to fetch
    assert "vegaEmbed=" in page and page.count("vegaEmbed('#") == len(PLOTS)  # the library, then each chart


@pytest.fixture(scope="module")
def server(repo):
    """A real `mlflow server` on 127.0.0.1 over the project's store."""
    repo, _ = repo
    with mlflow_server(repo / "mlruns" / "mlflow.db") as port:
        yield f"http://127.0.0.1:{port}"


def _api(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_every_variant_run_is_complete_through_the_rest_api(repo, server):
    repo, _ = repo
    exp = _api(server, "experiments/get-by-name", experiment_name="chest-xray")["experiment"]
    runs = _api(server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    data_md5 = next(o["md5"] for o in lock["split"]["outs"] if o["path"] == "data/split")
    head = sh(repo, "git", "rev-parse", "HEAD").strip()
    test_images = np.load(repo / "data" / "split" / "32" / "test_images.npy")[:3]
    for v in VARIANTS:
        run = max((r for r in runs if r["info"]["run_name"] == v), key=lambda r: r["info"]["start_time"])
        run_id = run["info"]["run_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert params["train.arch"] == yaml.safe_load((repo / "params.yaml").read_text())["models"][v]["arch"]
        assert tags["dvc_stage"] == f"train@{v}" and tags["dvc_stage_evaluate"] == f"evaluate@{v}"
        assert tags["data_md5"] == data_md5 and tags["mlflow.source.git.commit"] == head
        assert tags["dvc_exp_name"] and tags["mlflow.parentRunId"]
        epochs = len((repo / "reports" / v / "history.csv").read_text().splitlines()) - 1
        for key in ("train/loss", "val/loss", "val/auroc"):
            history = _api(server, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, epochs + 1))
        plots = {f["path"] for f in _api(server, "artifacts/list", run_id=run_id, path="plots")["files"]}
        assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/pr.png", "plots/history.png"} <= plots
        model_id = json.loads((repo / "reports" / v / "evaluation.json").read_text())["mlflow"]["model_id"]
        with tracking_at(server):  # the logged model is looked up through the server, and takes image files
            model = mlflow.pyfunc.load_model(f"models:/{model_id}")
        out = model.predict(pd.DataFrame({"image": [png_bytes(a) for a in test_images]}))
        assert out.shape == (3, 4) and out["p_pneumonia"].between(0, 1).all()
    # The comparison of the latest pipeline run (the one that retrained mlp) and the board it wrote.
    latest = max((r for r in runs if r["info"]["run_name"] == "mlp"), key=lambda r: r["info"]["start_time"])
    parent_id = {t["key"]: t["value"] for t in latest["data"]["tags"]}["mlflow.parentRunId"]
    parent = _api(server, "runs/get", run_id=parent_id)["run"]
    board = json.loads((repo / "comparison" / "leaderboard.json").read_text())
    val = {r["variant"]: json.loads((repo / "reports" / r["variant"] / "evaluation.json").read_text())["val"]["auroc"]
           for r in board}  # unrounded: the board's rounded digits can tie
    best = max(val, key=val.get)  # promotion's rule: validation, never test
    assert {t["key"]: t["value"] for t in parent["data"]["tags"]}["best_variant"] == best
    files = {f["path"] for f in _api(server, "artifacts/list", run_id=parent["info"]["run_id"], path="plots")["files"]}
    assert {"plots/metrics.png", "plots/roc.png", "plots/history.png"} <= files


@pytest.mark.slow
def test_two_queued_experiments_train_at_once_and_both_land_in_mlflow(repo):
    """`dvc exp run --queue` twice, then `dvc queue start -j 2`: two DVC workspaces train at the same time and
    log to the one SQLite store of the project."""
    repo, _ = repo
    names = {"q-linear": "linear", "q-tinyvgg": "tinyvgg"}
    for name, v in names.items():
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"models.{v}.lr=0.003")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while re.search(r"\b(Queued|Running)\b", status := sh(repo, "dvc", "queue", "status")):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert all(re.search(rf"{name}\s+.*Success", status) for name in names), status

    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("chest-xray")
    spans = []
    for name, v in names.items():
        runs = client.search_runs([exp.experiment_id], f"tags.dvc_exp_name = '{name}'")
        [run] = [r for r in runs if r.info.run_name == v]
        [compare] = [r for r in runs if r.data.tags.get("cxr.kind") == "comparison"]
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.003"
        assert run.data.tags["mlflow.parentRunId"] == compare.info.run_id
        for key in ("train/loss", "val/loss", "val/auroc"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, EPOCHS + 1))
        assert {"test/auroc", "test/f1", "threshold", "train/best_epoch"} <= set(run.data.metrics)
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/pr.png", "plots/history.png"} <= plots
        [model] = client.search_logged_models([exp.experiment_id], f"source_run_id = '{run.info.run_id}'")
        with tracking_at(uri):
            assert mlflow.pyfunc.load_model(f"models:/{model.model_id}") is not None
        spans.append((run.info.start_time, run.info.end_time))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the two trainings overlapped in time


def test_promote_and_predict_take_the_variants_the_last_run_ran_not_params_yaml_s(repo, tmp_path):
    """params.yaml edited after the run to list variants that never ran here (the defaults, say): `cxr promote`
    then `cxr predict` work on what the run produced, its leaderboard's variants."""
    repo, _ = repo
    text = (repo / "params.yaml").read_text()
    default = yaml.safe_load((ROOT / "params.yaml").read_text())  # every report's variants at 224 px, no ensemble
    (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load(text), **{k: default[k] for k in (
        "variants", "ensembles", "gray")}}, sort_keys=False))
    try:
        out = sh(repo, "cxr", "promote")
    finally:
        (repo / "params.yaml").write_text(text)
    record = json.loads((repo / "promotion.json").read_text())
    board = json.loads((repo / "comparison" / "leaderboard.json").read_text())
    val = {r["variant"]: json.loads((repo / "reports" / r["variant"] / "evaluation.json").read_text())["val"]["auroc"]
           for r in board}
    assert "\npromoted: no champion yet" in "\n" + out
    assert record["candidate"]["variant"] == max(val, key=val.get)
    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    description = client.get_registered_model("chest-xray-classifier").description
    assert "labels 0 NORMAL, 1 PNEUMONIA" in description and "champion" in description
    folder = make_imagefolder(tmp_path / "new", per_class=1, splits=("test",), with_duplicates=False)
    table = sh(repo, "cxr", "predict", str(folder)).splitlines()
    assert table[1].split() == ["image", "P(pneumonia)", "decision"]
    assert table[4].startswith("2 images: ") and not table[3].startswith("2 images")  # one per class, then counts
    assert "no file matches this pattern" in sh(repo, "cxr", "predict", str(folder / "*.png"), ok=False)
    # Without a run there is nothing to promote, and the error names the command for this machine.
    moved = repo / "comparison.moved"
    (repo / "comparison").rename(moved)
    try:
        err = sh(repo, "cxr", "promote", ok=False)
    finally:
        moved.rename(repo / "comparison")
    assert "comparison/leaderboard.json is missing" in err and "make quick DATA=" in err


def _champion(repo: Path) -> str:
    """The registered champion's variant; `cxr promote` first where there is none yet (tests may run alone)."""
    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    try:
        return client.get_model_version_by_alias("chest-xray-classifier", "champion").tags["variant"]
    except mlflow.exceptions.MlflowException:
        sh(repo, "cxr", "promote")
        return client.get_model_version_by_alias("chest-xray-classifier", "champion").tags["variant"]


def _invoke(url: str, images: list[bytes] | None = None, body: bytes | None = None) -> tuple[int, dict]:
    """POST images (base64, as `mlflow models serve` documents it) or a raw body; the status and JSON answer."""
    if body is None:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(b).decode()] for b in images or []]}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_serves_the_champion_on_image_files_as_evaluate_scored_them_and_refuses_bad_ones(repo, tmp_path):
    """`mlflow models serve -m models:/chest-xray-classifier@champion` (a real server on 127.0.0.1) takes the
    image files themselves and answers what evaluate wrote for them; a bad request gets a 4xx and one line, and
    the server goes on answering."""
    repo, _ = repo
    variant, store = _champion(repo), f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    folder = Path(yaml.safe_load((repo / "params.yaml").read_text())["data"]["path"])
    rows = list(csv.DictReader((repo / "reports" / variant / "predictions.csv").open()))
    files = [(folder / r["name"]).read_bytes() for r in rows]
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600), dtype=np.uint8)).save(noise, "PNG")
    bomb = io.BytesIO()
    Image.new("L", (9500, 9500)).save(bomb, "PNG", optimize=True)  # 90 Mpx in about 90 kB
    env = project_env() | {"MLFLOW_TRACKING_URI": store, "CXR_SERVE_MAX_IMAGE_MB": "0.2"}
    with served("models:/chest-xray-classifier@champion", env) as url:
        status, answer = _invoke(url, files)  # one batch of every test image
        assert status == 200 and len(answer["predictions"]) == len(rows)
        for r, got in zip(rows, answer["predictions"], strict=True):
            assert abs(got["p_pneumonia"] - float(r["p_pneumonia"])) <= 1e-6 and got["decision"] == r["predicted"]
            assert got["class"] == ("NORMAL", "PNEUMONIA").index(got["decision"]) and 0 < got["threshold"] < 1
        for bad, reason in ((b"not an image", "not an image Pillow can read"),
                            (files[0][:len(files[0]) // 2], "corrupt or truncated"),
                            (noise.getvalue(), "over the 0.2 MB limit"),
                            (bomb.getvalue(), "decompression bomb")):
            status, answer = _invoke(url, [files[0], bad])
            assert status == 400 and answer["message"].startswith("image 2 of 2") and reason in answer["message"]
            assert "\n" not in answer["message"]
            assert _invoke(url, files[:1])[0] == 200  # still up, and answering
        assert _invoke(url, [])[1]["message"].startswith("no images in the request")
        status, answer = _invoke(url, body=b"")
        assert 400 <= status < 500, answer
        assert _invoke(url, files[:1])[0] == 200


def test_cxr_explain_draws_what_drove_each_prediction_and_names_unreadable_files(repo, tmp_path):
    repo, _ = repo
    folder = make_imagefolder(tmp_path / "new", per_class=1, splits=("test",), with_duplicates=False)
    (folder / "test" / "broken.jpeg").write_bytes(b"not an image")
    evaluated = json.loads((repo / "reports" / "tinyvgg" / "evaluation.json").read_text())["mlflow"]["model_uri"]
    out = sh(repo, "cxr", "explain", str(folder), "--model", evaluated, "--out", str(tmp_path / "maps"), ok=False)
    rows = csv.DictReader((repo / "reports" / "tinyvgg" / "predictions.csv").open())  # these images are in test
    scores = {Path(r["name"]).stem: float(r["p_pneumonia"]) for r in rows}
    written = [line for line in out.splitlines() if line.startswith(str(tmp_path / "maps"))]
    assert len(written) == 2 and "broken.jpeg: not an image" in out.splitlines()[-1]
    for line in written:  # the PNG, P(pneumonia) as evaluate scored it, the decision and the method
        png_path = Path(line.split()[0])
        assert f"P(pneumonia) {scores[png_path.stem]:.3f} " in line and "Grad-CAM on " in line
        assert Image.open(png_path).size[0] > 300
    # By default the champion: linear, MLP and an ensemble have no one convolutional map to weigh.
    variant, one = _champion(repo), next(folder.rglob("IM-*.jpeg"))
    champ = sh(repo, "cxr", "explain", str(one), "--out", str(tmp_path / "champ"))
    assert ("Grad-CAM on " if variant == "tinyvgg" else "(input gradient)") in champ
    assert (tmp_path / "champ" / f"{one.stem}.png").exists()


def test_cxr_shift_with_the_champion_repeats_the_stage_s_image_figures_and_adds_its_features(repo, tmp_path):
    """`cxr shift` on the pipeline's own splits: the image statistics and the image classifier are the shift
    stage's (the same arrays, the same folds), and the champion adds a classifier on its features and each class's
    scores."""
    repo, _ = repo
    variant = _champion(repo)
    out = sh(repo, "cxr", "shift", "data/split:val", "data/split:test", "--out", str(tmp_path / "s"))
    report = json.loads((tmp_path / "s" / "shift.json").read_text())
    stage = json.loads((repo / "reports" / "shift.json").read_text())
    assert (report["images"], report["domain"]) == (stage["images"], stage["domain"])
    model = report["model"]
    assert model["variant"] == variant and model["domain"]["class_balanced"]
    assert set(model["scores_by_class"]) == {"NORMAL", "PNEUMONIA"} and 0 < model["prevalence"]["reference"] < 1
    assert report["verdict"] in out and f"domain classifier on {variant}'s features" in out
    assert (tmp_path / "s" / "shift.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_serve_load_bench_prints_its_table_against_the_champion(repo):
    repo, _ = repo
    _champion(repo)
    images = Path(yaml.safe_load((repo / "params.yaml").read_text())["data"]["path"]) / "test"
    out = sh(ROOT, sys.executable, "bench/serve_load.py", "--images", str(images), "--requests", "20",
             "--batch-requests", "4", "--concurrency", "1,4",
             env={"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"})
    rows = re.findall(r"^\| (mlflow models serve|cxr serve|cxr serve, logging) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|",
                      out, re.M)
    cases = [("1", "1", "20"), ("1", "4", "20"), ("32", "1", "4"), ("32", "4", "4")]
    assert [r[:4] for r in rows] == [(server, *c) for server in ("mlflow models serve", "cxr serve",
                                                                  "cxr serve, logging") for c in cases], out
    assert all(r[4] == "0" for r in rows) and "| cxr predict (command, model load included) |" in out
    assert re.search(r"The prediction log, in this process: \d+ µs per image", out)
