"""The README as a new user reads it: every shell command of its ```bash blocks, in order, on a fresh clone of
this commit, offline, with the real Kaggle folder next to it as `../shared/data`; exit codes, `params.yaml` and
`dvc status` as the README says after each (`make test-readme`, about 8 minutes: the install is most of it)."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, shared

# Commands this test cannot run as written, and why; each is run by another check.
SKIP = {
    "make cpu-best DATA=../shared/data/chest_xray_224": "15 minutes of training (docs/results.md has its figures)",
    "make test": "the suite this test belongs to",
    "make test-all": "the suite this test belongs to",
}
# Commands the README says fail, with the line that says why.
FAILS = {
    "cxr run -S train.epochs=abc": "error: train.epochs: expected int, got 'abc'; nothing was run",
    "make repro": "cannot reach the Hugging Face hub",
}
CLEAN = "Data and pipelines are up to date."


def commands(readme: str) -> list[str]:
    """Each line of the ```bash blocks, its trailing comment dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, flags=re.M | re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_finds_its_commands():
    cmds = commands((ROOT / "README.md").read_text())
    assert cmds[0] == "make quick DATA=../shared/data/chest_xray_224" and "source .venv/bin/activate" in cmds
    assert set(SKIP) | set(FAILS) <= set(cmds)  # nothing here names a command the README no longer has


@pytest.mark.slow
def test_every_readme_command_runs_as_written_on_a_fresh_clone(tmp_path):
    data = shared("chest_xray_224")
    (tmp_path / "shared").symlink_to(data.parent.parent)  # ../shared/data/... from the clone, as in the README
    repo = tmp_path / "cxr"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    # A new user's shell: no virtual environment, no MLflow or DVC settings of this session.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    committed = (repo / "params.yaml").read_bytes()
    prelude = ""

    def status() -> str:  # the clone's own DVC, which `make quick` installs
        return subprocess.run([str(repo / ".venv" / "bin" / "dvc"), "status"], cwd=repo, env=env, text=True,
                              capture_output=True).stdout

    for cmd in commands((repo / "README.md").read_text()):
        if cmd in SKIP:
            continue
        if cmd.startswith("source "):
            prelude += cmd + "\n"
            continue
        if cmd == "make ui":  # a server: it answers, then stops
            check_ui(repo, env, prelude)
            continue
        before = (repo / "params.yaml").read_bytes()
        res = subprocess.run(["bash", "-c", prelude + cmd], cwd=repo, env=env, text=True, capture_output=True)
        out = res.stdout + res.stderr
        assert (res.returncode != 0) == (cmd in FAILS), f"{cmd} gave {res.returncode}:\n{out[-3000:]}"
        if cmd in FAILS:
            assert FAILS[cmd] in out, out[-3000:]
            assert (repo / "params.yaml").read_bytes() == before, f"{cmd} left params.yaml changed"
            assert (repo / "data" / "raw" / "manifest.csv").exists(), f"{cmd} left data/raw deleted"
        if cmd.startswith("make quick"):  # the workspace is the experiment, params included
            p = yaml.safe_load((repo / "params.yaml").read_text())
            quick = yaml.safe_load((repo / "configs" / "quick.yaml").read_text())
            assert p["variants"] == quick["variants"] and p["gray"]["image_size"] == quick["gray"]["image_size"]
            assert (p["data"]["source"], p["data"]["path"]) == ("imagefolder", "../shared/data/chest_xray_224")
        if cmd == "git checkout params.yaml":
            assert (repo / "params.yaml").read_bytes() == committed
            assert CLEAN not in status()  # the defaults: the full run, which has not run here
        elif cmd != "make repro":
            assert CLEAN in status(), f"after {cmd}: {status()}"
        if cmd == "dvc repro":  # the main job, right after a profile: the workspace is that experiment
            assert "Running stage" not in out and CLEAN in out, out[-2000:]
        if cmd.startswith("cxr predict"):
            assert re.search(r"\n234 images: \d+ called NORMAL, \d+ called PNEUMONIA", out), out[-2000:]
        if cmd == "dvc plots show":
            assert (repo / "dvc_plots" / "index.html").exists()
            assert "DVC failed to load some plots" not in out, out


def check_ui(repo: Path, env: dict[str, str], prelude: str) -> None:
    port = free_port()
    with subprocess.Popen(["bash", "-c", prelude + f"exec make ui PORT={port}"], cwd=repo, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
        try:
            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                        assert r.status == 200
                        break
                except OSError:
                    time.sleep(0.5)
            else:
                pytest.fail("make ui: no MLflow answered within 60 s")
        finally:
            os.killpg(proc.pid, 15)
        assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in (proc.stdout.read() if
                                                                                        proc.stdout else "")
