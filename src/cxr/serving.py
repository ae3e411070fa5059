"""Serving the model as MLflow does: a pyfunc (pyfunc_model.py) that takes images (encoded bytes; base64 in JSON)
and returns, per image, P(pneumonia), the decision, the threshold and the class, through `read` and `score`,
which `cxr predict` uses too. It loads the card and weights logged with it (inference.load: tensors and a card,
never a pickle), and MLflow loads it from that code file ("models from code"), not from a pickled object.""" 

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from cxr.data.gray import MAX_PIXELS, decode, pixel_stats
from cxr.errors import CxrError
from cxr.inference import ModelCard
from cxr.params import ServeParams

log = logging.getLogger(__name__)
CODE = Path(__file__).with_name("pyfunc_model.py")
COLUMN = "image"
LOG_ENV = "CXR_PREDICTION_LOG"  # a folder: the served model and `cxr predict` append a line per image there
IDENTITY_ENV = {"model": "CXR_SERVED_MODEL", "version": "CXR_SERVED_VERSION"}  # set by `cxr serve`


@dataclass(frozen=True)
class Decoded:
    """An image as the model sees it (uint8, the card's size), and what the prediction log keeps of the file."""

    gray: np.ndarray
    width: int
    height: int
    sha256: str


def read(source: Path | bytes, card: ModelCard, max_pixels: int = MAX_PIXELS) -> Decoded:
    """One image (a file, or its encoded bytes as a server receives them) as the grayscale stage stored it for
    this model; OSError with the reason when it cannot."""
    if isinstance(source, Path) and not source.is_file():
        raise OSError("no such file" if not source.exists() else "not a file")
    src = str(source) if isinstance(source, Path) else source
    result = decode(("", src), [card.image_size], card.fit, card.draft, card.equalize, max_pixels)  # the stage's
    if isinstance(result, str):
        raise OSError(result)
    grays, width, height, _, digest = result
    return Decoded(grays[0], width, height, digest)


def limits(env: dict[str, str] | None = None) -> ServeParams:
    """The served model's limits: params.yaml's `serve` section as `cxr serve` hands it over (CXR_SERVE_<KEY>),
    else its defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServeParams):
        name = f"CXR_SERVE_{f.name.upper()}"
        if name in env:
            kind = type(getattr(ServeParams, f.name))
            try:
                values[f.name] = kind(env[name])
            except ValueError:
                values[f.name] = 0
            if values[f.name] <= 0:
                raise CxrError(f"{name}={env[name]!r}: expected a positive {kind.__name__}")
    return ServeParams(**values)


def limits_env(p: ServeParams) -> dict[str, str]:
    return {f"CXR_SERVE_{k.upper()}": str(v) for k, v in dataclasses.asdict(p).items() if k != "port"}


def score(model: Any, card: ModelCard, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per image, as evaluate scored it (TTA views, temperature, threshold): binary {p_pneumonia, decision,
    threshold, class} (P(PNEUMONIA) unrounded, float32, against the threshold chosen on validation), otherwise
    {p_<class>..., decision, class}. `cxr predict` and the served model both score through here."""
    if not images:
        return []
    probs = card.probs_of(model, np.stack(images))
    rows: list[dict[str, Any]] = []
    for pr, k in zip(probs.tolist(), card.predicted(probs).tolist(), strict=True):
        row: dict[str, Any] = ({"p_pneumonia": pr} if card.binary else
                               {f"p_{c.lower()}": v for c, v in zip(card.classes, pr, strict=True)})
        row["decision"] = card.classes[k]
        if card.binary:
            row["threshold"] = card.threshold
        rows.append(row | {"class": k})
    return rows


class BadRequest(MlflowException):
    """A request the model refuses: HTTP 400 with this one line. MLflow's scoring server puts the whole request
    before an MlflowException's message (`Failed to predict data '<data>'`): the first message is kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "message" or "message" not in self.__dict__:
            super().__setattr__(name, value)


def signature(card: ModelCard) -> ModelSignature:
    """Images in (binary: base64 in JSON); score()'s columns out."""
    scores = ([ColSpec(DataType.float, "p_pneumonia")] if card.binary else
              [ColSpec(DataType.float, f"p_{c.lower()}") for c in card.classes])
    out = [*scores, ColSpec(DataType.string, "decision"), *([ColSpec(DataType.float, "threshold")] if card.binary
                                                              else []), ColSpec(DataType.long, "class")]
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, COLUMN)]), outputs=Schema(out))


