"""`cxr shift` on real X-rays: what it flags (full-resolution originals against the 224 px set; a brightened
copy), and what it must not (two random halves of one set)."""

import json
import sys

import numpy as np
import torch

from conftest import ROOT, make_imagefolder, sh, shared
from cxr import shift
from cxr.inference import ModelCard


def test_full_resolution_originals_differ_from_the_224_px_set_in_size_and_the_command_says_so(tmp_path):
    ref = make_imagefolder(tmp_path / "224", per_class=40, splits=("train",), with_duplicates=False)
    out = sh(ROOT, sys.executable, "-m", "cxr", "shift", str(ref), str(shared("chest_xray_fullres_sample")),
             "--no-model", "--size", "64", "--out", str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "shift.json").read_text())
    assert report["images"]["width"]["shift"] and report["images"]["height"]["shift"]
    assert report["images"]["width"]["target_mean"] > 1000 and report["reference"]["images"] == 80
    assert report["verdict"].startswith("shift in images: width") and report["verdict"] in out
    assert (tmp_path / "report" / "shift.png").read_bytes()[:4] == b"\x89PNG"


def test_halves_of_one_set_show_no_shift_and_a_brightened_copy_is_told_apart():
    folder = shared("chest_xray_224") / "test" / "NORMAL"
    card = ModelCard("cnn", "tinyvgg", 64, ("NORMAL", "PNEUMONIA"), "stretch", 64, "none", 0.5, 0.25, prior=0.5)
    torch.manual_seed(0)
    model = card.build().eval()  # untrained (seeded): its features still see the images
    s = shift.load_set(str(folder), 64)
    idx = np.random.default_rng(0).permutation(len(s.images))
    half = len(idx) // 2

    def part(name, i, images=None):
        return shift.ImageSet(name, s.images[i] if images is None else images, s.width[i], s.height[i], s.labels[i])

    same = shift.shift_report(part("a", idx[:half]), part("b", idx[half:]), model, card)
    assert same["verdict"].startswith("no shift") and not same["model"]["domain"]["different"]
    lo, hi = same["model"]["domain"]["ci95"]
    assert lo < 0.5 < hi
    # The same images on both sides: each one's held-out twin is read as the other set's, far below chance.
    twins = shift.shift_report(part("a", idx[:half]), part("a again", idx[:half]))
    assert twins["domain"]["ci95"][1] < 0.4 and not any(twins["shifted"].values())
    assert twins["verdict"].startswith("no shift") and "the sets share near-copies of images" in twins["verdict"]
    brighter = np.clip(s.images[idx[half:]].astype(int) + 40, 0, 255).astype(np.uint8)
    moved = shift.shift_report(part("a", idx[:half]), part("b+40", idx[half:], brighter), model, card)
    assert moved["images"]["mean"]["shift"] and moved["model"]["domain"]["different"]
    assert moved["verdict"].startswith("shift in images: mean")
    # EM starts from the prior the model's scores carry (balanced sampling: 0.5), not from the reference's share (0)
    q = moved["model"]["prevalence"]
    assert q["start"] == 0.5 and q["reference"] == 0.0 and q["start_from"] == "the model's training prior (its card)"
    assert q["target_estimate"] is not None and "EM from the model's training prior (its card), 0.500" in \
        shift.render(moved)


def test_a_change_in_the_share_of_pneumonia_alone_is_no_shift_once_each_class_holds_half_of_its_set():
    """Kaggle's test images, split into a mostly normal set (200 normal, 20 pneumonia) and a mostly pneumonia one
    (34, 370): a domain classifier that ignores the labels tells them apart by their classes; weighted by
    class, it must not (prior shift is not a shift in how the images look)."""
    s = shift.load_set(str(shared("chest_xray_224") / "test"), 64)
    rng = np.random.default_rng(0)
    normal, pneumonia = (rng.permutation(np.flatnonzero(s.labels == c)) for c in (0, 1))
    a, b = np.concatenate([normal[:200], pneumonia[:20]]), np.concatenate([normal[200:], pneumonia[20:]])
    fa, fb = shift.image_features(s.images[a]), shift.image_features(s.images[b])
    blind, _ = shift.domain_auroc(fa, fb)
    weighted, held = shift.domain_auroc(fa, fb, s.labels[a], s.labels[b])
    assert blind["different"] and blind["auroc"] > 0.8 and not blind["class_balanced"]
    assert weighted["class_balanced"] and not weighted["different"]
    assert weighted["ci95"][0] < 0.5 < weighted["ci95"][1] and held.shape == (len(a) + len(b),)


def test_folds_by_patient_keep_a_source_s_patients_from_reading_as_a_shift():
    """Two sets of different patients from one source (Kaggle's train pneumonias of patients with four or more
    images, split by patient): no shift. Folds by image put each patient's other images in training, and the
    classifier tells the sets apart by who is in them (0.58); folds by patient do not (0.50), and each patient's
    images stay in one fold."""
    s = shift.load_set(str(shared("chest_xray_224") / "train" / "PNEUMONIA"), 64)
    counts = {p: int((s.patients == p).sum()) for p in set(s.patients)}
    ids = sorted(p for p, n in counts.items() if n >= 4)
    np.random.default_rng(0).shuffle(ids)
    half = set(ids[:len(ids) // 2])
    a = np.flatnonzero([p in half for p in s.patients])
    b = np.flatnonzero([p in ids and p not in half for p in s.patients])
    fa, fb = shift.image_features(s.images[a]), shift.image_features(s.images[b])
    by_image, _ = shift.domain_auroc(fa, fb)
    by_patient, _ = shift.domain_auroc(fa, fb, patients=(s.patients[a], s.patients[b]))
    assert by_image["unit"] == "image" and by_patient["unit"] == "patient"
    assert by_image["auroc"] > 0.55 and by_image["ci95"][0] > 0.52  # the patients, read as a shift
    assert by_patient["ci95"][0] < 0.5 < by_patient["ci95"][1] and not by_patient["different"]
    lo, hi = by_patient["refits"]["auroc_range"]
    assert 0 < hi - lo < 0.1 and lo < 0.6  # other folds move it a little, never across the line
    folds = shift.patient_folds(torch.zeros(len(a) + len(b), dtype=torch.long),
                                [*s.patients[a], *s.patients[b]], 5, 0)
    for p in half:
        assert folds[np.flatnonzero(s.patients[a] == p)].unique().numel() == 1  # a patient's images: one fold
