"""`dvc exp run` / `dvc repro` of the real pipeline in a temporary git repo, on a small real subset; then
DVC's plots and experiment table, and the MLflow runs seen through a real `mlflow server`'s REST API."""

import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, make_imagefolder, make_project, mlflow_server, ran, sh, tracking_at

VARIANTS = ("linear", "mlp", "tinyvgg")  # the ones that train in seconds on a CPU
EPOCHS = 2


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    repo = make_project(tmp_path_factory.mktemp("pipe") / "repo", {k: raw["models"][k] for k in VARIANTS},
                        gray={"extra_sizes": []}, ensembles={"ens": ["tinyvgg", "linear"]})
    folder = make_imagefolder(tmp_path_factory.mktemp("src"), per_class=60)
    log = sh(repo, "dvc", "exp", "run", "-S", "data.source=imagefolder", "-S", f"data.path={folder}",
             "-S", "gray.image_size=32", "-S", f"train.epochs={EPOCHS}")
    return repo, log


def test_pipeline_runs_then_is_a_noop_then_reruns_one_variant(repo):
    repo, log = repo
    expected = {"download", "grayscale", "split", "ensemble@ens", "compare"} | {
        f"{s}@{v}" for s in ("train", "evaluate") for v in VARIANTS}
    assert ran(log) == expected
    for v in (*VARIANTS, "ens"):
        test = json.loads((repo / "reports" / v / "evaluation.json").read_text())["test"]
        assert {"accuracy", "precision", "recall", "specificity", "f1", "auroc"} <= set(test)
    # The compare stage prints the leaderboard's headline columns, best on val first, and where the rest is.
    printed = log[log.index("Leaderboard: test scores"):].splitlines()
    assert printed[1].split() == ["variant", "val", "auroc", "test", "acc", "sens", "spec", "test", "AUROC",
                                  "threshold"]
    assert sorted(line.split()[0] for line in printed[2:6]) == sorted([*VARIANTS, "ens"])
    # every test score with its 95% interval, e.g. 0.9167 [0.894–0.938]
    assert all(len(re.findall(r"\d\.\d{4} \[\d\.\d{3}–\d\.\d{3}\]", line)) == 5 for line in printed[2:6])
    assert any(line.startswith("Full table and figures: comparison/leaderboard.md") for line in printed[6:])
    board = (repo / "comparison" / "leaderboard.md").read_text()
    assert all(f"| {v} |" in board for v in VARIANTS) and "| ens | ensemble: tinyvgg + linear |" in board
    rows = json.loads((repo / "comparison" / "leaderboard.json").read_text())
    for r in rows:  # the intervals in the JSON, two numeric columns each in the CSV; the subtypes' sensitivity
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] and "recall_virus" in r
    csv_head = (repo / "comparison" / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"accuracy_ci95_low", "accuracy_ci95_high", "recall_bacteria"} <= set(csv_head)
    assert [r["val_auroc"] for r in rows] == sorted((r["val_auroc"] for r in rows), reverse=True)  # never test
    for v in VARIANTS:  # each test image's prediction, for error analysis
        t = json.loads((repo / "reports" / v / "evaluation.json").read_text())["test"]
        preds = (repo / "reports" / v / "predictions.csv").read_text().splitlines()
        assert preds[0] == "name,label,p_pneumonia,predicted"
        assert len(preds) - 1 == t["tp"] + t["fp"] + t["tn"] + t["fn"]
    split_report = json.loads((repo / "reports" / "split.json").read_text())
    assert split_report["carved"] == ["val"] and split_report["duplicates"]["within_split_extra_copies"]["train"] > 0

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
    for c in compares:
        assert c.info.run_name == c.data.tags["dvc_exp_name"] and c.info.run_name != "compare"
        assert c.data.tags["mlflow.note.content"].startswith("**Leaderboard**")
        assert {f"auroc.{v}" for v in VARIANTS} <= set(c.data.metrics)  # the columns of `dvc exp show`
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


