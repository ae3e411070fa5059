"""`cxr serve` under fire: concurrent clients mixing real images with decompression bombs, bad bodies and
oversized requests (a real server on 127.0.0.1); the versions it refuses before running anything of them; and
the prediction log it writes beside `cxr predict`'s."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import free_port, project_env, shared
from cxr import inference, serving
from cxr.inference import ModelCard
from cxr.jobs import predict
from cxr.jobs.serve import served
from dicoms import KINDS, dataset, encode

NAME = "serve-test"
LIMITS = {"max_images": 16, "max_request_mb": 6.0, "max_megapixels": 50.0, "decode_slots": 2}
MEMORY_BOUND_GB = 2.0  # the server's peak resident memory, whatever the clients send (measured: see the test)


def _log_version(tmp: Path, code: Path | None = None, weights: Path | None = None) -> str:
    """A registered version of a linear model at 64 px (untrained: serving needs no skill, only the model's own
    numbers), logged with this project's code file or `code`, and its weights file or `weights`; its URI."""
    card = ModelCard("tiny", "linear", 64, ("NORMAL", "PNEUMONIA"), "stretch", 64, "none", 0.5, 0.25)
    torch.manual_seed(0)
    tmp.mkdir(parents=True, exist_ok=True)
    (hashes := tmp / inference.HASHES).write_text("split,sha256,name\n")
    with mlflow.start_run():
        if code is weights is None:
            inference.save(weights := tmp / inference.WEIGHTS, card.build().eval(), card)
            example = io.BytesIO()
            Image.fromarray(np.full((64, 64), 100, np.uint8)).save(example, "PNG")
            info = serving.log_model(weights, hashes, card, [example.getvalue()])
        else:  # as log_model, without the input example, which MLflow would check by running the model
            if weights is None:
                inference.save(weights := tmp / inference.WEIGHTS, card.build().eval(), card)
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code or serving.CODE),
                                           artifacts={"weights": str(weights), "hashes": str(hashes)},
                                           pip_requirements=["torch"])
    version = mlflow.register_model(info.model_uri, NAME).version
    return f"models:/{NAME}/{version}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A folder with a params.yaml (the registered model's name, tighter limits) and a good version's URI."""
    tmp = tmp_path_factory.mktemp("serving")
    (tmp / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"registered_model": NAME}, "serve": LIMITS}))
    return tmp, _log_version(tmp)


def _png(size: tuple[int, int], mode: str, value: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, value).save(out, "PNG", compress_level=1)
    return out.getvalue()


def _png_header(width: int, height: int, bits: int) -> bytes:
    """A gray PNG that says it is width x height at `bits` bits, with one row of data: what a bomb needs to be
    refused (the header), made in microseconds instead of compressing 100 megapixels of zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = zlib.compress(b"\0" * (1 + width * bits // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)) + \
        chunk(b"IDAT", row) + chunk(b"IEND", b"")


def _body(images: list[bytes]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode()] for b in images]}}).encode()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text or b"{}")
        except ValueError:
            return e.code, {"message": text.decode(errors="replace")}


def _rss_gb(port: int, field: str = "VmHWM") -> float:
    """The peak (VmHWM) or present (VmRSS) resident memory of the uvicorn process `cxr serve` started on `port`."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cxr.jobs.serve:app" in cmd and str(port).encode() in cmd:
            status = (proc / "status").read_text()
            return int(next(x for x in status.splitlines() if x.startswith(field)).split()[1]) / 2**20
    raise AssertionError(f"no server process on port {port}")


