"""Evaluate one variant on test: metrics, curves, per-image predictions and figures to files and to its MLflow
run, plus the model with its card (threshold chosen on validation). `score_variant` computes (no MLflow);
`evaluate_variant` writes and logs what it returns."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from PIL import Image

from cxr import bootstrap, explain, inference, serving, tracking
from cxr.data.split import SUBTYPES, series_of, subtype
from cxr.data.store import Split, images_digest, load_split, size_dir
from cxr.errors import CxrError
from cxr.io import atomic_paths, write_csv, write_json
from cxr.metrics import (
    OPERATING_SPECIFICITY,
    auroc,
    average_precision,
    choose_threshold,
    class_ece,
    confusion,
    curves,
    ece,
    fit_temperature,
    multiclass_scores,
    reliability,
    scores,
    threshold_at_specificity,
    threshold_range,
)
from cxr.params import Params
from cxr.plots import confusion_figure, curve_figure, plt, reliability_figure
from cxr.task import predicted
from cxr.wording import SCORE_NAMES, SHOWN, score_text

log = logging.getLogger(__name__)


# Thresholds within one image of the best validation score spanning this much: validation cannot place it
# (cpu-best's seeds: 0.12-0.21 wide, their thresholds 0.82-0.94, their test accuracy 0.877-0.915).
WIDE_RANGE = 0.1


def by_series(called: torch.Tensor, y: torch.Tensor, data: Split, patterns: list[str],
              w: torch.Tensor) -> dict[str, Any]:
    """Per series the file names give (split.series): its images and patients, and its specificity (share of
    its normal images called normal) and sensitivity (share of its pneumonia images called pneumonia), where
    it holds such images, each with its 95% interval over the resamples `w`."""
    found = [series_of(m["name"], patterns)[0] for m in data.meta]
    out: dict[str, Any] = {}
    for name in sorted(set(found) - {""}):
        here = torch.tensor([f == name for f in found])
        row: dict[str, Any] = {"images": int(here.sum()),
                               "patients": len({m["patient_id"] for m, h in zip(data.meta, here.tolist(), strict=True)
                                                if h and m["patient_id"]})}
        for key, mask, right in (("specificity", here & (y == 0), ~called), ("recall", here & (y != 0), called)):
            if mask.any():
                row |= {key: float(right[mask].double().mean()), f"{key}_images": int(mask.sum()),
                        f"{key}_ci95": bootstrap.share_interval(right[mask], w[:, mask])}
        out[name] = row
    return out


def _split_figures(probs: torch.Tensor, y: torch.Tensor, data: Split, names: list[str], threshold: float,
                   w: torch.Tensor, series: list[str]) -> dict[str, Any]:
    """One split's scores (at `threshold`; argmax with more classes), their 95% intervals over the resamples
    `w`, the share of each pneumonia subtype called pneumonia, where the file names say the subtype, and the
    figures per series (by_series)."""
    point = scores(probs, y, threshold) if len(names) == 2 else multiclass_scores(probs, y, names)
    out: dict[str, Any] = {"scores": point, "ci95": bootstrap.intervals(probs, y, threshold, w)}
    called = predicted(probs, threshold) != 0  # PNEUMONIA, of any cause (class 0 is NORMAL)
    out["series"] = by_series(called, y, data, series, w)
    cause = [subtype(m["name"]) for m in data.meta]
    out["subtypes"] = {}
    for s in SUBTYPES:
        mask = torch.tensor([c == s for c in cause]) & (y != 0)
        if mask.any():
            out["subtypes"][s] = {"images": int(mask.sum()), "recall": float(called[mask].double().mean()),
                                  "recall_ci95": bootstrap.share_interval(called[mask], w[:, mask])}
    return out


METHOD = ("percentile bootstrap: clusters (a patient's images; an image without a patient id alone) drawn with "
          "replacement within strata of class, pneumonia subtype and series (split.series)")


def _metrics(p_val: torch.Tensor, val: Split, p_test: torch.Tensor, test: Split, names: list[str],
             rule: str | float, seed: int, series: Sequence[str] = ()) -> dict[str, Any]:
    """Scores of val and test with their intervals and subtypes; binary: the threshold chosen on val, the range
    of equally good ones, and operating points at fixed val specificities, for a user who must pick one."""
    y_val, y_test = torch.from_numpy(val.labels), torch.from_numpy(test.labels)
    d_val, d_test = bootstrap.design(y_val, val.meta, series), bootstrap.design(y_test, test.meta, series)
    w_val, w_test = (bootstrap.resample_counts(d, bootstrap.RESAMPLES, seed) for d in (d_val, d_test))
    binary = len(names) == 2
    threshold = choose_threshold(p_val, y_val, rule) if binary else 0.5
    out: dict[str, Any] = {"classes": names}
    if binary:
        out |= {"threshold": threshold, "threshold_rule": str(rule)}
        best, near = threshold_range(p_val, y_val, rule), threshold_range(p_val, y_val, rule, slack=1)
        if best is not None and near is not None:
            out["threshold_range"] = {"best": list(best), "low": near[0], "high": near[1], "width": near[1] - near[0],
                                      "wide": near[1] - near[0] >= WIDE_RANGE}
    for split, data, probs, y, d, w in (("test", test, p_test, y_test, d_test, w_test),
                                        ("val", val, p_val, y_val, d_val, w_val)):
        fig = _split_figures(probs, y, data, names, threshold, w, list(series))
        # every interval of this split (scores, subtypes, operating points) is over these resamples
        out |= {split: fig["scores"], f"{split}_ci95": fig["ci95"],
                f"{split}_intervals": d.describe(bootstrap.RESAMPLES, seed)}
        for part in ("subtypes", "series"):
            if fig[part]:
                out.setdefault(part, {})[split] = fig[part]
    out["intervals"] = {"method": METHOD, "resamples": bootstrap.RESAMPLES, "seed": seed, "level": 0.95,
                        "unit": {"test": d_test.unit, "val": d_val.unit}}
    if binary:
        out["test_threshold_0_5"] = scores(p_test, y_test, 0.5)
        out["operating_points"] = []
        for target in OPERATING_SPECIFICITY:
            t = threshold_at_specificity(p_val, y_val, target)
            v, te, ci = (scores(p_val, y_val, t), scores(p_test, y_test, t),
                         bootstrap.intervals(p_test, y_test, t, w_test))
            out["operating_points"].append({
                "val_specificity_at_least": target, "threshold": t,
                "val": {k: v[k] for k in ("recall", "specificity")},
                "test": {**{k: te[k] for k in ("recall", "specificity")},
                         **{f"{k}_ci95": ci[k] for k in ("recall", "specificity")}}})
    return out


def calibrate(card: inference.ModelCard, z_val: torch.Tensor, y_val: torch.Tensor, z_test: torch.Tensor,
              y_test: torch.Tensor, fit: bool) -> dict[str, Any]:
    """The temperature (fitted on validation when `fit`, else 1), the expected calibration errors (top-label and
    class-wise) of val and test before and after it, and reliability rows per split and stage ({"split", "stage",
    bin rows})."""
    t = fit_temperature(z_val, y_val, card.probabilities) if fit else 1.0
    out: dict[str, Any] = {"temperature": t, "reliability": []}
    for split, z, y in (("val", z_val, y_val), ("test", z_test, y_test)):
        for stage, temp in (("before", 1.0), ("after", t)):
            probs = card.probabilities(z, temp)
            out[f"{split}_ece_{stage}"] = ece(probs, y)  # Guo et al.'s: top-label confidence
            out[f"{split}_class_ece_{stage}"] = class_ece(probs, y)
            out["reliability"] += [{"split": split, "stage": stage, **r} for r in reliability(probs, y)]
    return out


def _per_class_curves(probs: torch.Tensor, labels: torch.Tensor, names: list[str],
                      overall: dict[str, list]) -> dict[str, dict[str, list]]:
    """label -> {"roc": rows, "pr": rows}: `overall` (the curves of curves()) alone for binary; one-vs-rest
    per class and `overall` as the micro average otherwise."""
    if probs.ndim == 1:
        return {"test": overall}
    out = {name: curves(probs[:, k], (labels == k).long()) for k, name in enumerate(names)}
    return out | {"micro average": overall}


COLUMNS = {"test": ("accuracy", "recall", "specificity", "f1", "auroc"), "val": ("auroc",)}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """reports/<v>/metrics.json: test accuracy, sensitivity (recall), specificity, F1 and AUROC, and val
    AUROC (everything else is in evaluation.json, MLflow and the leaderboard; the DVC metrics are compare's
    scores.json)."""
    return {s: {k: metrics[s][k] for k in keys} for s, keys in COLUMNS.items()}


def scores_note(metrics: dict[str, Any], n_test: int) -> str:
    """One line of the headline scores with their 95% intervals, for descriptions in MLflow."""
    t = metrics.get("threshold")
    at = f" at threshold {t:.3f} (chosen on val)" if t is not None else ""
    test, ci = metrics["test"], metrics.get("test_ci95", {})
    shown = ", ".join(f"{SCORE_NAMES[k].word} {score_text(test[k], ci.get(k))}" for k in SHOWN)
    val = score_text(metrics["val"]["auroc"], metrics.get("val_ci95", {}).get("auroc"))
    units = {s: (metrics.get(f"{s}_intervals") or {}).get("unit", "image") for s in ("test", "val")}
    n = metrics.get("test_intervals", {}).get("patients")
    images = f"{n_test} images" + (f" of {n} patients" if n else "")
    return (f"Test ({images}){at}: {shown} (95% intervals, bootstrap by {units['test']}). "
            f"Val AUROC {val} (by {units['val']}).{series_note(metrics.get('series', {}).get('test', {}))}")


def series_note(series: dict[str, Any]) -> str:
    """The test scores per series in words, e.g. ' By series: specificity IM 0.9130 [0.850–0.960] (69 normal
    images)'."""
    parts = [f"{SCORE_NAMES[key].word} {name} {score_text(row[key], row.get(f'{key}_ci95'))} "
             f"({row[f'{key}_images']} {kind} images)"
             for name, row in series.items() for key, kind in (("specificity", "normal"), ("recall", "pneumonia"))
             if key in row]
    return f" By series: {'; '.join(parts)}." if parts else ""


