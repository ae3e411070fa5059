"""Evaluate one variant on test: metrics, curves and figures to files and to its MLflow run, plus the model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

from cxr import LABELS, tracking
from cxr.data.store import load_split
from cxr.evaluation.metrics import choose_threshold, curves, scores
from cxr.evaluation.plots import confusion_figure, curve_figure
from cxr.io import write_json
from cxr.params import Params
from cxr.training.loop import load_checkpoint, predict_logits, to_device

log = logging.getLogger(__name__)


def _probs(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    return predict_logits(model, to_device(images, torch.device("cpu"))).sigmoid()


def evaluate_variant(p: Params, variant: str, data: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Write report_dir/{metrics,confusion,roc,pr}.json and log the same to the variant's MLflow run."""
    model, _ = load_checkpoint(model_dir / "model.pt")
    val, test = load_split(data, "val"), load_split(data, "test")
    p_val, p_test = _probs(model, val.images), _probs(model, test.images)
    y_val, y_test = torch.from_numpy(val.labels), torch.from_numpy(test.labels)
    threshold = choose_threshold(p_val, y_val, p.evaluate.threshold)
    metrics = {"threshold": threshold, "threshold_rule": str(p.evaluate.threshold),
               "test": scores(p_test, y_test, threshold), "test_threshold_0_5": scores(p_test, y_test, 0.5),
               "val": scores(p_val, y_val, threshold)}
    predicted = (p_test > threshold).long().tolist()  # torchmetrics' rule
    confusion = [{"actual": LABELS[a], "predicted": LABELS[b]} for a, b in zip(test.labels.tolist(), predicted,
                                                                               strict=True)]
    curve_rows = curves(p_test, y_test)
    write_json(report_dir / "metrics.json", metrics)
    write_json(report_dir / "confusion.json", confusion)
    write_json(report_dir / "roc.json", curve_rows["roc"])
    write_json(report_dir / "pr.json", curve_rows["pr"])

    run_id = json.loads((model_dir / "run.json").read_text())["run_id"]
    tracking.setup(p.mlflow.experiment)
    with mlflow.start_run(run_id=run_id):
        example = test.images[:2, None].astype(np.float32) / 255.0  # batch of 2: keeps the batch dim dynamic
        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature)
        # "val_best", not "val": training logs val/* per epoch, and this is one more point, at the kept weights.
        for split, key in (("test", "test"), ("test_threshold_0_5", "test_at_0.5"), ("val", "val_best")):
            mlflow.log_metrics({f"{key}/{k}": v for k, v in metrics[split].items()}, model_id=info.model_id)
        mlflow.log_metric("threshold", threshold)
        mlflow.log_dict(metrics, "metrics.json")
        mlflow.log_figure(confusion_figure(metrics["test"], f"{variant} test, t={threshold:.2f}"),
                          "plots/confusion_matrix.png")
        mlflow.log_figure(confusion_figure(metrics["test_threshold_0_5"], f"{variant} test, t=0.5"),
                          "plots/confusion_matrix_t0.5.png")
        mlflow.log_figure(curve_figure(curve_rows["roc"], "fpr", "tpr", f"{variant} ROC (test)", True),
                          "plots/roc.png")
        mlflow.log_figure(curve_figure(curve_rows["pr"], "recall", "precision", f"{variant} PR (test)"),
                          "plots/pr.png")
    t = metrics["test"]
    log.info("%s test: acc %.3f f1 %.3f auroc %.3f (threshold %.3f); acc at 0.5: %.3f", variant, t["accuracy"],
             t["f1"], t["auroc"], threshold, metrics["test_threshold_0_5"]["accuracy"])
    return metrics