def _hostile(good: bytes, small: bytes) -> dict[str, tuple[bytes, str, str]]:
    """name: (body, content type, what the one-line answer must say)."""
    text = "application/json"
    return {
        "100-megapixel bomb": (_body([_png_header(10_000, 10_000, 8)]), text, "100 megapixels, over the limit of 50"),
        "16-bit bomb": (_body([_png_header(9_400, 9_400, 16)]), text, "88 megapixels, over the limit of 50"),
        "text": (b"pneumonia? please look at this", "text/plain", ""),
        "not JSON": (b'{"dataframe_split": [', text, ""),
        "truncated image": (_body([good[: len(good) // 3]]), text, "corrupt or truncated"),
        "empty body": (b"", text, ""),
        "empty image": (_body([b""]), text, "empty file"),
        "no image column": (b'{"dataframe_split": {"columns": ["x"], "data": [["aGk="]]}}', text, "missing inputs"),
        "oversized batch": (_body([small] * (LIMITS["max_images"] + 1)), text, "over the limit of 16"),
        "oversized body": (b'{"dataframe_split": "' + b"A" * int(7 * 2**20) + b'"}', text, "over the 6 MB limit"),
        "multi-frame DICOM": (_body([encode(dataset(np.zeros((2, 64, 64), np.uint8), NumberOfFrames=2))]), text,
                              "a multi-frame DICOM (2 frames)"),
    }


def test_eight_clients_mixing_bombs_bad_bodies_and_real_images_get_4xx_lines_and_exact_scores(project, tmp_path):
    """8 clients at once, each sending real full-resolution X-rays (one also as a DICOM; 4 of them also a legal
    but heavy 16-bit image of 49 megapixels, which keeps both decode slots busy) and every hostile request, in
    its own order: every hostile one gets a 4xx and one line, every good one a 200 with the probability `cxr
    predict` gives the same file (the DICOM: its JPEG's, within 1e-3), the server's peak memory stays under
    MEMORY_BOUND_GB, and the prediction log holds exactly one well-formed line per image scored."""
    folder, uri = project
    files = sorted(shared("chest_xray_fullres_sample").rglob("*.jpeg"))[::20][:10]
    expected = {r["image"]: r for r in predict.predict(uri, files)[0]}
    heavy = _png((7_000, 7_000), "I;16", 40_000)
    small = next((shared("chest_xray_224") / "test" / "NORMAL").glob("*.jpeg")).read_bytes()
    hostile = _hostile(files[0].read_bytes(), small)
    dicom = KINDS["JPEG 2000 Lossless"](np.asarray(Image.open(files[1]).convert("L")))  # 12-bit, 2.2 MB
    good = [(str(f), _body([f.read_bytes()])) for f in files] + [("heavy", _body([heavy])), ("dicom", _body([dicom]))]
    model, card = inference.load_logged(uri)
    expected["heavy"] = serving.score(model, card, [serving.read(heavy, card).gray])[0]
    expected["dicom"] = expected[str(files[1])]  # the same X-ray: the same answer, within 1e-3 (below)

    def client(seed: int) -> list[tuple[str, int, dict]]:
        work = [(name, body, text) for name, (body, text, _) in hostile.items()] + \
               [(name, body, "application/json") for name, body in good if name != "heavy" or seed < 4]
        random.Random(seed).shuffle(work)
        return [(name, *_post(url, body, text)) for name, body, text in work]

    log = tmp_path / "log"
    env = project_env() | {serving.LOG_ENV: str(log), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    with served(uri, env, cxr_serve=True, cwd=folder) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = _rss_gb(port, "VmRSS")
        with ThreadPoolExecutor(8) as pool:
            answers = [a for batch in pool.map(client, range(8)) for a in batch]
        peak = _rss_gb(port)
        assert _post(url, good[0][1])[0] == 200  # still answering
    for name, status, answer in answers:
        if name in hostile:
            assert 400 <= status < 500, (name, status, answer)
            message = answer.get("message", "")
            assert message and "\n" not in message.strip() and hostile[name][2] in message, (name, message)
        else:
            assert status == 200, (name, answer)
            got = answer["predictions"][0]
            assert got["p_pneumonia"] == pytest.approx(expected[name]["p_pneumonia"], abs=1e-3 if name == "dicom"
                                                       else 1e-6)
            assert got["decision"] == expected[name]["decision"]
    assert peak < MEMORY_BOUND_GB, f"peak resident memory {peak:.2f} GB"
    print(f"server resident memory: {idle:.2f} GB idle, {peak:.2f} GB at its peak; {len(answers)} requests")
    lines = [json.loads(x) for f in log.glob("*.jsonl") for x in f.read_text().splitlines()]
    assert len(lines) == 8 * (len(files) + 1) + 4 + 1  # every image scored, once, whole, and no refused one
    assert {x["model"] for x in lines} == {NAME} and {x["version"] for x in lines} == {uri.rsplit("/", 1)[1]}


class Payload(torch.nn.Module):
    """A module whose unpickling runs a command: what a tampered or foreign weights file can hold."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _redirected_version(tmp: Path, good_uri: str, evil: Path) -> str:
    """A copy of the good version `good_uri` (this project's code file and weights where a check looks) whose
    MLmodel's `data:` key sends MLflow's loader into a folder holding another MLmodel and `evil` as its code file."""
    (tmp / "files").mkdir(parents=True)
    good = Path(mlflow.artifacts.download_artifacts(artifact_uri=good_uri, dst_path=str(tmp / "files")))
    mlmodel = yaml.safe_load((good / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["data"] = "evil"
    (good / "evil").mkdir()
    (good / "evil" / "MLmodel").write_text((good / "MLmodel").read_text())
    (good / "evil" / serving.CODE.name).write_text(evil.read_text())
    (good / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(good), "model")
    return f"models:/{NAME}/{mlflow.register_model(f'runs:/{run.info.run_id}/model', NAME).version}"


def test_cxr_serve_refuses_a_version_whose_code_differs_or_whose_weights_are_code_and_runs_nothing(project, tmp_path):
    """Three registered versions that would run code where served: one whose code file is not the project's (it
    writes a marker when imported), one whose weights file is a pickle that writes it, one whose MLmodel points
    MLflow's loader (`data:`) to a folder with that code file. `cxr serve` refuses each in one line naming the
    version, and the marker never appears; importing the code, or unpickling the weights
    the old way, does write it (the test can fail)."""
    folder, good_uri = project
    marker = tmp_path / "ran"
    (evil := tmp_path / "code" / serving.CODE.name).parent.mkdir()
    evil.write_text(serving.CODE.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    code_uri = _log_version(tmp_path / "a", code=evil)
    assert marker.exists()  # MLflow runs a model's code file to log it
    marker.unlink()
    card = ModelCard("tiny", "linear", 64, ("NORMAL", "PNEUMONIA"), "stretch", 64, "none", 0.5, 0.25)
    torch.save({"card": card.to_dict(), "state_dict": Payload(marker)}, pickled := tmp_path / inference.WEIGHTS)
    pickle_uri = _log_version(tmp_path / "b", weights=pickled)
    redirect_uri = _redirected_version(tmp_path / "c", good_uri, evil)
    env = project_env() | {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    for uri, why in ((code_uri, "its pyfunc_model.py is not the installed project's"),
                     (pickle_uri, "its weights file holds more than tensors"),
                     (redirect_uri, "MLflow would load it with mlflow.pyfunc.loaders.code_model and its data")):
        out = subprocess.run([sys.executable, "-m", "cxr", "serve", "-m", uri, "-p", str(free_port())], cwd=folder,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and out.stderr.startswith(f"error: {uri} ({uri}) is refused"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and why in out.stderr and not marker.exists()
    torch.load(pickled, weights_only=False)
    assert marker.exists()


def test_log_lines_are_cxr_predict_json_and_a_log_that_cannot_be_written_warns_once(project, tmp_path, caplog):
    """`cxr predict --json` and its log lines say the same of each image (the log adds when, which model, the
    file's sha256, size and grey statistics, and never its name); 8 threads appending at once lose and mix no
    line; a folder that cannot be written warns once and the predictions go on."""
    folder, uri = project
    files = sorted((shared("chest_xray_224") / "test" / "PNEUMONIA").glob("*.jpeg"))[:6]
    env = project_env() | {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], serving.LOG_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cxr", "predict", "--json", "--model", uri, *map(str, files)],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    lines = [json.loads(x) for x in next(tmp_path.glob("predictions-*.jsonl")).read_text().splitlines()]
    assert len(lines) == len(rows) == len(files)
    for f, row, line in zip(files, rows, lines, strict=True):
        assert {k: line[k] for k in row if k != "image"} == {k: v for k, v in row.items() if k != "image"}
        assert line["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and line["version"] == "1"
        assert f.stem not in json.dumps(line) and (line["width"], line["height"]) == Image.open(f).size
    model, card = inference.load_logged(uri)
    images = [serving.read(f, card) for f in files]
    scored = serving.score(model, card, [d.gray for d in images])
    log = serving.PredictionLog(tmp_path / "threads", {"model": NAME})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: log.write(images, scored), range(400)))
    written = (tmp_path / "threads").glob("*.jsonl")
    assert sorted(json.loads(x)["sha256"] for f in written for x in f.read_text().splitlines()) == \
        sorted(d.sha256 for d in images for _ in range(400))
    (blocked := tmp_path / "blocked").write_text("a file where the log's folder should be")
    log = serving.PredictionLog(blocked / "log", {"model": NAME})
    for _ in range(3):
        log.write(images, scored)
    warned = [r.getMessage() for r in caplog.records if "prediction log" in r.getMessage()]
    assert len(warned) == 1 and "predictions go on without their log lines" in warned[0]
