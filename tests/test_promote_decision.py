"""Promotion's decision (`promote.decide`) on plain inputs, without MLflow: Kaggle's 624 test images (their
labels, and the patients their names give) scored by made-up models, in seconds."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import manifest
from cxr.data.gray import patient_id
from cxr.data.store import Split
from cxr.errors import CxrError
from cxr.jobs.promote import Contender, Seen, decide
from cxr.params import Params, PromoteParams, RetrainParams

CLASSES = ["NORMAL", "PNEUMONIA"]
P = Params(promote=PromoteParams(metric="auroc", min_delta=0.01, min_test_images=200, min_test_patients=100))
NOBODY = Seen(frozenset(), frozenset())


@pytest.fixture(scope="module")
def test_split() -> Split:
    rows = [r for r in manifest("chest_xray_224") if r["split"] == "test"]
    meta = [{"name": r["path"].split("/")[-1], "sha256": r["sha256"], "patient_id": patient_id(r["path"])}
            for r in rows]
    labels = np.array([CLASSES.index(r["label"]) for r in rows])
    return Split(np.zeros((len(rows), 1, 1), np.uint8), labels, meta)


def scores(split: Split, noise: float, seed: int) -> torch.Tensor:
    """P(pneumonia) of a made-up model: the label blurred by `noise` (more noise, a worse model)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.sigmoid((torch.from_numpy(split.labels).float() - 0.5) * 4 + noise * torch.randn(len(split.labels),
                                                                                                   generator=gen))


def model(split: Split, version: str, noise: float, seed: int, seen: Seen = NOBODY) -> Contender:
    return Contender(version, f"v{version}", scores(split, noise, seed), 0.5, seen)


def test_a_clearly_better_candidate_is_promoted_and_one_within_min_delta_keeps_the_champion(test_split):
    champ = model(test_split, "1", noise=4.0, seed=1)
    better = decide(P, test_split, CLASSES, model(test_split, "2", noise=1.0, seed=2), champ)
    assert better.decision == "promoted" and better.promoted
    d = better.difference
    assert d["ci95_low"] > P.promote.min_delta and d["unit"] == "patient" and d["resamples"] == 2000
    truth = test_split.labels
    assert better.candidate_test == pytest.approx(roc_auc_score(truth, scores(test_split, 1.0, 2)))
    assert better.previous_champion == {"version": "1", "variant": "v1",
                                        "test": pytest.approx(roc_auc_score(truth, champ.probs))}
    assert d["difference"] == pytest.approx(better.candidate_test - better.previous_champion["test"])
    assert better.test_images["used"] == better.test_images["total"] == len(truth)
    assert "above min_delta 0.01" in better.reason and "not above" not in better.reason

    # The champion's own scores, nudged: a difference far below min_delta moves nothing.
    same = dataclasses.replace(champ, version="3", probs=champ.probs + 1e-4)
    kept = decide(P, test_split, CLASSES, same, champ)
    assert kept.decision == "kept" and not kept.promoted
    assert kept.difference["ci95_low"] <= P.promote.min_delta and "not above min_delta 0.01" in kept.reason


def test_no_champion_an_unscorable_one_or_the_candidate_itself_decide_without_a_comparison(test_split):
    cand = model(test_split, "2", noise=1.0, seed=2)
    first = decide(P, test_split, CLASSES, cand, None)
    assert first.promoted and first.reason.startswith("no champion yet; test auroc ") and first.difference is None
    old = decide(P, test_split, CLASSES, cand, Contender("1", "v1", why_not="its image size 512 is not prepared"))
    assert old.promoted and "cannot be scored on this test data: its image size 512" in old.reason
    assert old.previous_champion == {"version": "1", "variant": "v1", "test": None}
    again = decide(P, test_split, CLASSES, cand, Contender("2", "v2"))
    assert again.decision == "kept" and again.reason == "the candidate is already the champion (version 2)"


def test_test_patients_a_model_saw_are_left_out_and_too_few_left_stops(test_split):
    patients = sorted({m["patient_id"] for m in test_split.meta} - {""})
    saw = Seen(frozenset(), frozenset(patients[: len(patients) // 4]))  # a quarter of the test patients
    champ = model(test_split, "1", noise=4.0, seed=1, seen=saw)
    ruling = decide(P, test_split, CLASSES, model(test_split, "2", noise=1.0, seed=2), champ)
    keep = [i for i, m in enumerate(test_split.meta) if m["patient_id"] not in saw.patients]
    n = ruling.test_images
    assert n["used"] == len(keep) < n["total"] and n["removed"]["champion"]["patients"] == len(saw.patients)
    assert ruling.candidate_test == pytest.approx(roc_auc_score(test_split.labels[keep],
                                                                scores(test_split, 1.0, 2)[keep]))
    assert f"(removed: {n['removed']['champion']['images']} images of {len(saw.patients)} patients seen by the " \
           "champion)" in ruling.reason
    most = Seen(frozenset(), frozenset(patients[: len(patients) * 3 // 4]))
    with pytest.raises(CxrError, match="promotion stopped: only .* retrain it on this split"):
        decide(P, test_split, CLASSES, model(test_split, "2", noise=1.0, seed=2),
               dataclasses.replace(champ, seen=most))


def test_a_shift_with_on_shift_stop_holds_back_only_a_comparison(test_split):
    stop = dataclasses.replace(P, retrain=RetrainParams(on_shift="stop"))
    shift = {"verdict": "shift in images: mean (+0.50 sd)", "shifted": {"images": True, "scores": False}}
    cand, champ = model(test_split, "2", noise=1.0, seed=2), model(test_split, "1", noise=4.0, seed=1)
    held = decide(stop, test_split, CLASSES, cand, champ, shift)
    assert held.decision == "stopped" and not held.promoted and held.difference["ci95_low"] > 0.01
    assert held.reason.startswith("retrain.on_shift is stop and the images the champion never saw are shifted in "
                                  "images") and "would have promoted the candidate" in held.reason
    assert decide(P, test_split, CLASSES, cand, champ, shift).decision == "promoted"  # warn: the comparison decides
    assert decide(stop, test_split, CLASSES, cand, None, shift).decision == "promoted"  # nothing to compare with