def log_figure(fig: Any, path: str) -> None:
    """Log a figure to the active run, then free it (tests evaluate many variants in one process)."""
    mlflow.log_figure(fig, path)
    plt.close(fig)


def _log_figures(variant: str, names: list[str], p_test: torch.Tensor, y_test: torch.Tensor, threshold: float,
                 binary: bool, curve_rows: dict[str, list]) -> None:
    rule = f", t={threshold:.2f}" if binary else ""
    log_figure(confusion_figure(confusion(p_test, y_test, threshold), names, f"{variant} test{rule}"),
               "plots/confusion_matrix.png")
    if binary:
        log_figure(confusion_figure(confusion(p_test, y_test), names, f"{variant} test, t=0.5"),
                   "plots/confusion_matrix_t0.5.png")
    per_class = _per_class_curves(p_test, y_test, names, curve_rows)
    exact = {"test": (auroc(p_test, y_test), average_precision(p_test, y_test))} if binary else {}
    log_figure(curve_figure({k: c["roc"] for k, c in per_class.items()}, "fpr", "tpr",
                            f"{variant} ROC (test)", True, {k: v[0] for k, v in exact.items()}), "plots/roc.png")
    log_figure(curve_figure({k: c["pr"] for k, c in per_class.items()}, "recall", "precision",
                            f"{variant} PR (test)", False, {k: v[1] for k, v in exact.items()}, "AP"), "plots/pr.png")


