"""`cxr serve`: a registered version checked before anything of it runs (MLflow would load it as this project's
model from code; its code file is the installed project's; its weights are tensors), then MLflow's own scoring
server on the files that were checked, behind `Guard` (a body limit as the body arrives; every 4xx in one line),
with params.yaml's `serve` limits. `served` starts a server for the tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from cxr.errors import CxrError
from cxr.inference import WEIGHTS, load
from cxr.params import ServeParams
from cxr.serving import CODE, IDENTITY_ENV, LOG_ENV, limits, limits_env, registered_version

# What the MLmodel's python_function flavor may say. `data` (where MLflow looks for the model's files: another
# MLmodel and code file inside it), `code` (folders put on sys.path) and `python_model` (a pickle) are refused.
FLAVOR_KEYS = {"loader_module", "model_code_path", "artifacts", "python_version", "env", "streamable",
               "cloudpickle_version", "config"}


@dataclass(frozen=True)
class Verified:
    name: str
    version: str
    path: Path  # the version's files, downloaded: what is served is what was checked
    variant: str


def registered(uri: str) -> tuple[str, str]:
    """(name, version) of a registered model URI, or a one-line CxrError."""
    try:
        found = registered_version(uri)
    except MlflowException as e:
        raise CxrError(f"{uri}: no such registered version ({e.message.splitlines()[0][:160]}); run `cxr promote` "
                       "for a champion, or name another with -m") from None
    if found is None:
        raise CxrError(f"{uri}: `cxr serve` serves a registered version; give models:/<name>@<alias> or "
                       "models:/<name>/<version>")
    return found


def flavor_problem(local: Path) -> str:
    """Why MLflow would not load the model at `local` as this project's model from code, its own code file and
    weights; "" where it would."""
    try:
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        pf = mlmodel["flavors"]["python_function"]
        weights = pf["artifacts"]["weights"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        return f"its MLmodel does not describe this project's model ({type(e).__name__}: {str(e)[:80]})"
    extra = ", ".join(sorted(k for k, v in pf.items() if k not in FLAVOR_KEYS and v is not None))  # `code: null`
    if pf.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or extra:
        return (f"MLflow would load it with {pf.get('loader_module')}{f' and its {extra}' if extra else ''}, not as "
                "this project's model from code")
    code = local / Path(str(pf.get("model_code_path") or "?")).name
    if not code.is_file() or code.read_bytes() != CODE.read_bytes():
        return (f"its {code.name} is not the installed project's {CODE.name}, and serving would run it; retrain and "
                "promote with this version of the project (`dvc repro`, `cxr promote`)")
    if weights != f"artifacts/{WEIGHTS}":
        return f"its weights are {weights}, not artifacts/{WEIGHTS}"
    return ""


def verify(uri: str, dst: Path) -> Verified:
    """The version `uri` names, downloaded into `dst` and checked (flavor_problem, then its weights loaded as
    tensors and a card) before anything of it runs; a one-line CxrError naming it otherwise."""
    name, version = registered(uri)
    where = f"models:/{name}/{version} ({uri})"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    if problem := flavor_problem(local):
        raise CxrError(f"{where} is refused, and nothing of it was run: {problem}")
    try:
        _, card = load(local / "artifacts" / WEIGHTS, where)  # weights only: a pickle is refused (CardError)
    except CxrError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's errors for a file that is no checkpoint at all
        raise CxrError(f"{where} is refused, and nothing of it was run: its weights file cannot be read as tensors "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    return Verified(name, version, local, card.variant)


class Guard:
    """ASGI middleware in front of MLflow's scoring server. A request body over `limit` bytes is answered 413: at
    once where the client waits for leave to send it (`Expect: 100-continue`), else once it is read and dropped
    in pieces; the server never holds or parses it (MLflow's reads any body whole). Every JSON error MLflow
    answers with a 4xx is cut to one line: its own (bad JSON, a wrong schema) append the request itself, or a
    stack trace."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = int(headers[b"content-length"]) if headers.get(b"content-length", b"").isdigit() else 0
        if declared > self.limit and headers.get(b"expect", b"").lower() == b"100-continue":
            return await self._too_large(send, declared)  # before the client sends the body (curl, over 1 MB)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
            if size <= self.limit:
                chunks.append(message.get("body", b""))
            elif not more or size > 8 * self.limit:  # read and dropped: a client that sends on gets its answer
                return await self._too_large(send, max(size, declared))  # at the end (past 8x, a reset instead)
        body, replayed = b"".join(chunks), False
        chunks.clear()  # or every body is held twice while the request runs

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, _one_line(send))

    async def _too_large(self, send: Any, size: int) -> None:
        await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", (
            f"the request body is {size / 2**20:.1f} MB, over the {self.limit / 2**20:g} MB limit; send fewer images "
            "per request (serve.max_request_mb in params.yaml)"))


