"""Promotion: register the variant that is best on validation, and move the `champion` alias to it only if
it beats the current champion on the same test data by `promote.min_delta`."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient

from cxr import tracking
from cxr.data.store import classes, load_split
from cxr.errors import CxrError
from cxr.evaluation.metrics import task_scores
from cxr.io import atomic_path, read_report, write_json
from cxr.params import Params
from cxr.training.loop import probs_of

log = logging.getLogger(__name__)
ALIAS = "champion"


def candidate(p: Params, reports: Path) -> dict[str, Any]:
    """The variant with the best `promote.metric` on validation (never test), from its evaluation report."""
    best: dict[str, Any] | None = None
    for variant in p.models:
        ev = read_report(reports / variant / "evaluation.json", variant)
        if best is None or ev["val"][p.promote.metric] > best["val"]:
            best = {"variant": variant, "val": ev["val"][p.promote.metric], **ev["mlflow"]}
    if best is None:
        raise CxrError("params.yaml has no models to promote")
    return best


def load(uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model at an MLflow URI and the card evaluate stored with it (image_size, fit, classes, threshold)."""
    try:
        card = get_model_info(uri).metadata or {}
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as e:
        raise CxrError(f"cannot load {uri} from {mlflow.get_tracking_uri()} ({str(e).splitlines()[0]}); "
                       "run `cxr retrain` (or `dvc repro` then `cxr promote`) first, or check "
                       "MLFLOW_TRACKING_URI") from e
    if not {"image_size", "fit", "classes", "threshold"} <= set(card):
        raise CxrError(f"{uri} has no preprocessing card (image_size, fit, classes, threshold); it was not "
                       "logged by this project's evaluate stage")
    return model, card


def test_score(uri: str, data: Path, p: Params) -> tuple[float | None, str]:
    """`promote.metric` of the model at `uri` on the current test split, or None and why it cannot be scored
    on it (another image size, fit or label set than the data prepared now)."""
    model, card = load(uri)
    folder = data / str(card["image_size"])
    if not (folder / "test_labels.npy").exists():
        return None, f"its image size {card['image_size']} is not prepared (add it to gray.extra_sizes, re-run)"
    if card["fit"] != p.gray.fit or card["classes"] != classes(folder):
        return None, f"it was trained on other preprocessing ({card['fit']}, {'/'.join(card['classes'])})"
    test = load_split(folder, "test")
    probs = probs_of(model, test.images)
    score = task_scores(probs, torch.from_numpy(test.labels), card["classes"], card["threshold"])[p.promote.metric]
    if score is None:
        return None, f"the test split has one class, so {p.promote.metric} is undefined; set promote.metric: recall"
    return score, ""


def _register(client: MlflowClient, name: str, cand: dict[str, Any]) -> str:
    """The registry version holding the candidate's model: an existing one, else a new one."""
    try:
        for mv in client.search_model_versions(f"name='{name}'"):
            if mv.source == cand["model_uri"]:  # search results leave model_id empty
                return mv.version
        return mlflow.register_model(cand["model_uri"], name, tags={"variant": cand["variant"]}).version
    except MlflowException as e:
        raise CxrError(f"cannot register {cand['model_uri']} ({cand['variant']}) in {mlflow.get_tracking_uri()} "
                       f"({str(e).splitlines()[0]}); was the pipeline run against another MLflow store? "
                       "Re-run `dvc repro` with this MLFLOW_TRACKING_URI") from e


def _champion(client: MlflowClient, name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def promote(p: Params, reports: Path, data: Path, out: Path) -> dict[str, Any]:
    """Register the candidate, decide, move the alias if it wins; write the decision to `out` and as tags."""
    tracking.setup(p.mlflow.experiment)
    client, name, metric = MlflowClient(), p.mlflow.registered_model, p.promote.metric
    cand = candidate(p, reports)
    cand["version"] = _register(client, name, cand)
    cand["test"], why_not = test_score(f"models:/{name}/{cand['version']}", data, p)
    if cand["test"] is None:
        raise CxrError(f"cannot score the candidate {cand['variant']}: {why_not}")
    champ = _champion(client, name)
    before: dict[str, Any] | None = None
    if champ is None:
        promoted, reason = True, f"no {ALIAS} yet"
    elif champ.version == cand["version"]:
        promoted, reason = False, f"the candidate is already the {ALIAS} (version {champ.version})"
    else:
        score, why_not = test_score(f"models:/{name}@{ALIAS}", data, p)
        before = {"version": champ.version, "variant": champ.tags.get("variant", ""), "test": score}
        if score is None:
            promoted, reason = True, f"the {ALIAS} (version {champ.version}) cannot be scored on this test data: " \
                                     f"{why_not}"
        else:
            delta = cand["test"] - score
            promoted = delta > 0 and delta >= p.promote.min_delta
            verdict = "beats" if promoted else "does not beat"
            reason = (f"test {metric} {cand['test']:.4f} vs {score:.4f} (version {champ.version}): "
                      f"{delta:+.4f}, {verdict} min_delta {p.promote.min_delta}")
    if promoted:
        client.set_registered_model_alias(name, ALIAS, cand["version"])
    decision = "promoted" if promoted else "kept"
    record = {"decision": decision, "reason": reason, "registered_model": name, "metric": metric,
              "min_delta": p.promote.min_delta, "candidate": cand, "previous_champion": before,
              "champion_version": cand["version"] if promoted else champ.version,
              "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    tags = {"promotion.decision": decision, "promotion.reason": reason, f"val_{metric}": f"{cand['val']:.4f}",
            f"test_{metric}": f"{cand['test']:.4f}"}
    if before is not None or champ is None:  # a champion re-selected keeps the tags of its promotion
        for key, value in tags.items():
            client.set_model_version_tag(name, cand["version"], key, value)
            client.set_tag(cand["run_id"], key, value)
    with atomic_path(out) as tmp:
        write_json(tmp, record)
    log.info("%s %s version %s (%s): %s", decision, name, cand["version"], cand["variant"], reason)
    return record