def predictions(test: Split, probs: torch.Tensor, card: inference.ModelCard) -> list[dict[str, Any]]:
    """One row per test image: name, label, the probabilities (binary: P(PNEUMONIA)) and the decision, with
    probabilities to float32's 9 significant digits, so that they read back exactly."""
    decided = card.predicted(probs).tolist()
    rows = []
    for m, label, pr, k in zip(test.meta, test.labels.tolist(), probs.tolist(), decided, strict=True):
        ps = {"p_pneumonia": f"{pr:.9g}"} if card.binary else {f"p_{c.lower()}": f"{v:.9g}"
                                                                for c, v in zip(card.classes, pr, strict=True)}
        rows.append({"name": m["name"], "label": card.classes[label], **ps, "predicted": card.classes[k]})
    return rows


def image_hashes(card: inference.ModelCard, train: Split, val: Split) -> list[dict[str, str]]:
    """The sha256 (and patient id) of every image the model trained and validated on, as the card's digests say;
    an error when these arrays are not the ones it was trained on."""
    if (images_digest(train.meta), images_digest(val.meta)) != (card.train_digest, card.val_digest):
        raise CxrError(f"{card.variant} was trained on other train/val images than the ones prepared now; run "
                       "`dvc repro` to retrain it on them")
    return [{"split": name, "sha256": m["sha256"], "name": m["name"], "patient_id": m["patient_id"]}
            for name, data in (("train", train), ("val", val)) for m in data.meta]


