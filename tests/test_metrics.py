"""cxr.metrics against torchmetrics (the reference it replaced, kept as a test dependency):
every score and curve point on scores with many ties, imbalanced classes, and one class only."""

import warnings

import numpy as np
import pytest
import torch
from torchmetrics.functional import classification as C

from cxr import metrics as M
from cxr.inference import ModelCard


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


@pytest.mark.parametrize("rule", ["f1", "youden"])
def test_a_threshold_between_adjacent_float32_scores_separates_them(rule):
    # Negatives and positives one float32 step apart near 1.0: the float64 midpoint is a tie in float32, which
    # rounds to the even one, here the positive score, and every positive was called negative (F1 1.0 -> 0.0).
    low = torch.nextafter(torch.tensor(0.9999, dtype=torch.float32), torch.tensor(2.0))
    assert low.view(torch.int32).item() % 2 == 1  # odd: the tie rounds up
    high = torch.nextafter(low, torch.tensor(2.0))
    probs, labels = torch.stack([low, low, high, high]), torch.tensor([0, 0, 1, 1])
    t = M.choose_threshold(probs, labels, rule)
    assert M.scores(probs, labels, t)["f1"] == 1.0
    assert [p > t for p in probs.tolist()] == [False, False, True, True]  # Python's float64 compare agrees


def test_a_fixed_threshold_is_a_float32_value_so_both_precisions_agree():
    t = M.choose_threshold(torch.rand(4), torch.tensor([0, 1, 0, 1]), 0.3)
    p = torch.tensor([0.3], dtype=torch.float32)  # 0.30000001192..., above 0.3 in float64
    assert t == float(p) and M.scores(torch.cat([p, p]), torch.tensor([0, 1]), t)["tp"] == int(p.item() > t) == 0


def test_scores_are_float32_even_inside_an_autocast_region():
    # The CPU twin of evaluation on CUDA, which ran under bf16 autocast: scores kept 8 bits and 624 distinct
    # probabilities collapsed to about 435. Inference turns autocast (and TF32) off whatever the caller set.
    card = ModelCard("v", "cnn_baseline", 32, ("NORMAL", "PNEUMONIA"), "stretch", 32, "none", 0.5, 0.25)
    torch.manual_seed(1)  # whatever ran before: an untrained net ties two of 300 float32 scores at some seeds (0)
    model = card.build()
    images = np.random.default_rng(0).integers(0, 256, (300, 32, 32), dtype=np.uint8)
    plain = card.probs_of(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.rand(2, 1, 32, 32)).dtype == torch.bfloat16  # autocast is really on here
        inside = card.probs_of(model, images)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert plain.unique().numel() == 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU twin is the autocast test above)")
def test_cuda_scores_match_the_cpu_in_float32():
    card = ModelCard("v", "resnet18", 64, ("NORMAL", "PNEUMONIA"), "stretch", 64, "none", 0.5, 0.25)
    model = card.build().eval()
    images = np.random.default_rng(0).integers(0, 256, (624, 64, 64), dtype=np.uint8)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as the training loop leaves it
        gpu = card.probs_of(model, images)  # the best device: CUDA
    cpu = torch.cat([card.probabilities(model.cpu()(torch.from_numpy(images[i:i + 128, None]).float() / 255)[None])
                     for i in range(0, 624, 128)]).detach()
    assert gpu.unique().numel() == 624 and torch.allclose(gpu, cpu, atol=1e-5)


def test_threshold_range_holds_every_threshold_with_the_best_validation_score():
    # Separable: every threshold between the highest NORMAL (0.3) and the lowest PNEUMONIA score (0.7) is best.
    probs, labels = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8, 0.95]), torch.tensor([0, 0, 0, 1, 1, 1])
    for rule in ("youden", "f1"):
        lo, hi = M.threshold_range(probs, labels, rule)
        assert (lo, hi) == pytest.approx((0.3, 0.7))
        assert lo <= M.choose_threshold(probs, labels, rule) < hi
    # Overlapping, with ties: the rule's score is the best at both ends and inside, and worse just outside.
    probs, labels = _binary(300, 7, 0.6)
    for rule in ("youden", "f1"):
        lo, hi = M.threshold_range(probs, labels, rule)

        def score(t, rule=rule):
            s = M.scores(probs, labels, t)
            return s["f1"] if rule == "f1" else s["recall"] + s["specificity"] - 1

        best = max(score(float(t)) for t in probs.unique())
        assert lo <= M.choose_threshold(probs, labels, rule) < hi
        for t in (lo, (lo + hi) / 2, hi - 1e-6):
            assert score(t) == pytest.approx(best, abs=1e-12), (rule, t)
        assert score(lo - 0.011) < best - 1e-12 or lo < 0.011  # scores lie on a 0.01 grid
        # Within one image of the best: a wider range around the best one, whose ends score at most one more
        # error of the rarer class (Youden) or one more false call (F1) below the best, and beyond which none does.
        near_lo, near_hi = M.threshold_range(probs, labels, rule, slack=1)
        assert near_lo <= lo < hi <= near_hi and near_hi - near_lo > hi - lo
        pos, neg = int(labels.sum()), int((1 - labels).sum())
        tp = M.scores(probs, labels, M.choose_threshold(probs, labels, rule))["tp"]
        floor = best - 1 / min(pos, neg) if rule == "youden" else 2 * tp / (2 * tp / best + 1)
        assert score(near_lo) >= floor - 1e-12 and score(near_hi - 1e-6) >= floor - 1e-12
        assert all(score(t) < floor - 1e-12 for t in probs.unique().tolist() if t < near_lo - 1e-6 or t >= near_hi)
    assert M.threshold_range(probs, labels, 0.5) is None


def test_the_threshold_at_a_specificity_is_the_most_sensitive_one_that_keeps_it():
    probs, labels = _binary(500, 8, 0.5)
    for target in M.OPERATING_SPECIFICITY:
        t = M.threshold_at_specificity(probs, labels, target)
        assert M.scores(probs, labels, t)["specificity"] >= target
        lower = probs[(labels == 0) & (probs < t)].max()  # the next lower NORMAL score: too many false positives
        assert M.scores(probs, labels, float(lower) - 1e-6)["specificity"] < target


def test_ece_is_top_label_as_guo_defines_it_and_class_ece_is_per_class():
    # Binary, by hand: confidence max(p, 1 - p) and correctness of the 0.5 decision, bins of width 0.1.
    probs, labels = torch.tensor([0.95, 0.92, 0.15, 0.45, 0.6]), torch.tensor([1, 0, 0, 1, 1])
    # bins: 0.95 and 0.92 -> [0.9, 1.0): conf 0.935, acc 1/2; 0.85 (p 0.15) -> [0.8, 0.9): acc 1;
    # 0.55 (p 0.45, wrong) and 0.6 (right) -> [0.5, 0.6) and [0.6, 0.7)
    by_hand = (2 * abs(0.935 - 0.5) + abs(0.85 - 1) + abs(0.55 - 0) + abs(0.6 - 1)) / 5
    assert M.ece(probs, labels) == pytest.approx(by_hand)
    # P(PNEUMONIA) against the share of PNEUMONIA: [0.9, 1): 0.935 vs 1/2; 0.15 vs 0; 0.45 vs 1; 0.6 vs 1.
    assert M.class_ece(probs, labels) == pytest.approx((2 * abs(0.935 - 0.5) + 0.15 + 0.55 + 0.4) / 5)
    # With more classes, top-label ECE equals the binary one written as two columns.
    two = torch.stack([1 - probs, probs], 1)
    assert M.ece(two, labels) == pytest.approx(M.ece(probs, labels))
