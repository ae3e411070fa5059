"""Three replays through `cxr serve` (a real server on 127.0.0.1, each writing its own prediction log), then
`cxr monitor` on each log against the champion's validation set (data/split:val):

1. validation itself, resampled into --windows windows of --window images (no alert is expected in at least
   95% of them: the monitor's thresholds are set for a 5% false-alarm rate per window);
2. Kaggle's official test folder (another acquisition: an alert is expected, naming what moved);
3. validation brightened by --brighten grey levels (an alert on the image statistics is expected).

    make quick DATA=../shared/data/chest_xray_224 && .venv/bin/cxr promote   # a champion, and data/split
    python bench/monitor_replay.py
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from cxr import params, serving, tracking
from cxr.data.store import load_split, size_dir, sizes_in
from cxr.jobs import monitor
from cxr.jobs.serve import registered, served

ROOT = Path(__file__).resolve().parents[1]


def post(url: str, images: list[bytes], per: int = 32) -> list[dict]:
    """Every image, `per` to a request: the server's answers; any answer but 200 stops the replay."""
    out = []
    for i in range(0, len(images), per):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(b).decode()] for b in images[i:i + per]]}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            assert r.status == 200, r.read()
            out += json.loads(r.read())["predictions"]
    return out


def truth_and_estimate(answers: list[dict], labels: np.ndarray) -> str:
    """Sensitivity and specificity of the answers against the labels, and CBPE's estimate from P(pneumonia)
    alone over the whole replay."""
    p = np.array([a["p_pneumonia"] for a in answers])
    called = np.array([a["class"] == 1 for a in answers])
    sens, spec = called[labels == 1].mean(), (~called[labels == 0]).mean()
    est_sens, est_spec = (float(x) for x in monitor.cbpe(p, called))
    return (f"Over all {len(p)} images: sensitivity {sens:.3f}, specificity {spec:.3f} (labels); CBPE, without "
            f"them: {est_sens:.3f}, {est_spec:.3f}.")


def brighten(data: bytes, by: int) -> bytes:
    """The image `by` grey levels brighter (clipped), as a lossless PNG."""
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(gray + by, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def replays(p: params.Params, args: argparse.Namespace) -> dict[str, tuple[list[bytes], np.ndarray]]:
    """name: (encoded images, labels), each in a seeded random order (the folders and the split list one class
    after the other: in that order the windows would see the prevalence swing)."""
    data, rng = Path("data/split"), np.random.default_rng(args.seed)
    split = load_split(size_dir(data, sizes_in(data)[0]), "val")
    val, labels = [(Path(p.data.path) / m["name"]).read_bytes() for m in split.meta], np.asarray(split.labels)
    resampled = rng.integers(0, len(val), args.windows * args.window)
    test = sorted(f for f in args.test.rglob("*") if f.suffix.lower() in {".jpeg", ".jpg", ".png"})
    test_labels = np.array([int(f.parent.name.upper() == "PNEUMONIA") for f in test])
    t, v = rng.permutation(len(test)), rng.permutation(len(val))
    return {"validation, resampled": ([val[i] for i in resampled], labels[resampled]),
            "Kaggle's official test": ([test[i].read_bytes() for i in t], test_labels[t]),
            f"validation, +{args.brighten} grey levels": ([brighten(val[i], args.brighten) for i in v], labels[v])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="default: the champion")
    parser.add_argument("--test", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray_224" / "test")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--windows", type=int, default=40, help="windows of resampled validation images")
    parser.add_argument("--brighten", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("monitor-replay"))
    args = parser.parse_args()
    p = params.load()
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri(ROOT))
    name, version = registered(args.model or tracking.model_uri(p.mlflow.registered_model))
    uri = f"models:/{name}/{version}"
    for i, (what, (images, labels)) in enumerate(replays(p, args).items()):
        with tempfile.TemporaryDirectory() as logs:
            with served(uri, dict(os.environ) | {serving.LOG_ENV: logs}, cxr_serve=True, cwd=Path.cwd()) as url:
                answers = post(url, images)
            out = subprocess.run([sys.executable, "-m", "cxr", "monitor", logs, "--model", uri, "--window",
                                  str(args.window), "--out", str(args.out / f"replay{i + 1}")],
                                 capture_output=True, text=True)
        print(f"## {i + 1}. {what}: {len(images)} images through `cxr serve` -> `cxr monitor` exit {out.returncode}\n")
        print(out.stdout + out.stderr + truth_and_estimate(answers, labels) + "\n", flush=True)


if __name__ == "__main__":
    main()