def error_gallery(model: torch.nn.Module, card: inference.ModelCard, test: Split, probs: torch.Tensor,
                  k: int = 4) -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    """The figure of explain.pick's test images with their maps, and its rows as {name, label, p_pneumonia}."""
    p = (probs if card.binary else 1 - probs[:, 0]).numpy()
    rows = explain.pick(p, test.labels, (card.predicted(probs) != 0).numpy(), k)
    idx = sorted({i for r in rows.values() for i in r})
    heat, label = explain.saliency(model, card, test.images[idx])
    at = {i: j for j, i in enumerate(idx)}
    names = [test.meta[i]["name"] for i in idx]
    fig = explain.gallery(test.images[idx], heat, names, p[idx], {g: [at[i] for i in r] for g, r in rows.items()},
                          f"{card.variant}: the most confident errors and right answers on test ({label}; "
                          f"threshold {card.threshold:.3f})")
    listed = {g: [{"name": test.meta[i]["name"], "label": card.classes[test.labels[i]], "p_pneumonia": float(p[i])}
                  for i in r] for g, r in rows.items()}
    return fig, listed


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 gray array as a PNG file's bytes: what the served model takes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What evaluating a variant computes, before anything is written or logged."""
    model: torch.nn.Module  # on the CPU
    card: inference.ModelCard  # with its TTA views, and the temperature and threshold chosen on val
    test: Split
    hashes: list[dict[str, str]]  # image_hashes: the images it trained and validated on
    p_test: torch.Tensor
    metrics: dict[str, Any]  # evaluation.json, less where MLflow keeps the model
    reliability: list[dict[str, Any]]  # calibrate's rows
    predictions: list[dict[str, Any]]  # predictions.csv
    curves: dict[str, list]  # test's ROC and PR rows

    @property
    def y_test(self) -> torch.Tensor:
        return torch.from_numpy(self.test.labels)


