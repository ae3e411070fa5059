"""Training's and evaluation's computations called directly, with MLflow out of reach: what they return is
checked against the history it came from and against scores computed independently (scikit-learn)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from conftest import ROOT, data_stages
from cxr import inference, params
from cxr.evaluation import variant as evaluation
from cxr.params import GrayParams
from cxr.training import variant as training


class Unreachable:
    """Stands in for mlflow and cxr.tracking in the modules under test: any use fails the test."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str):
        raise AssertionError(f"{self.name}.{attr} used by a computation")


@pytest.fixture
def no_mlflow(monkeypatch):
    for module in (training, evaluation):
        for name in ("mlflow", "tracking"):
            monkeypatch.setattr(module, name, Unreachable(name))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_stages(tmp_path_factory.mktemp("loop"), 60, GrayParams(image_size=32, workers=2))


def project_params(**train) -> params.Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({"batch_size": 32, **train})
    raw["gray"]["image_size"] = 32
    return params.parse(raw)


def test_train_returns_a_row_per_epoch_and_the_weights_of_the_lowest_val_loss(data, no_mlflow):
    inputs = training.prepare(project_params(epochs=30, patience=2), "mlp", data)
    trained = training.train(inputs)
    history, summary = trained.history, trained.summary
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    best = min(history, key=lambda r: r["val_loss"])["epoch"]
    assert summary["best_epoch"] == best and summary["epochs_run"] == len(history) == best + 2 < 30  # early stop
    assert summary["best_val_loss"] == history[best - 1]["val_loss"]
    x = torch.from_numpy(inputs.val.images[:, None].astype(np.float32) / 255)
    with torch.no_grad():
        logits = trained.model(x).reshape(-1)
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(inputs.val.labels).float())
    assert loss.item() == pytest.approx(summary["best_val_loss"], rel=1e-4)


def test_evaluate_returns_the_scores_of_its_own_predictions(data, tmp_path, no_mlflow):
    p = project_params(epochs=3)
    inputs = training.prepare(p, "mlp", data)
    inference.save(tmp_path / "model.pt", training.train(inputs).model, inputs.card)
    ev = evaluation.score_variant(p, data, tmp_path)
    y, probs = ev.test.labels, ev.p_test.numpy()
    decided = probs > ev.metrics["threshold"]
    assert ev.card.threshold == ev.metrics["threshold"]
    assert [r["predicted"] == "PNEUMONIA" for r in ev.predictions] == decided.tolist()
    assert [float(r["p_pneumonia"]) for r in ev.predictions] == pytest.approx(probs.tolist(), abs=1e-7)
    test = ev.metrics["test"]
    assert test["accuracy"] == pytest.approx(accuracy_score(y, decided), abs=1e-12)
    assert test["recall"] == pytest.approx(recall_score(y, decided), abs=1e-12)
    assert test["specificity"] == pytest.approx(recall_score(1 - y, ~decided), abs=1e-12)
    assert test["f1"] == pytest.approx(f1_score(y, decided), abs=1e-12)
    assert test["auroc"] == pytest.approx(roc_auc_score(y, probs), abs=1e-6)
    assert ev.metrics["test_ci95"]["auroc"][0] <= test["auroc"] <= ev.metrics["test_ci95"]["auroc"][1]