def images_of(model_input: Any) -> list[Any]:
    """The images of a request: a DataFrame's `image` column (what the server builds from JSON), or a list."""
    if isinstance(model_input, pd.DataFrame):
        if COLUMN not in model_input.columns:
            raise BadRequest(f"no '{COLUMN}' column (got {', '.join(map(str, model_input.columns))}); send "
                             f'{{"dataframe_records": [{{"{COLUMN}": "<base64 of the file>"}}]}}')
        return model_input[COLUMN].tolist()
    return list(model_input) if isinstance(model_input, list | tuple | np.ndarray) else [model_input]


def checked(items: list[Any], lim: ServeParams) -> list[bytes]:
    """The encoded images of a request, within its limits; BadRequest naming the first one that is not."""
    if not items:
        raise BadRequest("no images in the request; send one or more base64-encoded image files")
    if len(items) > lim.max_images:
        raise BadRequest(f"{len(items)} images in one request, over the limit of {lim.max_images}; send them in "
                         "several requests (CXR_SERVE_MAX_IMAGES where the server starts)")
    out, total = [], 0
    for i, item in enumerate(items, 1):
        where = f"image {i}" + (f" of {len(items)}" if len(items) > 1 else "")
        if isinstance(item, str):  # base64 text: from a caller in-process, or a column the server did not decode
            try:
                item = base64.b64decode(item, validate=True)
            except binascii.Error:
                raise BadRequest(f"{where} is text, not base64 of an image file") from None
        if not isinstance(item, bytes | bytearray):
            raise BadRequest(f"{where} is {type(item).__name__}, not the bytes of an image file")
        if len(item) > lim.max_image_mb * 2**20:
            raise BadRequest(f"{where} is {len(item) / 2**20:.1f} MB, over the {lim.max_image_mb:g} MB limit "
                             "(CXR_SERVE_MAX_IMAGE_MB where the server starts)")
        total += len(item)
        if total > lim.max_request_mb * 2**20:
            raise BadRequest(f"the images of the request are over {lim.max_request_mb:g} MB from {where} on; send "
                             "fewer per request (CXR_SERVE_MAX_REQUEST_MB where the server starts)")
        out.append(bytes(item))
    return out


def decoded(items: list[Any], card: ModelCard, lim: ServeParams, slots: threading.Semaphore) -> list[Decoded]:
    """Each encoded image as the grayscale stage stored it, at most `slots` decoding at once in this process (the
    server scores requests in threads: this bounds its memory); BadRequest naming the first one that is not."""
    data = checked(items, lim)
    out = []
    for i, item in enumerate(data, 1):
        try:
            with slots:
                out.append(read(item, card, int(lim.max_megapixels * 1e6)))
        except OSError as e:
            where = f"image {i}" + (f" of {len(data)}" if len(data) > 1 else "")
            raise BadRequest(f"{where}: {e}; send the whole JPEG or PNG file, base64-encoded") from None
    return out