def score_variant(p: Params, data: Path, model_dir: Path) -> Evaluation:
    """Score model_dir/model.pt on data/<size>/{val,test}, with p's TTA, calibration and threshold rule (all
    fitted on val); an error when its train/val images are not the ones prepared now."""
    model, card = inference.load(model_dir / "model.pt")
    card = dataclasses.replace(card, tta_views=inference.TTA_VIEWS[:p.evaluate.tta])
    data = size_dir(data, card.image_size)
    val, test = load_split(data, "val"), load_split(data, "test")
    hashes = image_hashes(card, load_split(data, "train", mmap=True), val)
    z_val, z_test = card.logits_of(model, val.images), card.logits_of(model, test.images)  # every TTA view
    model.cpu()
    y_val, y_test = torch.from_numpy(val.labels), torch.from_numpy(test.labels)
    calibration = calibrate(card, z_val, y_val, z_test, y_test, p.evaluate.calibrate)
    card = dataclasses.replace(card, temperature=calibration["temperature"])
    p_val, p_test = card.probabilities(z_val), card.probabilities(z_test)
    metrics = _metrics(p_val, val, p_test, test, list(card.classes), p.evaluate.threshold, p.seed, p.split.series)
    metrics |= {"tta": len(card.tta_views), "tta_views": [list(v) for v in card.tta_views]}
    metrics["calibration"] = {k: v for k, v in calibration.items() if k != "reliability"}
    card = dataclasses.replace(card, threshold=metrics.get("threshold", 0.5))
    return Evaluation(model, card, test, hashes, p_test, metrics, calibration["reliability"],
                      predictions(test, p_test, card), curves(p_test, y_test))


def _write_reports(out: dict[str, Path], ev: Evaluation) -> None:
    """{metrics,confusion,roc,pr,reliability}.json and predictions.csv."""
    rows = [{"actual": r["label"], "predicted": r["predicted"]} for r in ev.predictions]
    for name, obj in (("metrics", headline(ev.metrics)), ("confusion", rows), ("roc", ev.curves["roc"]),
                      ("pr", ev.curves["pr"]), ("reliability", ev.reliability)):
        write_json(out[name], obj)
    write_csv(out["predictions"], ev.predictions)


def _tag_run(run_id: str, variant: str, metrics: dict[str, Any], n_test: int) -> None:
    mlflow.set_tag("ci95.unit", metrics["intervals"]["unit"]["test"])  # of every *_ci95_low/high metric
    if os.environ.get("DVC_STAGE"):
        mlflow.set_tag("dvc_stage_evaluate", os.environ["DVC_STAGE"])
    # The description: training's first paragraph (what the variant is), then the scores of this evaluation.
    note = mlflow.MlflowClient().get_run(run_id).data.tags.get(tracking.NOTE, f"**{variant}**")
    mlflow.set_tag(tracking.NOTE, note.split("\n\n")[0] + "\n\n" + scores_note(metrics, n_test))


def _log_model(ev: Evaluation, strict: bool) -> Any:
    """The model MLflow serves takes images (cxr.serving): its card and weights are what it and this project
    load (never a pickle); the images it trained and validated on go with it, so that promotion keeps them out
    of its test. Its input example: two test images, as PNG files (`strict`: two drawn ones, no patient's).
    Returns MLflow's ModelInfo."""
    if strict:
        side = ev.card.image_size
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        examples = [(np.add.outer(ramp, ramp) / 2).astype(np.uint8), np.full((side, side), 128, np.uint8)]
    else:
        examples = list(ev.test.images[:2])
    with tempfile.TemporaryDirectory() as extra:
        write_csv(Path(extra) / inference.HASHES, ev.hashes)
        inference.save(Path(extra) / inference.WEIGHTS, ev.model, ev.card)
        return serving.log_model(Path(extra) / inference.WEIGHTS, Path(extra) / inference.HASHES, ev.card,
                                 [png_bytes(a) for a in examples])


