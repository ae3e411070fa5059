"""Serving the model as MLflow does: a pyfunc (pyfunc_model.py) that takes images (encoded bytes; base64 in JSON)
and returns, per image, P(pneumonia), the decision, the threshold and the class, through `read` and `score`,
which `cxr predict` uses too. It loads the card and weights logged with it (inference.load: tensors and a card,
never a pickle), and MLflow loads it from that code file ("models from code"), not from a pickled object.""" 

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
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

from cxr.data.dicom import DICOM_PACKAGES
from cxr.data.gray import MAX_PIXELS, decode, pixel_stats
from cxr.errors import CxrError
from cxr.inference import ModelCard
from cxr.params import ServeParams

log = logging.getLogger(__name__)
CODE = Path(__file__).with_name("pyfunc_model.py")
COLUMN = "image"
LOG_DECIMALS = 4  # the grey statistics in the log (cxr monitor rounds the reference's alike)
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
    grays, width, height, _, digest, _ = result
    return Decoded(grays[0], width, height, digest)


def limits(env: dict[str, str] | None = None) -> ServeParams:
    """The served model's limits: params.yaml's `serve` section as `cxr serve` hands it over (CXR_SERVE_<KEY>),
    else its defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServeParams):
        name = f"CXR_SERVE_{f.name.upper()}"
        if name in env and f.name != "port":
            kind = type(getattr(ServeParams, f.name))
            try:
                values[f.name] = kind(env[name])
            except ValueError:
                values[f.name] = math.nan  # refused below, with the other bad values
            if not (math.isfinite(values[f.name]) and values[f.name] > 0):
                raise CxrError(f"{name}={env[name]!r}: expected a positive, finite {kind.__name__}")
    return ServeParams(**values)


def limits_env(p: ServeParams) -> dict[str, str]:
    return {f"CXR_SERVE_{k.upper()}": str(v) for k, v in dataclasses.asdict(p).items() if k != "port"}


def setting(key: str) -> str:
    """Where a limit is set, for the messages that name it."""
    return f"serve.{key} in params.yaml; CXR_SERVE_{key.upper()} under plain `mlflow models serve`"


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
            got = ", ".join(map(str, model_input.columns))[:80]
            raise BadRequest(f"no '{COLUMN}' column (got {got}); send "
                             f'{{"dataframe_records": [{{"{COLUMN}": "<base64 of the file>"}}]}}')
        return model_input[COLUMN].tolist()
    return list(model_input) if isinstance(model_input, list | tuple | np.ndarray) else [model_input]


def position(i: int, n: int) -> str:
    return f"image {i}" + (f" of {n}" if n > 1 else "")


def checked(items: list[Any], lim: ServeParams) -> list[bytes]:
    """The encoded images of a request, within its limits; BadRequest naming the first one that is not."""
    if not items:
        raise BadRequest("no images in the request; send one or more base64-encoded image files")
    if len(items) > lim.max_images:
        raise BadRequest(f"{len(items)} images in one request, over the limit of {lim.max_images}; send them in "
                         f"several requests ({setting('max_images')})")
    out, total = [], 0
    for i, item in enumerate(items, 1):
        where = position(i, len(items))
        if isinstance(item, str):  # base64 text: from a caller in-process, or a column the server did not decode
            try:
                item = base64.b64decode(item, validate=True)
            except binascii.Error:
                raise BadRequest(f"{where} is text, not base64 of an image file") from None
        if not isinstance(item, bytes | bytearray):
            raise BadRequest(f"{where} is {type(item).__name__}, not the bytes of an image file")
        if len(item) > lim.max_image_mb * 2**20:
            raise BadRequest(f"{where} is {len(item) / 2**20:.1f} MB, over the {lim.max_image_mb:g} MB limit "
                             f"({setting('max_image_mb')})")
        total += len(item)
        if total > lim.max_request_mb * 2**20:
            raise BadRequest(f"the images of the request are over {lim.max_request_mb:g} MB from {where} on; send "
                             f"fewer per request ({setting('max_request_mb')})")
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
            raise BadRequest(f"{position(i, len(data))}: {e}; send the whole image file (JPEG, PNG, DICOM...), "
                             "base64-encoded") from None
    return out


class PredictionLog:
    """One JSON line per scored image, appended to <folder>/predictions-<UTC date>.jsonl: when, which model, the
    image's sha256, its size and grey statistics (gray.pixel_stats of what the model saw), and what the model
    said; no pixels, no file names or paths (they can carry patient names). A call is one write() to a file
    opened with O_APPEND, so lines from concurrent requests and processes on a local file system never interleave
    (not on NFS, whose appends are not atomic); a failed write warns once per process and the prediction goes on.
    No folder: nothing is written."""

    def __init__(self, folder: str | Path | None, identity: dict[str, str]) -> None:
        self.folder = Path(folder) if folder else None
        self.identity = identity
        self.warned = False

    @classmethod
    def from_env(cls, identity: dict[str, str]) -> PredictionLog:
        return cls(os.environ.get(LOG_ENV) or None, identity)

    def lines(self, images: list[Decoded], rows: list[dict[str, Any]], now: datetime) -> bytes:
        when = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out = []
        for i in range(0, len(images), 256):  # pixel_stats copies its batch in float32 several times: in pieces
            part = images[i:i + 256]
            stats = pixel_stats(np.stack([d.gray for d in part]))
            out += [json.dumps({"time": when, **self.identity, "sha256": d.sha256, "width": d.width, "height": d.height,
                                **{k: round(float(v[j]), LOG_DECIMALS) for k, v in stats.items()}, **row}) + "\n"
                    for j, (d, row) in enumerate(zip(part, rows[i:i + 256], strict=True))]
        return "".join(out).encode()

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
                    os.write(fd, b"\n")  # end the torn line, or the next request's first line is lost with it
                    raise OSError(f"wrote {written} of {len(data)} bytes (disk full?)")
            finally:
                os.close(fd)
        except OSError as e:
            if not self.warned:
                self.warned = True
                log.warning("prediction log %s: %s; predictions go on without their log lines (warned once)", path, e)


REGISTERED = re.compile(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))")  # models:/name@alias, models:/name/N


def registered_version(uri: str) -> tuple[str, str] | None:
    """(name, version) of a registered model URI, the alias resolved now; None for other URIs (runs:/, a
    logged model's models:/m-<id>). MlflowException where the registry has no such version."""
    m = REGISTERED.fullmatch(uri)
    if m is None:
        return None
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(m[1], m[2]) if m[2] else client.get_model_version(m[1], m[3])
    return m[1], str(version.version)


def identity(uri: str) -> dict[str, str]:
    """{model, version, model_id} of a model URI for the prediction log: the registered name and version where
    the URI names one, else "" for both; the alias is resolved once, so all three are one version's."""
    from mlflow.models import get_model_info

    found = registered_version(uri)
    name, number = found or ("", "")
    info = get_model_info(f"models:/{name}/{number}" if found else uri)
    return {"model": name, "version": number, "model_id": info.model_id or ""}


def log_model(weights: Path, hashes: Path, card: ModelCard, example: list[bytes]) -> Any:
    """Log the model of the active run: this pyfunc, its card and weights (inference.WEIGHTS) and the images it
    saw (inference.HASHES) as artifacts, the card as metadata, `example` (encoded images) as its input example."""
    # What the model's code needs beyond MLflow's own requirements (this project itself is not on PyPI); read
    # from the installed metadata: importing torchvision for its version costs 2 s
    pins = [f"{name}=={version(name).split('+')[0]}" for name in (
        "torch", "torchvision", "numpy", "pandas", "pillow", "tqdm", *DICOM_PACKAGES)]
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(CODE), artifacts={"weights": str(weights), "hashes": str(hashes)},
        signature=signature(card), input_example=pd.DataFrame({COLUMN: example}), metadata=card.to_dict(),
        pip_requirements=pins)
