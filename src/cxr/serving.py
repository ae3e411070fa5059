"""Serving the model as MLflow does: a pyfunc (pyfunc_model.py) that takes images (encoded bytes; base64 in JSON)
and returns, per image, P(pneumonia), the decision, the threshold and the class, through `read` and `score`,
which `cxr predict` uses too. It loads the card and weights logged with it (inference.load: tensors and a card,
never a pickle), and MLflow loads it from that code file ("models from code"), not from a pickled object.""" 

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema

from cxr.data.gray import decode
from cxr.inference import ModelCard

CODE = Path(__file__).with_name("pyfunc_model.py")
COLUMN = "image"
# An upload over this is refused before decoding: a chest X-ray JPEG or PNG is rarely over 10 MB, even at full
# resolution. CXR_SERVE_MAX_MB changes it where the server starts.
MAX_MB = 20.0


def read(source: Path | bytes, card: ModelCard) -> np.ndarray:
    """One image (a file, or its encoded bytes as a server receives them) as the grayscale stage stored it for
    this model; OSError with the reason when it cannot."""
    if isinstance(source, Path) and not source.is_file():
        raise OSError("no such file" if not source.exists() else "not a file")
    src = str(source) if isinstance(source, Path) else source
    result = decode(("", src), [card.image_size], card.fit, card.draft, card.equalize)  # the stage's own decode
    if isinstance(result, str):
        raise OSError(result)
    return result[0][0]


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


def decoded(items: list[Any], card: ModelCard, max_mb: float) -> list[np.ndarray]:
    """Each encoded image as the grayscale stage stored it; BadRequest naming the first one that is not."""
    if not items:
        raise BadRequest("no images in the request; send one or more base64-encoded image files")
    out = []
    for i, item in enumerate(items, 1):
        where = f"image {i}" + (f" of {len(items)}" if len(items) > 1 else "")
        if isinstance(item, str):  # base64 text: from a caller in-process, or a column the server did not decode
            try:
                item = base64.b64decode(item, validate=True)
            except binascii.Error:
                raise BadRequest(f"{where} is text, not base64 of an image file") from None
        if not isinstance(item, bytes | bytearray):
            raise BadRequest(f"{where} is {type(item).__name__}, not the bytes of an image file")
        if len(item) > max_mb * 2**20:
            raise BadRequest(f"{where} is {len(item) / 2**20:.1f} MB, over the {max_mb:g} MB limit "
                             "(CXR_SERVE_MAX_MB where the server starts)")
        try:
            out.append(read(bytes(item), card))
        except OSError as e:
            raise BadRequest(f"{where}: {e}; send the whole JPEG or PNG file, base64-encoded") from None
    return out


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


@contextlib.contextmanager
def served(uri: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow models serve -m uri --env-manager local` on a free port of 127.0.0.1 (this environment's MLflow
    and cxr); yields its URL once /ping answers, and stops it after. For the load test and the tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn, not another
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
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
