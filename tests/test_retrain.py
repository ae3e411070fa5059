"""`cxr retrain` end to end, as the scheduled workflow runs it, on real images: a first run promotes, a
deliberately worse one keeps the champion, a better one promotes; then `cxr predict` with the champion."""

import csv
import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import make_imagefolder, make_project, sh, tracking_at

MIN_DELTA = 0.005


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_imagefolder(tmp_path_factory.mktemp("src"), per_class=60)
    return folder, make_project(tmp_path_factory.mktemp("retrain") / "repo", {},
                        data={"source": "imagefolder", "path": str(folder)},
                        gray={"image_size": 32, "extra_sizes": []}, promote={"min_delta": MIN_DELTA})


def retrain(repo, variant: dict) -> tuple[dict, str]:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"] = {"cand": variant}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "cxr", "retrain", "--summary", "summary.md")
    return json.loads((repo / "promotion.json").read_text()), (repo / "summary.md").read_text()


def test_retrain_promotes_first_keeps_a_worse_model_promotes_a_better_one(project):
    folder, repo = project
    first, text = retrain(repo, {"arch": "tinyvgg", "epochs": 1, "lr": 1.0e-4})
    assert first["decision"] == "promoted" and first["reason"] == "no champion yet"
    assert first["champion_version"] == first["candidate"]["version"] and first["previous_champion"] is None
    assert "## Retraining: promoted a new champion" in text and "| cand |" in text

    worse, text = retrain(repo, {"arch": "linear", "epochs": 1, "lr": 1.0e-7})  # barely moves from its init
    assert worse["decision"] == "kept" and worse["champion_version"] == first["candidate"]["version"]
    before = worse["previous_champion"]
    assert before["version"] == first["candidate"]["version"]
    assert before["test"] == pytest.approx(first["candidate"]["test"], abs=1e-6)  # same test data, same score
    assert worse["candidate"]["test"] < before["test"] + MIN_DELTA and "does not beat" in worse["reason"]
    assert text.count("## Retraining:") == 2 and "kept the champion" in text

    better, _ = retrain(repo, {"arch": "mlp", "epochs": 2, "lr": 1.0e-3})
    assert better["decision"] == "promoted", better["reason"]
    assert better["candidate"]["test"] - better["previous_champion"]["test"] >= MIN_DELTA
    assert better["previous_champion"]["version"] == first["candidate"]["version"]

    again = sh(repo, "cxr", "promote")  # nothing retrained: the champion is the candidate again
    assert "kept: the candidate is already the champion" in again

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    name = better["registered_model"]
    assert client.get_model_version_by_alias(name, "champion").version == better["candidate"]["version"]
    for record in (first, worse, better):
        version = client.get_model_version(name, record["candidate"]["version"])
        assert version.tags["promotion.decision"] == record["decision"]  # the re-selection left them alone
        assert version.tags["promotion.reason"] == record["reason"]
        run = client.get_run(record["candidate"]["run_id"])
        assert run.data.tags["promotion.decision"] == record["decision"]

    # `cxr predict` applies the champion with the pipeline's own preprocessing: the same probability as
    # the champion gives the image's array in the prepared test split.
    meta = list(csv.DictReader((repo / "data" / "split" / "32" / "test_meta.csv").open()))
    images = np.load(repo / "data" / "split" / "32" / "test_images.npy")
    paths = [folder / meta[i]["name"] for i in (0, 1)]  # names are relative to the source folder
    out = sh(repo, "cxr", "predict", "--json", *map(str, paths))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    with tracking_at(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"):
        champion = mlflow.pytorch.load_model(f"models:/{name}@champion")
    p = torch.sigmoid(champion(torch.from_numpy(images[:2, None].astype(np.float32) / 255))).squeeze(1)
    for row, prob, path in zip(rows, p.tolist(), paths, strict=True):
        assert row["path"] == str(path) and row["class"] in ("NORMAL", "PNEUMONIA")
        expected = prob if row["class"] == "PNEUMONIA" else 1 - prob
        assert row["probability"] == pytest.approx(expected, abs=1e-3)

    bad = repo / "corrupt.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = sh(repo, "cxr", "predict", str(paths[0]), str(bad), "missing.png", ok=False)
    assert str(paths[0]) in out and "missing.png: no such file" in out and "corrupt.jpeg: corrupt or truncated" in out
    assert out.count("error:") == 1  # one line for all of them
