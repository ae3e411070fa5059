"""Beyond one process: data-parallel training under torchrun (gloo, 4 CPU processes) trains every image once
per epoch and gives the one-process result, and the train stage launches it itself. Run with `make test-scale`
(marker `scale`)."""

import base64
import configparser
import contextlib
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import psycopg2
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import ROOT, free_port, make_imagefolder, make_project, project_env, ran, sh, shared, tracking_at
from cxr import inference
from cxr.training import ddp

pytestmark = pytest.mark.scale


def run(out: Path, settings: dict, nproc: int, env: dict | None = None) -> dict:
    worker = [str(ROOT / "tests" / "ddp_fit.py"), str(out), json.dumps(settings), str(shared("chest_xray_224"))]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    res = subprocess.run([*(launcher if nproc > 1 else [sys.executable]), *worker], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env=os.environ | (env or {}))
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_same(one: dict, many: dict, world: int = 4) -> None:
    assert (one["world"], many["world"]) == (1, world)
    for a, b in zip(one["history"], many["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auroc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
    for (name, a), b in zip(one["weights"].items(), many["weights"].values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


NO_BATCHNORM = {"arch": "tinyvgg", "epochs": 3, "augment": True, "aug_noise": 0.05, "aug_gamma": 0.2,
                "class_weights": "balanced", "scheduler": "cosine", "ema": 0.9, "patience": 1}


@pytest.mark.parametrize("settings", [
    # no BatchNorm: 4 ranks at a quarter of the batch each are the one-process run, augmentation, class weights,
    # the schedule and the EMA included
    NO_BATCHNORM | {"batch_size": 16},
    # mixup: one weight and one pairing for the whole batch, partners taken from other ranks' rows; at batch 19
    # the 96 images end in a batch of one, so three ranks step on no image
    NO_BATCHNORM | {"batch_size": 19, "mixup": 0.4},
    # BatchNorm with sync_batchnorm: the statistics are the whole batch's, as in one process (dropout off: each
    # rank draws its own masks)
    {"arch": "cnn5", "model": {"filters": [8, 8, 16, 16, 16], "dropout": 0.0}, "epochs": 2, "batch_size": 16,
     "augment": True, "sync_batchnorm": True, "patience": 0},
], ids=["no-batchnorm", "mixup-batch-19", "sync-batchnorm"])
def test_four_ranks_at_a_quarter_of_the_batch_train_the_one_process_weights(tmp_path, settings):
    one = run(tmp_path / "one.pt", settings | {"devices": 1}, 1)
    four = run(tmp_path / "four.pt", settings | {"devices": 4}, 4)
    assert_same(one, four)


@pytest.mark.parametrize("batch", [16, 19])  # 19 divides neither the 96 images nor by 4: the last batch has one
def test_four_ranks_train_every_image_exactly_once_per_epoch(tmp_path, batch):
    """Counted on what reaches the model: each training step's rows matched to the images by their bytes, on
    every rank (no augmentation here, so that the bytes are the stored ones)."""
    settings = {"arch": "tinyvgg", "epochs": 2, "batch_size": batch, "augment": False, "patience": 0}
    one = run(tmp_path / "one.pt", settings | {"devices": 1}, 1)
    four = run(tmp_path / "four.pt", settings | {"devices": 4}, 4)
    for result in (one, four):
        assert result["trained"] == [[1] * 96] * 2
    assert_same(one, four)
    assert all(row["images_per_s"] > 0 for row in four["history"])


def test_a_state_from_one_process_resumes_on_four_ranks_and_ends_as_one_process_does(tmp_path):
    settings = {"arch": "tinyvgg", "epochs": 3, "batch_size": 16, "augment": True, "scheduler": "cosine",
                "patience": 0}
    state = tmp_path / "state.pt"
    one = run(tmp_path / "one.pt", settings, 1, {"SAVE_STATE": str(state)})  # and the state after epoch 1
    assert torch.load(state, weights_only=True)["epoch"] == 1
    resumed = run(tmp_path / "four.pt", settings | {"devices": 4}, 4, {"RESUME_STATE": str(state)})
    assert_same(one, resumed)


def test_the_train_stage_launches_torchrun_and_a_resnet_with_sync_batchnorm_trains_and_evaluates(tmp_path):
    """docs/team.md, "Several GPUs": `-S ++models.<v>.devices=2 -S ++models.<v>.sync_batchnorm=true`; the train
    stage starts torchrun with 2 ranks (gloo here); rank 0 alone logs the MLflow run and writes the model, a plain
    ResNet that evaluate and predict load."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    resnet = {"arch": "resnet18", "epochs": 2, "batch_size": 32}
    repo = make_project(tmp_path / "repo", {"linear": raw["models"]["linear"], "resnet": resnet},
                        gray={"image_size": 32, "extra_sizes": []})
    folder = make_imagefolder(tmp_path / "src", per_class=40)
    store = tmp_path / "mlflow.db"
    log = sh(repo, "dvc", "exp", "run", "-S", "++models.resnet.devices=2", "-S", "++models.resnet.sync_batchnorm=true",
             "-S", "data.source=imagefolder", "-S", f"data.path={folder}",
             env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert "launching 2 processes" in log and log.count("resnet epoch 2:") == 1  # rank 0 alone reports
    assert {"train@resnet", "evaluate@resnet"} <= ran(log)
    metrics = json.loads((repo / "reports/resnet/metrics.json").read_text())
    model, card = inference.load(repo / "models/resnet/model.pt")
    # The model rank 0 wrote is the one evaluated: it gives predictions.csv's probabilities again, and those
    # give the reported AUROC by scikit-learn's count.
    from sklearn.metrics import roc_auc_score

    from cxr.data.store import load_split

    test = load_split(repo / "data/split/32", "test")
    rows = list(csv.DictReader((repo / "reports/resnet/predictions.csv").open()))
    probs = torch.tensor([float(r["p_pneumonia"]) for r in rows])
    evaluation = json.loads((repo / "reports/resnet/evaluation.json").read_text())
    scored = dataclasses.replace(card, temperature=evaluation["calibration"]["temperature"])
    assert torch.allclose(scored.probs_of(model, test.images), probs, atol=1e-6)
    assert metrics["test"]["auroc"] == pytest.approx(roc_auc_score(test.labels, probs.numpy()), abs=1e-6)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm | ddp.SyncBatchNorm) for m in model.modules())
    with tracking_at(f"sqlite:///{store}"):
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.variant = 'resnet'")
    assert len(runs) == 1 and runs.iloc[0]["params.device"] == "cpu x2" and runs.iloc[0]["params.train.devices"] == "2"


@pytest.fixture(scope="module")
def team():
    """`make team-up` (docs/team.md "Team setup") on free ports, in a folder the postgres user can reach; yields the
    environment a clone sets (with the `cxr` login, as printed), the remote's path and the services' settings;
    `make team-down` after."""
    folder = Path(tempfile.mkdtemp(prefix="cxr-team-", dir="/var/tmp"))
    env = {"CXR_TEAM_DIR": str(folder), "CXR_TEAM_PG_PORT": str(free_port()), "CXR_TEAM_MLFLOW_PORT": str(free_port())}
    out = sh(ROOT, "make", "-s", "team-up", env=env)
    try:
        login = {"MLFLOW_TRACKING_URI": re.search(r"MLFLOW_TRACKING_URI=(\S+)", out)[1],
                 "MLFLOW_TRACKING_USERNAME": re.search(r"MLFLOW_TRACKING_USERNAME=(\S+)", out)[1],
                 "MLFLOW_TRACKING_PASSWORD": Path(re.search(r'\$\(cat (\S+)\)', out)[1]).read_text().strip()}
        yield login, re.search(r"dvc remote add --default team (\S+)", out)[1], env
    finally:
        sh(ROOT, "make", "-s", "team-down", env=env)
        shutil.rmtree(folder, ignore_errors=True)


def team_secrets(folder: Path) -> list[str]:
    """Every secret the team folder holds: the database's, the admin's and the cxr login's passwords."""
    auth = configparser.ConfigParser()
    auth.read(folder / "auth.ini")
    return [(folder / "pgpass").read_text().strip().rsplit(":", 1)[1], auth["mlflow"]["admin_password"],
            (folder / "cxr.password").read_text().strip()]


def ps_listing() -> str:
    """`ps -eww -o args`: every process's whole command line, as any local user can read them."""
    return subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout


def no_secret_in(listing: str, folder: Path) -> None:
    for secret in team_secrets(folder):
        assert secret not in listing


def wait_for_queue(repo: Path, env: dict, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status", env=env)
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(5)
    pytest.fail(f"dvc queue still busy after {timeout} s:\n{status}")


def test_a_team_shares_runs_models_and_data_through_the_server_and_the_remote(tmp_path, team, monkeypatch):
    """docs/team.md "Team setup": one person queues two experiments (`dvc queue start -j 2`) into the team's MLflow
    server, adopts one, pushes data and code, and promotes; a teammate's clone pulls, finds `dvc repro` a
    no-op, and predicts with the champion, all through the server and the remote."""
    env, remote, services = team
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this process's own MLflow calls too
        monkeypatch.setenv(key, env[key])
    origin = tmp_path / "origin.git"
    sh(tmp_path, "git", "init", "-q", "--bare", "--initial-branch=main", str(origin))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    a = make_project(tmp_path / "a", {v: raw["models"][v] for v in ("linear", "mlp")},
                     gray={"image_size": 32, "extra_sizes": []}, train={"epochs": 2},
                     promote={"min_test_images": 20, "min_test_patients": 10})  # 72 test images, 40 patients
    sh(a, "git", "remote", "add", "origin", str(origin))  # the team's repository
    folder = make_imagefolder(tmp_path / "src", per_class=30)
    sh(a, "dvc", "remote", "add", "--default", "team", remote)
    sh(a, "git", "commit", "-qm", "team remote", ".dvc/config")
    for seed in (1, 2):
        sh(a, "dvc", "exp", "run", "--queue", "-n", f"seed{seed}", "-S", "data.source=imagefolder",
           "-S", f"data.path={folder}", "-S", f"seed={seed}", env=env)
    # While the queue trains, every command line on the machine is read once a second, and none may hold a
    # secret. `dvc queue start` may return at once or only when its workers are done (they can inherit its
    # output): its output goes to a file, and the queue's status says when it is done, within a limit.
    listings: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1):
            listings.append(ps_listing())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with (tmp_path / "queue.log").open("w") as log:
            subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=a, env=project_env() | env, stdout=log,
                           stderr=log, stdin=subprocess.DEVNULL, timeout=900, check=True)
        status = wait_for_queue(a, env)
    finally:
        done.set()
        sampler.join()
        with contextlib.suppress(subprocess.TimeoutExpired):  # no worker outlives the test, whatever failed
            subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=a, env=project_env() | env, capture_output=True,
                           timeout=120)
    for listing in listings:
        no_secret_in(listing, Path(services["CXR_TEAM_DIR"]))
    training = [ls for ls in listings if "dvc exp exec-run" in ls and "mlflow server" in ls and "postgres" in ls]
    assert len(training) >= 10, f"{len(listings)} listings, {len(training)} while an experiment ran"
    print(f"ps -eww -o args while the queue trains:\n{training[len(training) // 2]}")  # `pytest -rP` shows it
    failed = re.findall(r"^\w+\s+(\S+)\s.*\bFailed\b", status, re.M)
    assert not failed, status + "".join(sh(a, "dvc", "queue", "logs", name)[-3000:] for name in failed)

    with tracking_at(env["MLFLOW_TRACKING_URI"]):
        runs = mlflow.search_runs(experiment_names=["chest-xray"], filter_string="tags.variant = 'mlp'")
        assert len(runs) == 2  # one per experiment, both in the server's PostgreSQL
        plots = mlflow.artifacts.download_artifacts(run_id=runs.iloc[0]["run_id"], artifact_path="plots",
                                                    dst_path=str(tmp_path / "dl"))
        assert (Path(plots) / "confusion_matrix.png").stat().st_size > 1000  # served by the server, not a path
    with psycopg2.connect(host="127.0.0.1", port=services["CXR_TEAM_PG_PORT"], user="mlflow", dbname="mlflow",
                          password=team_secrets(Path(services["CXR_TEAM_DIR"]))[0]) as db, db.cursor() as c:
        c.execute("SELECT count(*) FROM runs WHERE name = 'mlp'")
        assert c.fetchone()[0] == 2  # the server's store is the PostgreSQL database

    sh(a, "dvc", "exp", "apply", "seed1")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "seed 1")
    sh(a, "dvc", "push")
    sh(a, "git", "push", "-q", "origin", "HEAD:main")
    assert "promoted" in sh(a, "cxr", "promote", env=env)

    b = tmp_path / "b"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(b))
    sh(b, "dvc", "pull", env=env)
    assert not ran(sh(b, "dvc", "repro", env=env))  # everything came from the remote
    image = next(folder.glob("test/normal/*"))
    [row] = [json.loads(line) for line in sh(b, "cxr", "predict", "--json", str(image), env=env).splitlines()
             if line.startswith("{")]
    # the champion's probability for this test image, as its evaluation wrote it
    evaluated = [float(r["p_pneumonia"]) for f in b.glob("reports/*/predictions.csv")
                 for r in csv.DictReader(f.open()) if r["name"].endswith(image.name)]
    assert any(abs(row["p_pneumonia"] - p) < 1e-5 for p in evaluated), (row, evaluated)


