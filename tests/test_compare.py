"""The leaderboard's seed spread and its words about thresholds, from rows as the compare stage reads them."""

import re
from pathlib import Path

import numpy as np
import pytest

from cxr import params
from cxr.evaluation.compare import SPREAD, dvc_scores, markdown, spread, summary
from cxr.wording import score_text


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


def test_a_score_reads_the_same_everywhere_long_in_reports_short_in_terminal_columns():
    assert score_text(0.91666, [0.8941, 0.9384]) == "0.9167 [0.894–0.938]"
    assert score_text(0.91666, [0.8941, 1.0], short=True) == "0.917 [.894–1.000]"
    assert (score_text(0.5), score_text(0.5, short=True)) == ("0.5000", "0.500")  # no interval
    assert (score_text(None), score_text(None, short=True)) == ("n/a", "-")
    assert (score_text("tinyvgg"), score_text(4)) == ("tinyvgg", "4")  # a row's name and counts beside its scores


def test_scores_json_keeps_the_names_dvc_and_mlflow_know():
    rows = [row("a", 1), row("b", 2)]
    data = dvc_scores(rows, "b")
    assert list(data) == ["best", "test_auroc", "val_auroc", "test_acc", "test_sens", "test_spec"]
    assert data["best"] == {"variant": "b", "test_auroc": rows[1]["auroc"], "val_auroc": rows[1]["val_auroc"],
                            "test_sens": rows[1]["recall"], "test_spec": rows[1]["specificity"]}
    assert data["test_acc"] == {"a": rows[0]["accuracy"], "b": rows[1]["accuracy"]}
    assert "best" not in dvc_scores(rows, None)


def test_the_leaderboard_says_how_it_ranks_what_sens_and_spec_are_a_shift_and_shared_patients():
    rows = [row("a", 4, val_auroc=0.99), row("b", 1, val_auroc=0.95)]  # a: test AUROC 0.92, val 0.99
    split = {"source_patients_across_splits": {"train-test": 170}, "pooled": False}
    shift = {"verdict": "shift in images: mean (+0.50 sd)", "shifted": {"images": True, "scores": False}}
    text = summary(rows, "auroc", Path("comparison"), [], {"split": split, "shift": shift})
    said = "Validation against test (shift stage): shift in images: mean (+0.50 sd). Validation cannot speak for"
    flat = text.replace("\n  ", " ")
    assert said in flat and "Validation cannot speak for the test set" in flat
    assert said in markdown(rows, "auroc", [], shift)
    # a measured report (the stage's always is): its domain classifier, the images on each side, where it is
    measured = shift | {"domain": {"auroc": 0.775, "ci95": [0.742, 0.806]}, "reference": {"name": "data/split:val",
                        "images": 1341}, "target": {"name": "data/split:test", "images": 624}}
    auroc = score_text(0.775, [0.742, 0.806])
    assert (f"\n\nDomain classifiers (0.5: indistinguishable): on the images, AUROC {auroc}; "
            "1341 images (data/split:val) against 624 (data/split:test). Report and figure: reports/shift.json, "
            "reports/shift.png.\n") in markdown(rows, "auroc", [], measured)
    # a classifier that tells the sets apart is in the verdict already: the line does not say it again
    quoted = measured | {"domain": measured["domain"] | {"different": True},
                         "verdict": f"shift in images: a classifier on the images tells them apart (AUROC {auroc})"}
    board = markdown(rows, "auroc", [], quoted)
    assert board.count(auroc) == 1
    assert "\n\nMeasured on 1341 images (data/split:val) against 624 (data/split:test)" in board
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
    from cxr.jobs.results import table

    names = list(params.load().variants or [])
    assert len(names) == 14
    rows = [row(v, i % 5, val_auroc=0.9 + i / 1000) for i, v in enumerate(names)]
    exps = [("workspace", rows, names[0], None), ("quick", rows, None, None)]  # named best by its run, or not
    for per_variant in (False, True):
        lines = table(exps, "auroc", per_variant, 120).splitlines()
        assert max(map(len, lines)) <= 120 and not any(line.startswith("Left out") for line in lines)
        assert len([line for line in lines if "[." in line]) == (28 if per_variant else 2)
    first, best = (line.split() for line in table(exps, "auroc", False, 120).splitlines() if "[." in line)
    assert first[:3] == ["workspace", names[0], "0.900"]  # the variant its compare stage named best
    assert best[:3] == ["quick", names[-1], "0.913"]  # else the highest val AUROC


