"""cxr.evaluation.metrics against torchmetrics (the reference it replaced, kept as a test dependency):
every score and curve point on scores with many ties, imbalanced classes, and one class only."""

import warnings

import pytest
import torch
from torchmetrics.functional import classification as C

from cxr.evaluation import metrics as M


def _binary(n: int, seed: int, positive: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < positive).long()
    probs = (torch.rand(n, generator=g) * 0.6 + labels * 0.3).round(decimals=2)  # overlapping, many ties
    return probs, labels


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n, seed, positive", [(500, 0, 0.5), (300, 1, 0.9), (40, 2, 0.2)])
def test_binary_curves_and_scores_match_torchmetrics(n, seed, positive):
    probs, labels = _binary(n, seed, positive)
    for ours, ref in zip(M.roc(probs, labels), C.binary_roc(probs, labels), strict=True):
        _close(ours, ref)
    for ours, ref in zip(M.pr_curve(probs, labels), C.binary_precision_recall_curve(probs, labels), strict=True):
        _close(ours, ref)
    for t in (0.5, 0.35, float(probs[3])):  # a threshold equal to a score: positive only above it
        s = M.scores(probs, labels, t)
        ref = {"accuracy": C.binary_accuracy, "precision": C.binary_precision, "recall": C.binary_recall,
               "specificity": C.binary_specificity, "f1": C.binary_f1_score}
        for name, fn in ref.items():
            assert s[name] == pytest.approx(fn(probs, labels, threshold=t).item(), abs=1e-6), name
        ref_cm = C.binary_confusion_matrix(probs, labels, threshold=t).tolist()
        assert [[s["tn"], s["fp"]], [s["fn"], s["tp"]]] == ref_cm == M.confusion(probs, labels, t)
    # the chosen threshold scores the best of every threshold between two distinct scores
    cuts = [max(0.0, float(u) - 1e-3) for u in probs.unique()] + [1.0]
    rules = {"f1": C.binary_f1_score, "youden": lambda p, y, threshold: C.binary_recall(p, y, threshold=threshold)
             + C.binary_specificity(p, y, threshold=threshold) - 1}
    for rule, fn in rules.items():
        best = max(fn(probs, labels, threshold=c).item() for c in cuts)
        assert fn(probs, labels, threshold=M.choose_threshold(probs, labels, rule)).item() == pytest.approx(best)
    s = M.scores(probs, labels, 0.5)
    assert s["auroc"] == pytest.approx(C.binary_auroc(probs, labels).item(), abs=1e-6)
    assert s["average_precision"] == pytest.approx(C.binary_average_precision(probs, labels).item(), abs=1e-6)


def test_multiclass_scores_match_torchmetrics():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (400,), generator=g)
    probs = torch.softmax(torch.randn(400, 3, generator=g) + torch.nn.functional.one_hot(labels, 3), 1)
    names = ["NORMAL", "BACTERIA", "VIRUS"]
    s = M.multiclass_scores(probs, labels, names)
    kw = {"num_classes": 3}
    assert s["accuracy"] == pytest.approx(C.multiclass_accuracy(probs, labels, average="micro", **kw).item())
    for metric, fn in {"precision": C.multiclass_precision, "recall": C.multiclass_recall,
                       "specificity": C.multiclass_specificity, "f1": C.multiclass_f1_score}.items():
        ref = fn(probs, labels, average=None, **kw)
        assert [s[f"{metric}_{n}"] for n in names] == pytest.approx(ref.tolist(), abs=1e-6)
        assert s[metric] == pytest.approx(ref.mean().item(), abs=1e-6)
    assert s["auroc"] == pytest.approx(C.multiclass_auroc(probs, labels, average="macro", **kw).item(), abs=1e-6)
    assert s["average_precision"] == pytest.approx(
        C.multiclass_average_precision(probs, labels, average="macro", **kw).item(), abs=1e-6)
    assert M.confusion(probs, labels) == C.multiclass_confusion_matrix(probs, labels, **kw).tolist()


def test_one_class_only():
    probs, labels = torch.tensor([0.2, 0.7, 0.7, 0.9]), torch.ones(4, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns that the rate of the missing class is 0
        for ours, ref in zip(M.roc(probs, labels), C.binary_roc(probs, labels), strict=True):
            _close(ours, ref)
        for ours, ref in zip(M.pr_curve(probs, 1 - labels), C.binary_precision_recall_curve(probs, 1 - labels),
                             strict=True):
            _close(ours, ref)
    assert M.choose_threshold(probs, labels, "f1") == 0.5  # no rule applies to one class
    s = M.scores(probs, labels, 0.5)
    assert s["auroc"] is None and s["average_precision"] is None and s["recall"] == 0.75