def _one_line(send: Any) -> Any:
    """`send`, with the message of a 4xx JSON error cut to one line: the reason after MLflow's last "Error:" where
    it wraps one (`Failed to predict data '<the request>'. Error: <reason>`), else the first line. Other answers
    pass as they are."""
    start: dict[str, Any] = {}
    parts: list[bytes] = []

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            start.update(message)
            return None
        if not start or message["type"] != "http.response.body":
            return await send(message)
        parts.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        try:
            error = json.loads(b"".join(parts))
            text = " ".join(str(error["message"]).rsplit("Error:", 1)[-1].split("\n", 1)[0].split()) or "bad request"
        except (ValueError, KeyError, TypeError):  # not MLflow's JSON error: as it was
            await send(start)
            return await send({"type": "http.response.body", "body": b"".join(parts)})
        return await _answer(send, start["status"], str(error.get("error_code") or "BAD_REQUEST"), text)

    return wrapped


async def _answer(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def app() -> Any:
    """The ASGI app `cxr serve` runs (uvicorn --factory): MLflow's scoring server for the model its environment
    names (as `mlflow models serve` starts it), behind Guard."""
    from mlflow.pyfunc.scoring_server import app as scoring  # loads the model

    return Guard(scoring.app, int(limits().max_request_mb * 2**20))


def serve(uri: str, p: ServeParams, host: str, port: int, workers: int = 1) -> int:
    """`cxr serve`: verify the version, then run MLflow's scoring server on its checked files with the limits of
    `p` and the version's name for the prediction log, until stopped (SIGTERM and SIGINT are passed on to it);
    the server's exit code."""
    from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH

    with tempfile.TemporaryDirectory(prefix="cxr-serve-") as tmp:
        v = verify(uri, Path(tmp))
        # glibc gives each thread that allocates its own arena, which keeps what a big decode freed: 2 hold the
        # peak of tests/test_serving.py's concurrent test about 0.1 GB lower
        env = {"MALLOC_ARENA_MAX": "2"} | os.environ | limits_env(p) | {
            _SERVER_MODEL_PATH: str(v.path), IDENTITY_ENV["model"]: v.name, IDENTITY_ENV["version"]: v.version}
        logging_to = os.environ.get(LOG_ENV) or f"off (set {LOG_ENV} to a folder)"
        print(f"serving models:/{v.name}/{v.version} ({v.variant}) on http://{host}:{port}: POST images to "
              f"/invocations (docs/serving.md); prediction log: {logging_to}", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "cxr.jobs.serve:app", "--host", host,
                                 "--port", str(port), "--workers", str(workers)], env=env)
        passed = {s: signal.signal(s, lambda n, _f: proc.send_signal(n)) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return proc.wait()
        finally:
            for s, handler in passed.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def served(uri: str, env: dict[str, str] | None = None, timeout: float = 120.0, cxr_serve: bool = False,
           cwd: Path | None = None) -> Iterator[str]:
    """`mlflow models serve -m uri --env-manager local` (or `cxr serve -m uri`, run in `cwd` for its params.yaml)
    on a free port of 127.0.0.1, in this environment, in a process group of its own; yields its URL once /ping
    answers, and stops the whole group after. For the load test and the tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cxr", "serve", "-m", uri, "-p", str(port)] if cxr_serve else \
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)]
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn, not another
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            yield _ready(f"http://127.0.0.1:{port}", proc, log, timeout, uri)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _ready(url: str, proc: subprocess.Popen, log: Any, timeout: float, uri: str) -> str:
    """`url` once its /ping answers; RuntimeError with the server's last lines if it exits or takes too long."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=1):
                return url
        except OSError:
            if proc.poll() is not None or time.monotonic() - start > timeout:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"the server for {uri} did not answer on {url}/ping: " + " | ".join(tail)) from None
            time.sleep(0.25)