def _log_scores(metrics: dict[str, Any], model_id: str) -> None:
    # "val_best", not "val": training logs val/* per epoch, and this is one more point, at the kept weights.
    for split, key in (("test", "test"), ("test_threshold_0_5", "test_at_0.5"), ("val", "val_best")):
        if split in metrics:
            mlflow.log_metrics({f"{key}/{k}": v for k, v in metrics[split].items() if v is not None},
                               model_id=model_id)
        for k, ci in metrics.get(f"{split}_ci95", {}).items():
            if ci:
                mlflow.log_metrics({f"{key}/{k}_ci95_low": ci[0], f"{key}/{k}_ci95_high": ci[1]}, model_id=model_id)
    for name, row in metrics.get("series", {}).get("test", {}).items():  # e.g. test/specificity_NORMAL2-IM
        key = re.sub(r"[^\w\-. ]", "_", name)  # what MLflow takes in a metric's name
        mlflow.log_metrics({f"test/{k}_{key}": row[k] for k in ("specificity", "recall") if k in row},
                           model_id=model_id)


def _log_gallery(ev: Evaluation, path: Path, strict: bool) -> None:
    """The error gallery to `path` and to the run (`strict`: to `path` only: X-rays stay on this machine), with
    its rows."""
    gallery, listed = error_gallery(ev.model, ev.card, ev.test, ev.p_test)
    gallery.savefig(path, dpi=90, format="jpeg", pil_kwargs={"quality": 85})  # a PNG: 1.3 MB
    plt.close(gallery)
    mlflow.log_dict(listed, "error_gallery.json")
    if strict:
        return
    with tempfile.TemporaryDirectory() as tmp:  # drawn once: the same file to MLflow
        shutil.copy(path, Path(tmp) / "error_gallery.jpg")
        mlflow.log_artifact(str(Path(tmp) / "error_gallery.jpg"), "plots")


def evaluate_variant(p: Params, variant: str, data: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    """`score_variant`, then report_dir/{metrics,confusion,roc,pr,reliability,evaluation}.json, predictions.csv
    and gallery.jpg (each whole or not at all), and metrics, figures and the model to the variant's MLflow run;
    evaluation.json last, with where MLflow keeps the model."""
    ev = score_variant(p, data, model_dir)
    metrics, card, strict = ev.metrics, ev.card, p.tracking.privacy == "strict"
    run_id = json.loads((model_dir / "run.json").read_text())["run_id"]
    tracking.setup(p.mlflow.experiment)
    names_out = ("metrics", "confusion", "roc", "pr", "reliability", "evaluation")
    paths = [*(report_dir / f"{n}.json" for n in names_out), report_dir / "predictions.csv", report_dir / "gallery.jpg"]
    with atomic_paths(*paths) as tmps, mlflow.start_run(run_id=run_id):
        out = dict(zip([*names_out, "predictions", "gallery"], tmps, strict=True))
        _write_reports(out, ev)
        _tag_run(run_id, variant, metrics, len(ev.test.labels))
        info = _log_model(ev, strict)
        _log_scores(metrics, info.model_id)
        mlflow.log_metric("threshold", card.threshold)
        mlflow.log_dict(metrics, "metrics.json")
        mlflow.log_text(out["predictions"].read_text(), "predictions.csv")
        _log_figures(variant, list(card.classes), ev.p_test, ev.y_test, card.threshold, card.binary, ev.curves)
        mlflow.log_metrics({f"calibration/{k}": v for k, v in metrics["calibration"].items()},
                           model_id=info.model_id)
        log_figure(reliability_figure(ev.reliability, variant), "plots/reliability.png")
        _log_gallery(ev, out["gallery"], strict)
        metrics = metrics | {"mlflow": {"run_id": run_id, "model_id": info.model_id, "model_uri": info.model_uri}}
        write_json(out["evaluation"], metrics)
    t = metrics["test"]
    shown = "n/a (one class)" if t["auroc"] is None else f"{t['auroc']:.3f}"
    log.info("%s test: acc %.3f f1 %.3f auroc %s", variant, t["accuracy"], t["f1"], shown)
    return metrics