def test_the_team_server_wants_a_login_and_its_files_are_its_owner_s(team, monkeypatch):
    """Anonymous requests get 401; a wrong password (or none) cannot move @champion; no other local user can
    read anything in the team folder (checked as `nobody`), and the postgres user only its data folder."""
    login, _, services = team
    url, folder = login["MLFLOW_TRACKING_URI"], Path(services["CXR_TEAM_DIR"])
    for path in ("/", "/api/2.0/mlflow/experiments/search?max_results=1", "/api/2.0/mlflow-artifacts/artifacts"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path, timeout=10)
        assert e.value.code == 401, path
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, login[key])
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("login-check"))
    client.log_text(run.info.run_id, "nothing", "x/a.txt")
    client.create_registered_model("login-check")
    for _ in range(2):
        client.create_model_version("login-check", f"{run.info.artifact_uri}/x", run_id=run.info.run_id)
    client.set_registered_model_alias("login-check", "champion", "1")
    for password in ("wrong", None):
        if password is None:
            monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
            monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        with pytest.raises(MlflowException, match="401|nauthorized"):
            MlflowClient(url).set_registered_model_alias("login-check", "champion", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login["MLFLOW_TRACKING_PASSWORD"])
    assert MlflowClient(url).get_model_version_by_alias("login-check", "champion").version == "1"

    # `team up` again: a no-op while the services run; with the password file removed, a new password
    (folder / "cxr.password").unlink()
    sh(ROOT, "make", "-s", "team-up", env=services)
    new = (folder / "cxr.password").read_text().strip()
    for password, code in ((login["MLFLOW_TRACKING_PASSWORD"], 401), (new, 200)):
        token = base64.b64encode(f"cxr:{password}".encode()).decode()
        req = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as res:
                assert res.status == code
        except urllib.error.HTTPError as e:
            assert e.code == code

    if os.geteuid() != 0:
        pytest.skip("reading the folder as other users needs root (runuser)")
    paths = [str(folder)] + [os.path.join(d, f) for d, dirs, files in os.walk(folder) for f in dirs + files]
    probe = ("import os, sys\nfor p in sys.stdin.read().split('\\0'):\n    try:\n"
             "        os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(1)\n        print(p)\n"
             "    except OSError:\n        pass\n")

    def readable_by(user: str) -> list[str]:
        # the system's Python: other users may not reach this checkout's virtual environment
        python = shutil.which("python3", path="/usr/bin:/bin")
        runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")  # sbin: not on a bare PATH
        return subprocess.run([runuser, "-u", user, "--", python, "-c", probe], input="\0".join(paths),
                              capture_output=True, text=True, check=True).stdout.split()

    assert readable_by("nobody") == []
    assert len(paths) > 50 and all(p.startswith(str(folder / "pg")) for p in readable_by("postgres"))
    assert any(p.endswith("PG_VERSION") for p in readable_by("postgres"))  # the probe does read what it may
    no_secret_in(ps_listing(), folder)
