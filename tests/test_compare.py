"""The leaderboard's seed spread and its words about thresholds, from rows as the compare stage reads them."""

from pathlib import Path

import numpy as np
import pytest

from cxr import params
from cxr.evaluation.compare import SPREAD, markdown, spread, summary


def row(variant: str, seed: int, **extra) -> dict:
    scores = {k: round(0.80 + 0.03 * seed + 0.001 * i, 4) for i, k in enumerate(SPREAD)}
    ci = {f"{k}_ci95": [scores[k] - 0.02, scores[k] + 0.02] for k in ("accuracy", "recall", "specificity", "auroc")}
    return {"variant": variant, **scores, **ci, "val_auroc_ci95": None, "threshold": 0.5, "threshold_low": 0.45,
            "threshold_high": 0.52, "threshold_wide": False, **extra}


def test_variants_that_differ_only_in_their_seed_get_mean_sd_and_range_beside_their_ensemble():
    p = params.parse({"models": {"s0": {"arch": "mlp"}, "s1": {"arch": "mlp", "seed_offset": 1},
                                 "s2": {"arch": "mlp", "seed_offset": 2}, "other": {"arch": "tinyvgg"},
                                 "lr2": {"arch": "mlp", "lr": 0.01, "seed_offset": 1}},
                      "ensembles": {"ens": ["s0", "s1", "s2"]}})
    rows = [row("s0", 0), row("s1", 1), row("s2", 4), row("other", 2), row("lr2", 3),
            row("ens", 5, threshold_wide=True, threshold_low=0.31, threshold_high=0.93)]
    [group] = spread(p, rows)  # `other` and `lr2` are other recipes: no group of their own
    assert group["variants"] == ["s0", "s1", "s2"] and group["ensemble"] == "ens"
    acc = [r["accuracy"] for r in rows[:3]]
    st = group["scores"]["accuracy"]
    assert st["mean"] == pytest.approx(np.mean(acc), abs=1e-4) and st["sd"] == pytest.approx(np.std(acc, ddof=1),
                                                                                           abs=1e-4)
    assert (st["min"], st["max"], st["ensemble"]) == (min(acc), max(acc), rows[5]["accuracy"])
    text = summary(rows, "auroc", Path("comparison"), [group])
    assert "Seed spread of s0, s1, s2 (one recipe, 3 seeds)" in text
    line = f"test acc   {st['mean']:.4f} ± {st['sd']:.4f} ({min(acc):.4f}–{max(acc):.4f})"
    assert f"{line}   ens {rows[5]['accuracy']:.4f}" in text
    assert "ens: every threshold from 0.310 to 0.930 scores within one image of the best on validation" in text
    assert "s0: every threshold" not in text  # a narrow range is not worth a line
    board = markdown(rows, "auroc", [group])
    assert "| s0 | 0.8000 [0.780–0.820] |" in board and "Seed spread of s0, s1, s2" in board


def test_the_leaderboard_says_how_it_ranks_what_sens_and_spec_are_a_shift_and_shared_patients():
    rows = [row("a", 4, val_auroc=0.99), row("b", 1, val_auroc=0.95)]  # a: test AUROC 0.92, val 0.99
    split = {"source_patients_across_splits": {"train-test": 170}, "pooled": False}
    shift = {"verdict": "shift in images: mean (+0.50 sd)", "shifted": {"images": True, "scores": False}}
    text = summary(rows, "auroc", Path("comparison"), [], {"split": split, "shift": shift})
    said = "Validation against test (shift stage, reports/shift.json and shift.png): shift in images: mean (+0.50 sd)."
    flat = text.replace("\n  ", " ")
    assert said in flat and "Validation cannot speak for the test set" in flat
    assert said in markdown(rows, "auroc", [], shift)
    assert "Ranked by validation AUROC" in text and "sens = sensitivity: the share of pneumonia" in text
    assert "a: validation AUROC 0.990 against test 0.924" in text and "shifted" in text
    assert "170 patients have images on both sides of the source's splits (train-test: 170)" in text
    assert "Validation (split stage)" not in text  # no word where the split report says nothing of it
    carved = {"by": "acquisition", "end": "low", "blocks": [{"series": "IM", "numbers": [115, 221]}],
              "unnumbered": {"images": 3875, "carved": 387},
              "choice": {"reason": "its images are the harder to tell from test's", "domain_auroc": {
                  "patient": {"auroc": 0.712}, "acquisition": {"auroc": 0.668}}}}
    told = summary(rows, "auroc", Path("comparison"), [], {"split": {**split, "validation": carved}})
    told = told.replace("\n  ", " ")
    assert ("Validation (split stage): carved as a new acquisition: the patients at the low end of each numbered "
            "series' running numbers (IM 115–221), the other patients at random; split.val_by auto chose "
            "it: its images are the harder to tell from test's, patient 0.712, acquisition 0.668.") in told
    words = text[text.index("Ranked by"):].splitlines()
    assert max(map(len, words)) <= 120  # the words wrap (the table above is as wide as its intervals)
    calm = summary([row("a", 4, val_auroc=0.93)], "auroc", Path("comparison"), [],
                   {"split": {**split, "pooled": True}, "shift": {"verdict": "no shift: ...", "shifted": {}}})
    assert "shifted" not in calm and "patients" not in calm  # a small gap, and a pooled split: no words
    assert "no shift: .... Choices made on validation should carry over to test." in calm.replace("\n  ", " ")


def test_cxr_results_fits_120_columns_with_every_default_variant():
    from cxr.results import table

    names = list(params.load().variants or [])
    assert len(names) == 14
    rows = [row(v, i % 5, val_auroc=0.9 + i / 1000) for i, v in enumerate(names)]
    exps = [("workspace", rows, names[0]), ("a-long-experiment-name", rows, None)]  # named by its run, or not
    for per_variant in (False, True):
        lines = table(exps, "auroc", per_variant, 120).splitlines()
        assert max(map(len, lines)) <= 120
        assert len([line for line in lines if "[." in line]) == (28 if per_variant else 2)
    first, best = (line.split() for line in table(exps, "auroc", False, 120).splitlines()[-2:])
    assert first[:3] == ["workspace", names[0], "0.900"]  # the variant its compare stage named best
    assert best[1:3] == [names[-1], "0.913"]  # else the highest val AUROC
    assert best[0].endswith("…") and "a-long-experiment-name".startswith(best[0][:-1])  # cut to fit