class PredictionLog:
    """One JSON line per scored image, appended to <folder>/predictions-<UTC date>.jsonl: when, which model, the
    image's sha256, its size and grey statistics (gray.pixel_stats of what the model saw), and what the model
    said; no pixels, no file names or paths (they can carry patient names). A call is one write() to a file
    opened with O_APPEND, so lines from concurrent requests and processes never interleave; a failed write
    warns once and the prediction goes on. No folder: nothing is written."""

    def __init__(self, folder: str | Path | None, identity: dict[str, str]) -> None:
        self.folder = Path(folder) if folder else None
        self.identity = identity
        self.warned = False

    @classmethod
    def from_env(cls, identity: dict[str, str]) -> PredictionLog:
        return cls(os.environ.get(LOG_ENV) or None, identity)

    def lines(self, images: list[Decoded], rows: list[dict[str, Any]], now: datetime) -> bytes:
        stats = pixel_stats(np.stack([d.gray for d in images]))
        when = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return "".join(json.dumps({"time": when, **self.identity, "sha256": d.sha256, "width": d.width,
                                   "height": d.height, **{k: round(float(v[j]), 4) for k, v in stats.items()},
                                   **row}) + "\n" for j, (d, row) in enumerate(zip(images, rows, strict=True))).encode()

    def write(self, images: list[Decoded], rows: list[dict[str, Any]]) -> None:
        if self.folder is None or not rows:
            return
        now = datetime.now(UTC)
        path = self.folder / f"predictions-{now:%Y-%m-%d}.jsonl"
        data = self.lines(images, rows, now)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                if (written := os.write(fd, data)) != len(data):
                    raise OSError(f"wrote {written} of {len(data)} bytes (disk full?)")
            finally:
                os.close(fd)
        except OSError as e:
            if not self.warned:
                self.warned = True
                log.warning("prediction log %s: %s; predictions go on without their log lines (warned once)", path, e)


def identity(uri: str) -> dict[str, str]:
    """{model, version, model_id} of a model URI for the prediction log: the registered name and version
    where the URI names one (`models:/m@alias`, `models:/m/3`), else "" for both."""
    import re

    from mlflow.models import get_model_info

    client = mlflow.MlflowClient()
    info = get_model_info(uri)
    m = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))", uri)
    version = "" if m is None else \
        (client.get_model_version_by_alias(m[1], m[2]) if m[2] else client.get_model_version(m[1], m[3])).version
    return {"model": m[1] if m else "", "version": str(version), "model_id": info.model_id or ""}


def log_model(weights: Path, hashes: Path, card: ModelCard, example: list[bytes]) -> Any:
    """Log the model of the active run: this pyfunc, its card and weights (inference.WEIGHTS) and the images it
    saw (inference.HASHES) as artifacts, the card as metadata, `example` (encoded images) as its input example."""
    # What the model's code needs beyond MLflow's own requirements (this project itself is not on PyPI); read
    # from the installed metadata: importing torchvision for its version costs 2 s
    pins = [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "numpy", "pandas",
                                                                    "pillow", "tqdm")]
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(CODE), artifacts={"weights": str(weights), "hashes": str(hashes)},
        signature=signature(card), input_example=pd.DataFrame({COLUMN: example}), metadata=card.to_dict(),
        pip_requirements=pins)


@dataclass(frozen=True)
class Verified:
    name: str
    version: str
    path: Path  # the version's files, downloaded: what is served is what was checked
    variant: str


def registered(uri: str) -> tuple[str, str]:
    """(name, version) of a registered model URI: models:/name@alias or models:/name/N."""
    import re

    m = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))", uri)
    if m is None:
        raise CxrError(f"{uri}: `cxr serve` serves a registered version; give models:/<name>@<alias> or "
                       "models:/<name>/<version>")
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(m[1], m[2]) if m[2] else client.get_model_version(m[1], m[3])
    except MlflowException as e:
        raise CxrError(f"{uri}: no such registered version ({e.message.splitlines()[0][:160]}); run `cxr promote` "
                       "for a champion, or name another with -m") from None
    return m[1], str(version.version)


def verify(uri: str, dst: Path) -> Verified:
    """The version `uri` names, downloaded into `dst` and checked before anything of it runs: MLflow loads it as
    this project's model from code, with no code paths of its own; its code file is byte-identical to the
    installed project's pyfunc_model.py; its weights load as tensors and a card. CxrError naming it otherwise."""
    from cxr.inference import WEIGHTS, load

    name, version = registered(uri)
    where = f"models:/{name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(dst)))
    flavors = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors") or {}
    pf = flavors.get("python_function") or {}
    code = local / Path(pf.get("model_code_path") or "?").name
    refused = f"{where} ({uri}) is refused, and nothing of it was run:"
    if pf.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or pf.get("code"):
        raise CxrError(f"{refused} MLflow would load it with {pf.get('loader_module')}"
                       f"{' and its own code paths' if pf.get('code') else ''}, not as this project's model from code")
    if not code.is_file() or code.read_bytes() != CODE.read_bytes():
        raise CxrError(f"{refused} its {code.name} is not the installed project's {CODE.name}, and serving would "
                       "run it; retrain and promote with this version of the project (`dvc repro`, `cxr promote`)")
    _, card = load(local / "artifacts" / WEIGHTS, f"{where} ({uri})")  # weights only: a pickle is refused
    return Verified(name, version, local, card.variant)


