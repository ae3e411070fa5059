"""MLflow plumbing: the store under the project root, one run per variant, tags that link back to DVC."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml

from cxr.errors import CxrError

log = logging.getLogger(__name__)
NOTE = "mlflow.note.content"  # a run's or experiment's description in the UI (markdown)
# Marks the experiment as model training, not GenAI. (The 3.17 UI still picks its mode from its own
# `workflowType` URL parameter or remembered mode: every link the project writes carries it, see ui_link.)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   NOTE: "Chest X-ray pneumonia classifiers (NORMAL vs PNEUMONIA), one run per variant and DVC "
                         "pipeline run, nested under a parent run named after the DVC experiment whose description "
                         "is the leaderboard. Test scores are at the threshold chosen on validation."}


CHAMPION = "champion"  # the registry alias `cxr predict` loads and `cxr promote` moves


def model_uri(name: str, version: str | int | None = None) -> str:
    """The registered model `name`'s URI: of its `version`, or of its champion (MLflow resolves the alias each
    time it loads, so a job that must read one model throughout pins a version)."""
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{CHAMPION}"


def shift_tag(verdict: str) -> dict[str, str]:
    """A shift report's verdict as a run's or model version's tag, cut to MLflow's limit on a tag's value."""
    return {"shift.verdict": verdict[:5000]}


def project_root() -> Path:
    # DVC sets DVC_ROOT for every stage it runs, also in `dvc exp run --temp/--queue` workspaces.
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlruns' / 'mlflow.db'}"


def setup(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the store, create the experiment if needed, return its id. A SQLite store keeps
    artifacts beside its database (a server decides for itself)."""
    uri = tracking_uri(root)
    if not sys.stderr.isatty():  # MLflow's artifact bars, piped to a log, are lines of carriage returns
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    location, lock = None, contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        location = (db.parent / "artifacts").resolve().as_uri()
        # Stages run side by side (`dvc queue start -j 2`) would otherwise both create or migrate a new
        # database's tables, and one fails ("duplicate column name"); likewise for the experiment.
        lock = _locked(db.parent / ".setup.lock")
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    try:
        with lock:
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    return mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
                except mlflow.exceptions.MlflowException:
                    # Against a server no file lock serialises queued experiments: another one made it first.
                    exp = mlflow.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
            for key, value in EXPERIMENT_TAGS.items():  # an experiment made before these tags existed
                if key not in exp.tags:
                    mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
    except mlflow.exceptions.MlflowException as e:
        raise CxrError(f"cannot use the MLflow store at {store_and_error(e)}; check "
                       "MLFLOW_TRACKING_URI or that the server is up (see docs/mlflow.md)") from e


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def redact(text: str) -> str:
    """`text` (a URI, or an error message that quotes one) with any URI password replaced by ***."""
    return re.sub(r"//([^/:@\s]*):[^@/\s]*@", r"//\1:***@", text)


def store_and_error(e: BaseException) -> str:
    """'<store> (<first line of e>)' for a message, passwords redacted."""
    return f"{redact(mlflow.get_tracking_uri())} ({redact(str(e).splitlines()[0])})"


def _without_credentials(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")


# Where `make ui` serves the local store's UI.
LOCAL_UI = "http://127.0.0.1:5000/"


def ui_link(route: str, base: str = "") -> str:
    """A page of the MLflow UI, e.g. `experiments/1/runs/<id>`, `compare-runs?runs=[...]` or
    `models/<name>/versions/<v>`, in "Model training" mode. MLflow 3's UI opens runs, comparisons and models in
    GenAI mode (or the mode it last remembered) unless the query of the hash route itself, after the route,
    says `workflowType=machine_learning`; a query before the `#` is not read. `base` "": the relative link a
    description inside the UI needs; ui_base(): the whole address, for a link printed to a terminal."""
    return f"{base}#/{route}{'&' if '?' in route else '?'}workflowType=machine_learning"


def ui_base() -> str:
    """The UI of the current store: the tracking server's address (without credentials), else `make ui`'s."""
    uri = mlflow.get_tracking_uri()
    return _without_credentials(uri) + "/" if uri.startswith(("http://", "https://")) else LOCAL_UI


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the tracking server does not answer.
    Credentials in the URI (user:pass@host) are sent as basic auth, as MLflow's client sends them."""
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(_without_credentials(uri) + "/health")
    if parts.username is not None:
        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:"
                                 f"{urllib.parse.unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered: a proxy or auth in front of it may refuse /health, and MLflow will say more
    except (OSError, ValueError) as e:
        raise CxrError(f"the MLflow server at {redact(uri)} does not answer ({getattr(e, 'reason', e)}); start it, "
                       "or unset MLFLOW_TRACKING_URI to use the local store mlruns/") from e


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def pipeline_run_name() -> str:
    """The parent run's name: the DVC experiment's (`dvc exp run -n`, or the name DVC made up), else what ran."""
    return os.environ.get("DVC_EXP_NAME") or "dvc repro"


def data_digest(root: Path) -> str:
    """The split stage's output as DVC recorded it in dvc.lock (empty outside a DVC run)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return ""
    outs = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("split", {}).get("outs", [])
    return next((o.get("md5", "") for o in outs if o["path"] == "data/split"), "")


def log_dataset(source: str, name: str, digest: str, context: str) -> None:
    """The data a run used, as an MLflow dataset input (the UI's Dataset column): where it came from, and a
    digest (DVC's hash of the split) that changes whenever the data does."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if source.startswith("https://"):
        src = HTTPDatasetSource(source)
    else:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local one
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(source)
    dataset = MetaDataset(src, name=name, digest=digest.removesuffix(".dir")[:12] or None)
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException as e:
        # Two runs logging one dataset at once race in the server's get-or-create (PostgreSQL: a duplicate
        # "dataset_pk"); once the other's row is there, logging again links this run to it.
        if "dataset_pk" not in str(e):
            raise
        mlflow.log_input(dataset, context=context)


def run_tags(variant: str, root: Path) -> dict[str, str]:
    tags = {"variant": variant, "dvc_stage": os.environ.get("DVC_STAGE", ""),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
    try:
        tags["mlflow.source.git.commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                                                          capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    tags["data_md5"] = data_digest(root)  # the data hash: the split stage's output as DVC recorded it
    return {k: v for k, v in tags.items() if v}
