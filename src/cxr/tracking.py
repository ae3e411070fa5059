"""MLflow plumbing: the store under the project root, one run per variant, tags that link back to DVC."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml

from cxr.errors import CxrError

log = logging.getLogger(__name__)


def project_root() -> Path:
    # DVC sets DVC_ROOT for every stage it runs, also in `dvc exp run --temp/--queue` workspaces.
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlruns' / 'mlflow.db'}"


def setup(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the store, create the experiment if needed, return its id. A SQLite store keeps
    artifacts beside its database (a server decides for itself)."""
    uri = tracking_uri(root)
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
            return exp.experiment_id if exp else mlflow.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException as e:
        raise CxrError(f"cannot use the MLflow store at {store_and_error(e)}; check "
                       "MLFLOW_TRACKING_URI or that the server is up (see README)") from e


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


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the tracking server does not answer.
    Credentials in the URI (user:pass@host) are sent as basic auth, as MLflow's client sends them."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
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


def run_tags(variant: str, root: Path) -> dict[str, str]:
    tags = {"variant": variant, "dvc_stage": os.environ.get("DVC_STAGE", ""),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
    try:
        tags["mlflow.source.git.commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                                                          capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    lock = root / "dvc.lock"
    if lock.exists():  # the data hash: the split stage's output as DVC recorded it
        outs = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("split", {}).get("outs", [])
        tags["data_md5"] = next((o.get("md5", "") for o in outs if o["path"] == "data/split"), "")
    return {k: v for k, v in tags.items() if v}