def test_dvc_plots_and_exp_show_list_every_variant(repo):
    repo, _ = repo
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json"))["data"]
    for v in VARIANTS:
        for name in ("history.csv", "confusion.json", "roc.json", "pr.json"):
            [plot] = plots[f"reports/{v}/{name}"]
            assert plot["type"] == "vega" and plot["content"]["data"]["values"]
    for name in ("metrics", "roc", "history"):
        [image] = plots[f"comparison/{name}.png"]
        assert Path(image["url"]).read_bytes()[:4] == b"\x89PNG"
    # `dvc plots diff` against the first experiment: both revisions' curves in one plot.
    first = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    exps = [e for row in first if row.get("experiments") for x in row["experiments"] for e in x["revs"]]
    diff = json.loads(sh(repo, "dvc", "plots", "diff", exps[-1]["rev"], "--json", "--targets",
                         "reports/mlp/roc.json"))["data"]
    assert len(diff["reports/mlp/roc.json"][0]["revisions"]) == 2
    # `dvc exp show`: one metrics file, the compare stage's scores: each variant's test AUROC first.
    metrics = first[0]["data"]["metrics"]
    assert list(metrics) == ["comparison/scores.json"]
    data = metrics["comparison/scores.json"]["data"]
    assert list(data) == ["auroc", "val_auroc", "acc", "sens", "spec"]
    assert all(set(d) == {*VARIANTS, "ens"} for d in data.values())
    # README's command for a narrow terminal (the scores alone): at 120 columns every variant's test AUROC is
    # a column. (DVC shows every key of params.yaml; past ~20 columns its table folds them all into "…".)
    table = sh(repo, "dvc", "exp", "show", "--no-pager", "--drop", "^(?!Experiment|auroc|val_auroc|acc)",
               env={"COLUMNS": "120"})
    header = next(line for line in table.splitlines() if "Experiment" in line)
    assert all(f"auroc.{v}" in header for v in [*VARIANTS, "ens"]), table


def test_dvc_plots_show_draws_every_chart_offline(repo):
    """The page `make setup` builds (tools/plots/dvc_plots.html) carries Vega itself: no script from a CDN."""
    repo, _ = repo
    template = ROOT / "tools" / "plots" / "dvc_plots.html"
    if not template.exists():
        pytest.skip("tools/plots/dvc_plots.html is not built: `make setup` builds it where npm is installed")
    sh(repo, "dvc", "plots", "show", "--html-template", str(template), "-o", "page")
    page = (repo / "page" / "index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # nothing to fetch
    vega = [k for k, v in json.loads(sh(repo, "dvc", "plots", "show", "--json"))["data"].items()
            if v[0]["type"] == "vega"]
    assert len(vega) == 4 * len(VARIANTS) + 3  # history, confusion, ROC, PR; the ensemble has no history
    assert "vegaEmbed=" in page and page.count("vegaEmbed('#") == len(vega)  # the library, then each chart
    for name in ("metrics", "roc", "history"):
        assert f"comparison_{name}.png" in page or f"comparison/{name}.png" in page


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
    test_images = np.load(repo / "data" / "split" / "32" / "test_images.npy")[:3, None]
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
        with tracking_at(server):  # the logged model is looked up through the server
            model = mlflow.pytorch.load_model(f"models:/{model_id}")
        out = model(torch.from_numpy(test_images.astype(np.float32) / 255))
        assert out.shape == (3, 1) and torch.isfinite(out).all()
    # The comparison of the latest pipeline run (the one that retrained mlp) and the board it wrote.
    latest = max((r for r in runs if r["info"]["run_name"] == "mlp"), key=lambda r: r["info"]["start_time"])
    parent_id = {t["key"]: t["value"] for t in latest["data"]["tags"]}["mlflow.parentRunId"]
    parent = _api(server, "runs/get", run_id=parent_id)["run"]
    board = json.loads((repo / "comparison" / "leaderboard.json").read_text())
    val = {r["variant"]: json.loads((repo / "reports" / r["variant"] / "evaluation.json").read_text())["val"]["auroc"]
           for r in board}  # unrounded: the board's 4 digits can tie
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
            assert mlflow.pytorch.load_model(f"models:/{model.model_id}") is not None
        spans.append((run.info.start_time, run.info.end_time))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the two trainings overlapped in time
