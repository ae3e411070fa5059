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