def test_cxr_results_at_80_columns_leaves_out_the_least_important_scores_and_says_so():
    """Every line within 80 columns, every experiment's name whole; the score columns left out are named, with
    the width that shows them."""
    from cxr.jobs.results import table

    names = list(params.load().variants or [])
    rows = [row(v, i % 5, val_auroc=0.9 + i / 1000) for i, v in enumerate(names)]
    scores = ["val AUROC", "acc", "sens", "spec", "AUROC"]
    for exps, kept in (([("workspace", rows[2:3], None, None), ("quick", rows[:3], None, None)],
                        ["sens", "spec", "AUROC"]),  # a default run's names: acc and val go
                       ([("workspace", rows, None, None), ("a-long-experiment-name", rows[:3], None, None),
                         ("qui", rows[5:], None, None)], ["AUROC"])):  # long names: test AUROC is the last left
        for per_variant in (False, True):
            text = table(exps, "auroc", per_variant, 80)
            lines = text.splitlines()
            assert max(map(len, lines)) <= 80, text
            head = next(line for line in lines if line.startswith("experiment"))
            assert re.split(r"\s{2,}", head) == ["experiment", "variant", *kept], text
            body = lines[lines.index(head) + 1:]
            assert [line.split()[0] for line in body if line[:1] not in ("", " ")][:len(exps)] == \
                [name for name, *_ in exps], text  # every name whole, none cut
            assert "…" not in text
            note = " ".join(lines).split("Left out to fit 80 columns: ")[1]
            assert note.startswith(", ".join(s for s in scores if s not in kept) + ".")
            wide = int(re.search(r"COLUMNS=(\d+) cxr results", note)[1])
            assert ("cxr results --variants" in note) == per_variant and wide > 80
            full = table(exps, "auroc", per_variant, wide)  # at the width it names, every column
            assert max(map(len, full.splitlines())) <= wide and "Left out" not in full
            assert re.split(r"\s{2,}", next(line for line in full.splitlines() if line.startswith("experiment"))) \
                == ["experiment", "variant", *scores]


def test_cxr_results_says_why_two_experiments_have_the_same_scores():
    from cxr.jobs.results import outputs, table

    rows = [row("a", 1, val_auroc=0.95), row("b", 2, val_auroc=0.97)]
    other = [row("a", 1, val_auroc=0.95), row("b", 3, val_auroc=0.97)]
    # outputs as `dvc exp show --json` gives them; a variant the profile did not run has no hash
    lock = outputs({"outs": {"comparison": {"hash": "4f1c.dir", "size": 9}, "models/b_cnn5": {"hash": None}}})
    assert lock and outputs({"outs": {"comparison": {"hash": None}}}) is None  # a commit without its dvc.lock
    exps = [("workspace", rows, None, lock), ("quick", rows, None, lock), ("full", other, None, lock)]
    text = table(exps, "auroc", False, 120).replace("\n", " ")
    assert ("workspace = quick: the workspace holds quick's outputs: its dvc.lock records the same output hashes"
            in text), text
    assert "full" not in text.split("workspace = quick")[1]  # other scores: not in the line
    text = table([exps[1], ("copy", rows, None, lock)], "auroc", False, 120).replace("\n", " ")
    assert "quick = copy: the same outputs: their dvc.lock files record the same hashes." in text
    text = table([exps[0], ("rerun", rows, None, lock.replace("4f1c", "0000"))], "auroc", False, 120)
    assert "workspace = rerun: the same scores to the digits shown, from different outputs" in text.replace("\n", " ")
    text = table([exps[0], ("old", rows, None, None)], "auroc", False, 120).replace("\n", " ")
    assert "workspace = old: the same scores to the digits shown (DVC shows no outputs for some" in text
    said = re.compile(r"^\S+( = \S+)+: ", re.M)  # a line naming experiments alike
    assert not said.search(table(exps[1:], "auroc", False, 120))  # quick and full: b's scores differ
    # --variants compares every row: the same best row (b) but another a: alike in one row each, not in all
    x, y = ("x", rows, None, None), ("y", [row("a", 3, val_auroc=0.95), rows[1]], None, None)
    assert said.search(table([x, y], "auroc", False, 120)) and not said.search(table([x, y], "auroc", True, 120))
