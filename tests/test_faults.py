"""Each DVC stage killed mid-run, by Ctrl-C (SIGINT to the whole process group) or by SIGKILL to the stage
alone (as the OOM killer does): no output is left that DVC or the next stage could take for complete, DVC
sees the stage as not run, and `dvc repro` recovers to the metrics of the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_imagefolder, make_project, project_env, ran, sh

V = "linear"
# stage -> (what shows it is mid-work, the outputs it must not leave behind)
STAGES = {
    "download": ("data/.raw.tmp-*", ["data/raw"]),
    "grayscale": ("data/.gray.tmp-*", ["data/gray", "reports/grayscale.json"]),
    "split": ("data/.split.tmp-*", ["data/split", "reports/split.json"]),
    f"train@{V}": (f"checkpoints/{V}/state.pt", [f"models/{V}", f"reports/{V}/train.json", f"reports/{V}/history.csv"]),
    f"evaluate@{V}": (f"reports/{V}/.metrics.json.tmp-*", [f"reports/{V}/{n}.json" for n in
                                                           ("evaluation", "metrics", "confusion", "roc", "pr")]),
    "compare": (".comparison.tmp-*", ["comparison/leaderboard.md", "comparison/leaderboard.json"]),
}


DATA_STAGES = ("download", "grayscale", "split")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The pipeline with one variant; the data stages run once uninterrupted, the rest on first need."""
    folder = make_imagefolder(tmp_path_factory.mktemp("src"), per_class=300)
    repo = make_project(tmp_path_factory.mktemp("faults") / "repo",
                        {V: {"arch": "linear", "epochs": 4, "patience": 99}},
                        data={"source": "imagefolder", "path": str(folder)},
                        gray={"image_size": 32, "extra_sizes": [96]})
    sh(repo, "dvc", "repro", "split")
    return repo, {}


def _reference(repo: Path, stage: str, known: dict) -> dict:
    """What an uninterrupted run gives: the data stages' output hashes in dvc.lock, or the variant's metrics."""
    if stage in DATA_STAGES:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {s: lock[s]["outs"] for s in DATA_STAGES}
    if "metrics" not in known:
        sh(repo, "dvc", "repro")
        known["metrics"] = json.loads((repo / "reports" / V / "metrics.json").read_text())
    return known["metrics"]


PYTHON = os.path.realpath(sys.executable)


def _stage_pids(repo: Path) -> dict[int, int]:
    """pid -> parent pid of the stage's Python processes (and their workers) running in `repo`. Not the shell
    DVC runs the command with: dash (/bin/sh, DVC's shell when SHELL is unset, as in CI) forks the command
    and waits, where bash execs it."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd") == str(repo) and \
                    os.readlink(proc / "exe") == PYTHON and b"stages/" in (proc / "cmdline").read_bytes():
                pids[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    return pids


def _kill_mid_run(repo: Path, stage: str, sig: signal.Signals, tries: int = 5) -> str:
    """Run the stage and signal it while its outputs are still temporaries. The whole process group is
    stopped the moment the marker appears, so a fast machine cannot finish the stage while we look for its
    pid; if it had already renamed its outputs by then, it runs again."""
    marker, outs = STAGES[stage]
    for _ in range(tries):
        # SIGINT as the terminal leaves it: a shell that runs this suite in the background (`cmd &`) passes
        # SIGINT ignored to its children, and a stage that inherits that never sees the Ctrl-C.
        proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=repo, env=project_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while not list(repo.glob(marker)):
            assert proc.poll() is None, f"{stage} ended before it could be interrupted:\n{proc.stdout.read()[-2000:]}"
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGSTOP)
        if list(repo.glob(marker)) and not [o for o in outs if (repo / o).exists()]:
            break
        os.killpg(proc.pid, signal.SIGCONT)  # too late: its outputs are in place
        proc.communicate(timeout=120)
    else:
        pytest.fail(f"{stage} finished before it could be stopped, {tries} times")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals dvc, the stage and its workers
    else:
        pids = _stage_pids(repo)
        [main] = [p for p, parent in pids.items() if parent not in pids]  # not a worker of another
        os.kill(main, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGCONT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out
    return out


FAST = {("grayscale", "SIGINT"), ("grayscale", "SIGKILL"), ("split", "SIGKILL")}  # the rest: -m slow


@pytest.mark.parametrize("stage, sig", [
    pytest.param(stage, sig, id=f"{stage}-{sig.name}", marks=() if (stage, sig.name) in FAST else pytest.mark.slow)
    for stage in STAGES for sig in (signal.SIGINT, signal.SIGKILL)])
def test_a_stage_killed_mid_run_leaves_nothing_and_repro_recovers(project, stage, sig):
    repo, known = project
    reference = _reference(repo, stage, known)
    out = _kill_mid_run(repo, stage, sig)
    time.sleep(0.5)
    assert _stage_pids(repo) == {}, "a worker outlived the stage"
    left = [o for o in STAGES[stage][1] if (repo / o).exists()]
    assert left == [], f"{stage} left {left} after {sig.name}:\n{out[-1500:]}"
    assert stage in sh(repo, "dvc", "status", stage)  # DVC does not take the stage as run
    if sig == signal.SIGINT:
        assert "error: interrupted; outputs of this stage were not written" in out
        assert not [p for p in repo.rglob(".*.tmp-*") if ".dvc" not in p.parts], "Ctrl-C left a temporary"

    log = sh(repo, "dvc", "repro", "-f", "-s", stage)  # -f: run it again (`dvc repro` may restore DVC's run cache)
    assert ran(log) == {stage}
    if stage.startswith("train"):
        assert f"{V}: resuming after epoch" in log
    sh(repo, "dvc", "repro", "split" if stage in DATA_STAGES else "compare")
    assert "up to date" in sh(repo, "dvc", "status", "split" if stage in DATA_STAGES else "compare")
    assert _reference(repo, stage, known) == reference  # the same outputs as the uninterrupted run
    assert not [p for p in repo.rglob(".*.tmp-*") if ".dvc" not in p.parts]  # a killed run's temporary is gone too