class Guard:
    """ASGI middleware in front of MLflow's scoring server. A request body over `limit` bytes is answered 413 as it
    arrives (by its Content-Length, or by counting a chunked one), read and dropped in pieces, so the server never
    holds or parses it (MLflow's reads any body whole). Every 4xx answer is cut to one line: MLflow's own (bad
    JSON, a wrong schema) append the request itself, and a stack trace where it has one."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size <= self.limit and not (declared.isdigit() and int(declared) > self.limit):
                chunks.append(message.get("body", b""))
            elif not more or size > 8 * self.limit:  # dropped so far; past this, stop reading a client that sends on
                size = max(size, int(declared) if declared.isdigit() else 0)
                return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", (
                    f"the request body is {size / 2**20:.1f} MB, over the {self.limit / 2**20:g} MB limit; send "
                    "fewer images per request (serve.max_request_mb in params.yaml)"))
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, _one_line(send))


def _one_line(send: Any) -> Any:
    """`send`, with a 4xx answer's message cut to its first line (and no stack trace)."""
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
            text = str(error.get("message") or "").strip().splitlines()[0].strip()
        except (ValueError, AttributeError, IndexError):
            text, error = b"".join(parts).decode(errors="replace").strip().split("\n")[0], {}
        return await _answer(send, start["status"], error.get("error_code") or "BAD_REQUEST", text)

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


def serve(uri: str, p: ServeParams, host: str, port: int) -> int:
    """`cxr serve`: verify the version, then run MLflow's scoring server on its checked files with the limits of
    `p` and the version's name for the prediction log, until stopped; the server's exit code."""
    from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH

    with tempfile.TemporaryDirectory(prefix="cxr-serve-") as tmp:
        v = verify(uri, Path(tmp))
        # glibc gives each thread that allocates its own arena, which keeps what a big decode freed: 2 hold the
        # peak of the test in tests/test_serving.py about 0.15 GB lower
        env = {"MALLOC_ARENA_MAX": "2"} | os.environ | limits_env(p) | {
            _SERVER_MODEL_PATH: str(v.path), IDENTITY_ENV["model"]: v.name, IDENTITY_ENV["version"]: v.version}
        logging_to = os.environ.get(LOG_ENV) or f"off (set {LOG_ENV} to a folder)"
        print(f"serving models:/{v.name}/{v.version} ({v.variant}) on http://{host}:{port}: POST images to "
              f"/invocations (docs/serving.md); prediction log: {logging_to}", flush=True)
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "cxr.serving:app", "--host", host, "--port", str(port)]
        try:
            return subprocess.call(cmd, env=env)
        except KeyboardInterrupt:  # the server had it too, and has stopped
            return 130


@contextlib.contextmanager
def served(uri: str, env: dict[str, str] | None = None, timeout: float = 120.0, cxr_serve: bool = False,
           cwd: Path | None = None) -> Iterator[str]:
    """`mlflow models serve -m uri --env-manager local` (or `cxr serve -m uri`, run in `cwd` for its params.yaml)
    on a free port of 127.0.0.1, in this environment; yields its URL once /ping answers, and stops it after. For
    the load test and the tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cxr", "serve", "-m", uri, "-p", str(port)] if cxr_serve else \
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)]
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn, not another
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            url, start = f"http://127.0.0.1:{port}", time.monotonic()
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() - start > timeout:
                        log.seek(0)
                        tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                        raise RuntimeError(f"mlflow models serve -m {uri} did not answer on {url}/ping: "
                                           + " | ".join(tail)) from None
                    time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
