"""`cxr monitor LOG...`: the served model's prediction log (cxr.serving.PredictionLog: a JSON line per image it
scored) in consecutive windows of N lines, each against the model's validation set scored as the server scores
it: the score distribution (KS, PSI), the positive rate (with its Wilson interval), the image statistics (KS each)
and sensitivity and specificity estimated without labels from the calibrated probabilities (CBPE, as NannyML's).

No threshold is set by hand: each statistic's is a quantile of that statistic on windows of N images resampled
from the reference, compared with a resample of the reference itself (so that both sides' sampling variance is
in the null), all at one quantile level, chosen so that the share of those null windows in which any statistic
passes its threshold (the family-wise false-alarm rate per window) is FALSE_ALARM. The statistics are computed
from counts of resampled indices (one vectorised pass for a thousand windows); scipy's ks_2samp gives the same
KS statistic (tests/test_monitor.py)."""

from __future__ import annotations

import datetime
import json
import math
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from scipy import stats as scipy_stats

from cxr import shift, tracking
from cxr.data.store import images_digest, load_split, size_dir
from cxr.errors import CxrError
from cxr.inference import ModelCard, load_logged
from cxr.io import atomic_path, atomic_paths, write_json
from cxr.plots import plt
from cxr.serving import LOG_DECIMALS, LOG_ENV, identity, score

WINDOW = 100  # log lines per window
MIN_WINDOW = 10  # below this a window's KS and positive rate say little, however the thresholds are set
# null windows per window size: the thresholds sit near their 99th percentiles, which 1000 resamples place
# loosely (on fresh resamples the family-wise rate ran 4.5-6.8% over 5 seeds; with 4000, 4.6-5.7%)
RESAMPLES = 4000
FALSE_ALARM = 0.05  # family-wise: the share of windows like the reference in which some statistic alerts
SEED = 0
ALERT_EXIT = 3  # `cxr monitor`'s exit code on an alert: 1 is an error (a CxrError), 2 bad arguments (argparse)
BINS = 10  # PSI: bins at the reference's deciles of P(positive)
Z95 = 1.959963984540054
CHUNK = 250  # null windows per vectorised pass: bounds the (windows x distinct values) count matrices
CBPE_TOLERANCE = 0.05  # CBPE's mean error on the reference's own windows beyond this: a warning (no alert)
SCORE = "p_pneumonia"
NAMES = {"width": "width", "height": "height", "aspect": "aspect", "mean": "mean grey", "std": "grey sd",
         "sharpness": "sharpness", "border": "border grey", "marker": "corner markers"}
# Every statistic of a window against the reference, each larger = further from it (the drops are one-sided: an
# estimated sensitivity above the reference's is no alarm)
MEASURES = ("score_ks", "score_psi", "positive_rate_change", "sensitivity_drop", "specificity_drop",
            *(f"{k}_ks" for k in shift.STATS))
IMAGE_MEASURES = tuple(f"{k}_ks" for k in shift.STATS)
GROUPS = {"score_ks": "scores", "score_psi": "scores", "positive_rate_change": "positive rate",
          "sensitivity_drop": "estimated sensitivity", "specificity_drop": "estimated specificity",
          **{f"{k}_ks": v for k, v in NAMES.items()}}  # what the verdict counts windows by
COLUMNS = ("p", "positive", *shift.STATS)  # a table of images: P(positive), the decision, the statistics
SIZES = ("width", "height", "aspect")  # of the original file; the others: pixel_stats of what the model saw
GREY = tuple(k for k in shift.STATS if k not in SIZES)


@dataclass
class Reference:
    """The images the windows are compared with, as the model scores them: COLUMNS per image, labels (1 the
    positive class) where known, and the decile edges of P(positive) that PSI bins by."""

    name: str
    columns: dict[str, np.ndarray]
    labels: np.ndarray | None
    edges: np.ndarray
    warnings: list[str]


@dataclass
class Logs:
    """The prediction log as read: the lines that parse (JSON objects with a time and a model_id), in time order,
    the files, and per file the lines that did not parse (a torn line after a full disk, garbage)."""

    lines: list[dict[str, Any]]
    files: list[Path]
    skipped: dict[str, int]


# --- the statistics -------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share k/n (95% by default): unlike the normal approximation it stays
    inside [0, 1] and keeps its coverage near 0 and 1, where a window's positive rate may well be."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cbpe(p: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity expected from calibrated P(positive) `p` and the decisions (last axis: the
    images), as NannyML's confidence-based performance estimation: each image counts p as a positive and 1 - p as
    a negative, so TP = sum p*d, FN = sum p*(1-d), TN = sum (1-p)(1-d), FP = sum (1-p)*d. It holds where only the
    mix of images changed (the model's calibration carries over), not where they look different."""
    p, d = np.asarray(p, float), np.asarray(positive, float)
    tp, fn = (p * d).sum(-1), (p * (1 - d)).sum(-1)
    tn, fp = ((1 - p) * (1 - d)).sum(-1), ((1 - p) * d).sum(-1)
    return tp / np.maximum(tp + fn, 1e-12), tn / np.maximum(tn + fp, 1e-12)


def decile_edges(reference: np.ndarray, bins: int = BINS) -> np.ndarray:
    return np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])


def _psi_of_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSI per row of bin counts (reference `a`, window `b`); half a count added to every bin, so that a bin a
    small window leaves empty adds a finite amount (the thresholds, resampled, account for what it adds)."""
    sa = (a + 0.5) / (a.sum(1, keepdims=True) + 0.5 * a.shape[1])
    sb = (b + 0.5) / (b.sum(1, keepdims=True) + 0.5 * b.shape[1])
    return ((sb - sa) * np.log(sb / sa)).sum(1)


def psi(reference: np.ndarray, target: np.ndarray, bins: int = BINS) -> float:
    """The population stability index of `target` against `reference`, in `bins` bins at the reference's
    quantiles (deciles): sum over bins of (target share - reference share) * ln(target share / reference
    share)."""
    edges = decile_edges(reference, bins)
    a, b = (np.bincount(np.searchsorted(edges, x, side="right"), minlength=bins)[None] for x in (reference, target))
    return float(_psi_of_counts(a, b)[0])


def _counts(codes: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """(B, m): per row of `rows` (indices into `codes`), how many of its items have each code 0..m-1."""
    flat = (np.arange(len(rows))[:, None] * m + codes[rows]).ravel()
    return np.bincount(flat, minlength=len(rows) * m).reshape(len(rows), m)


def _ks(values: np.ndarray, ri: np.ndarray, wi: np.ndarray) -> np.ndarray:
    """The two-sample KS statistic of values[wi[b]] against values[ri[b]] per row b: the largest gap of the two
    empirical distribution functions over the distinct values (ties in both: exactly scipy's ks_2samp)."""
    distinct, codes = np.unique(values, return_inverse=True)
    a = _counts(codes, ri, len(distinct)).cumsum(1) / ri.shape[1]
    b = _counts(codes, wi, len(distinct)).cumsum(1) / wi.shape[1]
    return np.abs(a - b).max(1)


def measure(pool: dict[str, np.ndarray], ri: np.ndarray, wi: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(B, MEASURES): every statistic of B windows against B references, given as rows of indices into the
    table `pool` ((B, n) and (B, R)). A window observed: one row, the pool the reference then the window; the
    null: rows of resampled indices into the reference alone. One code path for both."""
    p, pos = pool["p"], pool["positive"].astype(float)
    bins = np.searchsorted(edges, p, side="right")
    psi_rows = _psi_of_counts(_counts(bins, ri, BINS), _counts(bins, wi, BINS))
    (sens_r, spec_r), (sens_w, spec_w) = cbpe(p[ri], pos[ri]), cbpe(p[wi], pos[wi])
    cols = [_ks(p, ri, wi), psi_rows, np.abs(pos[wi].mean(1) - pos[ri].mean(1)), sens_r - sens_w, spec_r - spec_w]
    # rounded: a window's statistic equal to a threshold must compare equal, whatever order the sums ran in
    return np.round(np.stack(cols + [_ks(pool[k], ri, wi) for k in shift.STATS], 1), 10)


def null_measures(ref: Reference, size: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, MEASURES) on windows of `size` drawn from the reference with replacement, each against a
    resample of the reference (of its own size): what the statistics do where nothing changed, both sides'
    sampling variance included. Whole images are drawn, so the statistics keep their correlations."""
    rng = np.random.default_rng(seed)
    n_ref = len(ref.columns["p"])
    out = []
    for start in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - start)
        out.append(measure(ref.columns, rng.integers(0, n_ref, (b, n_ref)), rng.integers(0, n_ref, (b, size)),
                           ref.edges))
    return np.concatenate(out)


def thresholds(null: np.ndarray, rate: float = FALSE_ALARM) -> tuple[np.ndarray, float, float]:
    """Per statistic (a column of `null`: its values on the null windows), the value above which a window
    alerts: all at one quantile level, the lowest at which the share of null windows with any statistic above its
    threshold is at most `rate`: the maximum over the statistics of each window's rank, calibrated. Bonferroni
    (rate / statistics each) would assume the statistics independent; the scores' KS and PSI, the positive rate
    and the estimated sensitivity move together, so it would alert less often than it says. Returns the
    thresholds, the quantile level and the family-wise rate achieved on the null windows (ties: below `rate`)."""
    null = np.nan_to_num(null, nan=-np.inf)  # an undefined statistic never alerts
    ordered = np.sort(null, 0)
    # per window and statistic, how many null windows lie strictly below it: it passes threshold ordered[j] iff
    # that count exceeds j, so a window alerts at level j iff the largest of its counts does
    below = np.stack([np.searchsorted(ordered[:, k], null[:, k], side="left") for k in range(null.shape[1])], 1)
    top = below.max(1)
    j = int(np.sort(top)[len(top) - math.floor(rate * len(top)) - 1])
    return ordered[j], (j + 1) / len(top), float((top > j).mean())


def unseen_floor(n_ref: int, size: int, level: float) -> float:
    """The least a KS threshold can be: resamples never hold a kind of image the reference lacks, so a statistic
    constant in it (every Kaggle image 224 px wide, no corner marker at 32 px) gets a threshold of 0, and one such
    image in a window would alert. Yet a kind never seen in R images may still be up to 3/R of the population (the
    rule of three: a 95% upper bound); a window of `size` holds at most the `level` quantile of Binomial(size, 3/R)
    of them by chance, and KS counts each as 1/size."""
    return float(scipy_stats.binom.ppf(level, size, min(1.0, 3 / n_ref))) / size


def calibrate(ref: Reference, size: int, rate: float, resamples: int, seed: int) -> dict[str, Any]:
    """The thresholds for windows of `size` (thresholds(), the KS ones at least unseen_floor) and the family-wise
    false-alarm rate they give on the null windows."""
    null = null_measures(ref, size, resamples, seed)
    values, level, _ = thresholds(null, rate)
    floor = unseen_floor(len(ref.columns["p"]), size, level)
    values = np.array([max(v, floor) if k.endswith("_ks") else v for k, v in zip(MEASURES, values, strict=True)])
    return {"window": size, "quantile": level, "false_alarm_rate": float((null > values).any(1).mean()),
            "ks_floor": floor, "thresholds": {k: float(v) for k, v in zip(MEASURES, values, strict=True)}}


# --- the log ------------------------------------------------------------------------------------------------


def log_files(paths: list[Path]) -> list[Path]:
    """The files given, and the *.jsonl files in the folders given (recursively), in name order: the log's
    files are named by date."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(f for f in path.rglob("*.jsonl") if f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise CxrError(f"{path}: no such file or folder; give prediction log files or their folder (${LOG_ENV})")
    if not files:
        raise CxrError(f"no *.jsonl files in {', '.join(map(str, paths))}; give the prediction log's folder "
                       f"(${LOG_ENV} where the model was served)")
    return files


def parse(line: str) -> dict[str, Any] | None:
    """A log line as a dict with its time parsed (`_time`, UTC), or None where it is not one (torn, garbage)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("model_id"), str) or not isinstance(row.get("time"), str):
        return None
    try:
        when = datetime.datetime.fromisoformat(row["time"])
    except ValueError:
        return None
    row["_time"] = when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
    return row


def read_logs(paths: list[Path]) -> Logs:
    """Every line of the log files (or folders) `paths` that parses, in time order (stable: lines of one time
    keep their order in the files); lines that do not are counted per file, never fatal."""
    files = log_files(paths)
    lines: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    for f in files:
        with f.open(encoding="utf-8", errors="replace") as text:  # a torn multi-byte character: one bad line
            for raw in text:
                if not raw.strip():
                    continue
                row = parse(raw)
                if row is None:
                    skipped[str(f)] = skipped.get(str(f), 0) + 1
                else:
                    lines.append(row)
    lines.sort(key=lambda r: r["_time"])
    return Logs(lines, files, skipped)


def _number(row: dict[str, Any], key: str) -> float:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(key)
    return float(value)


def table(lines: list[dict[str, Any]], positive: str) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], int]:
    """The model's lines as COLUMNS (aspect from width and height, as shift.image_stats has it), the lines
    kept, and how many were malformed (a field missing or not a number): skipped like torn lines."""
    rows, kept = [], []
    for line in lines:
        try:
            p = _number(line, SCORE)
            w, h = _number(line, "width"), _number(line, "height")
            if not 0 <= p <= 1 or w <= 0 or h <= 0 or not isinstance(line.get("decision"), str):
                raise ValueError(SCORE)
            values = {"p": p, "positive": line["decision"] == positive, "width": w, "height": h, "aspect": w / h,
                      **{k: _number(line, k) for k in GREY}}
            rows.append([values[k] for k in COLUMNS])
            kept.append(line)
        except (KeyError, ValueError):
            continue
    cols = np.array(rows, float).reshape(len(rows), len(COLUMNS))
    out = {k: cols[:, i] for i, k in enumerate(COLUMNS)}
    out["positive"] = out["positive"].astype(bool)
    return out, kept, len(lines) - len(kept)


def others(lines: list[dict[str, Any]], model_id: str) -> dict[str, dict[str, Any]]:
    """The other models in the log: per model_id its lines and the registered name and version they carry."""
    counts = Counter(r["model_id"] for r in lines if r["model_id"] != model_id)
    named = {r["model_id"]: (r.get("model") or "", str(r.get("version") or "")) for r in lines}
    return {m: {"lines": n, "model": named[m][0], "version": named[m][1]} for m, n in counts.most_common()}


def iso_since(since: str) -> str:
    """`since` (a date, or a date and time, in UTC) as the log's times begin: compared as strings, like them."""
    if not since:
        return ""
    try:
        when = datetime.datetime.fromisoformat(since.removesuffix("Z"))
    except ValueError:
        raise CxrError(f"--since {since!r}: give a date or time in UTC, e.g. 2026-12-01 or 2026-12-01T08:00") from None
    return when.isoformat(timespec="milliseconds")


def no_line_of(uri: str, model_id: str, logs: Logs, since: str = "") -> CxrError:
    """The one-line error where no line is of the model: which models the log holds and the --model to give."""
    if since and any(r["model_id"] == model_id for r in logs.lines):
        last = max(r["time"] for r in logs.lines if r["model_id"] == model_id)
        return CxrError(f"no line of {uri} (model_id {model_id}) since {since}: its last is from {last}; give an "
                        "earlier --since")
    found = others(logs.lines, model_id)
    if not found:
        return CxrError(f"no line of {', '.join(map(str, logs.files))} parses as a prediction log line "
                        f"({sum(logs.skipped.values())} skipped); give the folder ${LOG_ENV} names")
    said = ", ".join(f"{m} ({v['model'] + ' version ' + v['version'] + ', ' if v['version'] else ''}{v['lines']} "
                     "lines)" for m, v in list(found.items())[:5])
    top, first = next(iter(found.items()))
    fix = f"models:/{first['model']}/{first['version']}" if first["version"] else f"models:/{top}"
    return CxrError(f"no line of the prediction log is from {uri} (model_id {model_id}); it holds {said}: give "
                    f"--model {fix} to monitor the model that served them")


def windows(n: int, size: int) -> list[slice]:
    """Consecutive windows of `size` lines; the rest as a last, partial window if it holds half a window or
    more (it gets thresholds of its own size), else dropped."""
    spans = [slice(i, i + size) for i in range(0, n - size + 1, size)]
    rest = n - len(spans) * size
    return spans + ([slice(n - rest, n)] if rest and 2 * rest >= size else [])


# --- the reference ------------------------------------------------------------------------------------------


def rounded(values: np.ndarray) -> np.ndarray:
    # the log rounds its grey statistics to LOG_DECIMALS: the reference's alike (Python's round, as the writer's),
    # or KS sees the rounding
    return np.array([round(float(v), LOG_DECIMALS) for v in values])


def load_reference(spec: str, model: Any, card: ModelCard) -> Reference:
    """The reference images (shift.load_set) scored through serving.score as the server scores them, with the
    image statistics the log carries; a warning where a prepared split is not the model's validation set."""
    s = shift.load_set(spec, card.image_size, card.fit, card.draft, card.equalize)
    if len(s.images) < 2 * MIN_WINDOW:
        raise CxrError(f"{spec} holds {len(s.images)} images: too few to compare windows with; give a larger "
                       "--reference (default data/split:val, the model's validation set)")
    rows = score(model, card, list(s.images))
    stats = shift.image_stats(s)
    columns = {"p": np.array([r[SCORE] for r in rows]), "positive": np.array([r["class"] == 1 for r in rows]),
               **{k: rounded(v) if k in GREY else v for k, v in stats.items()}}
    labels = None if s.labels is None else (s.labels > 0)
    return Reference(spec, columns, labels, decile_edges(columns["p"]), digest_warning(spec, card))


def digest_warning(spec: str, card: ModelCard) -> list[str]:
    """Where the reference is a prepared split (DATA_DIR:SPLIT) and the card records its validation images: a
    warning if they are not the same images."""
    path, _, split = spec.partition(":")
    if not split or path.endswith(".npz") or not card.val_digest:
        return []
    digest = images_digest(load_split(size_dir(path, card.image_size), split, mmap=True).meta)
    if digest == card.val_digest:
        return []
    return [f"{spec} is not the set {card.variant} was validated on (images digest {digest[:12]}, the card's "
            f"{card.val_digest[:12]}): the windows are compared with it all the same; rebuild the data the model "
            "was trained from (`dvc repro`) or give --reference"]


def reference_figures(ref: Reference, size: int, resamples: int, seed: int) -> dict[str, Any]:
    """The reference's positive rate, estimated (CBPE) sensitivity and specificity and, where it is labelled,
    its prevalence and true figures, and how far CBPE was from the truth on `resamples` windows of `size` drawn
    from it: the check that the model's probabilities are calibrated enough for CBPE to be read."""
    p, pos = ref.columns["p"], ref.columns["positive"]
    sens, spec = cbpe(p, pos)
    out: dict[str, Any] = {"name": ref.name, "images": len(p), "positive_rate": float(pos.mean()),
                           "cbpe_sensitivity": float(sens), "cbpe_specificity": float(spec), "prevalence": None,
                           "sensitivity": None, "specificity": None, "cbpe_check": None}
    y = ref.labels
    if y is None or y.all() or not y.any():
        return out
    out |= {"prevalence": float(y.mean()), "sensitivity": float(pos[y].mean()), "specificity": float((~pos[~y]).mean())}
    wi = np.random.default_rng(seed + 1).integers(0, len(p), (resamples, size))
    yw, dw = y[wi], pos[wi]
    with np.errstate(invalid="ignore", divide="ignore"):  # a window without one class: no true figure, left out
        true = ((yw & dw).sum(1) / yw.sum(1), (~yw & ~dw).sum(1) / (~yw).sum(1))
    est = cbpe(p[wi], dw)
    check = {"windows": resamples, "window": size}
    for name, t, e in zip(("sensitivity", "specificity"), true, est, strict=True):
        err = (e - t)[np.isfinite(t)]
        check |= {f"{name}_bias": float(err.mean()), f"{name}_mean_abs_error": float(np.abs(err).mean())}
    out["cbpe_check"] = check
    return out


def cbpe_warning(figures: dict[str, Any]) -> list[str]:
    """A warning where CBPE, on windows drawn from the labelled reference, strays on average by more than
    CBPE_TOLERANCE from the truth: the probabilities are not calibrated on it, and its estimates are biased."""
    c = figures["cbpe_check"]
    if c is None or max(abs(c["sensitivity_bias"]), abs(c["specificity_bias"])) <= CBPE_TOLERANCE:
        return []
    return [f"on windows of {figures['name']} CBPE is off by {_pair(c, '_bias')} on average (sensitivity and "
            "specificity): the model's probabilities are not calibrated on it, so read the estimates as changes, "
            "not as levels; is it the set the model was validated on?"]


def window_result(index: int, cols: dict[str, np.ndarray], lines: list[dict[str, Any]], ref: Reference,
                  cal: dict[str, Any]) -> dict[str, Any]:
    """One window's statistics against the reference, which passed their thresholds and, in words, what moved."""
    n_ref, n = len(ref.columns["p"]), len(cols["p"])
    pool = {k: np.concatenate([ref.columns[k], cols[k]]) for k in COLUMNS}
    values = dict(zip(MEASURES, measure(pool, np.arange(n_ref)[None], n_ref + np.arange(n)[None], ref.edges)[0]
                      .tolist(), strict=True))
    limits = cal["thresholds"]
    over = [k for k in MEASURES if values[k] > limits[k]]
    k = int(cols["positive"].sum())
    sens, spec = cbpe(cols["p"], cols["positive"])
    return {"index": index, "start": lines[0]["time"], "end": lines[-1]["time"], "lines": n,
            **values, "positive_rate": k / n, "positive_rate_ci95": list(wilson(k, n)),
            "cbpe_sensitivity": float(sens), "cbpe_specificity": float(spec),
            "unreliable": any(m in IMAGE_MEASURES for m in over), "alert": bool(over), "exceeded": over,
            "moved": moved(values, limits, over, k / n, wilson(k, n), float(ref.columns["positive"].mean()))}


def moved(values: dict[str, float], limits: dict[str, float], over: list[str], rate: float,
          ci: tuple[float, float], ref_rate: float) -> list[str]:
    """What passed its threshold, in words: 'scores (KS 0.31 > 0.17)', 'positive rate 0.93 [0.86-0.97] vs 0.52',
    'mean grey (KS 0.40 > 0.20)'."""
    words = []
    scores = [f"{name} {values[k]:.2f} > {limits[k]:.2f}" for k, name in (("score_ks", "KS"), ("score_psi", "PSI"))
              if k in over]
    if scores:
        words.append(f"scores ({', '.join(scores)})")
    if "positive_rate_change" in over:
        words.append(f"positive rate {rate:.2f} [{ci[0]:.2f}-{ci[1]:.2f}] vs {ref_rate:.2f}")
    for k, name in (("sensitivity_drop", "sensitivity"), ("specificity_drop", "specificity")):
        if k in over:
            words.append(f"estimated {name} (down {values[k]:.2f} > {limits[k]:.2f})")
    return words + [f"{NAMES[k[:-3]]} (KS {values[k]:.2f} > {limits[k]:.2f})" for k in IMAGE_MEASURES if k in over]


def analyse(cols: dict[str, np.ndarray], lines: list[dict[str, Any]], ref: Reference, size: int, rate: float,
            resamples: int, seed: int) -> dict[str, Any]:
    """The windows of the model's lines against the reference, with the thresholds of each window size, and a
    verdict: the whole monitor apart from reading and writing."""
    spans = windows(len(lines), size)
    if not spans:
        raise CxrError(f"{len(lines)} lines of the model: fewer than half a window of {size}; give --window "
                       f"{max(len(lines), MIN_WINDOW)} or wait for more predictions")
    cal = {n: calibrate(ref, n, rate, resamples, seed) for n in sorted({s.stop - s.start for s in spans})}
    results = [window_result(i + 1, {k: v[s] for k, v in cols.items()}, lines[s], ref, cal[s.stop - s.start])
               | {"partial": s.stop - s.start < size} for i, s in enumerate(spans)]
    figures = reference_figures(ref, size, resamples, seed)
    return {"settings": {"window": size, "resamples": resamples, "seed": seed, "false_alarm_rate": rate,
                         "windows": len(results), "lines_left_out": len(lines) - spans[-1].stop},
            "thresholds": {"how": HOW, "by_window": {str(n): c for n, c in cal.items()}},
            "reference": figures | {"warnings": ref.warnings + cbpe_warning(figures)},
            "windows": results, "verdict": verdict(results, rate)}


HOW = ("each statistic's quantile, at one level for all, on windows of the same size drawn with replacement from "
       "the reference and compared with a resample of the reference itself; the level is the lowest at which the "
       "share of those windows in which any statistic passes its threshold (the family-wise false-alarm rate per "
       "window) is at most the rate asked (the maximum over the statistics of each window's rank, calibrated); "
       "a KS threshold is at least ks_floor, the share of images of a kind the reference never showed that a "
       "window may hold by chance (rule of three)")


def chance_allows(n: int, rate: float) -> int:
    """The most of n windows like the reference that alert by chance alone, 95 times in 100, at `rate` each."""
    return int(scipy_stats.binom.ppf(0.95, n, rate))


def verdict(results: list[dict[str, Any]], rate: float) -> str:
    """ALERT where more windows alerted than chance explains: at a rate per window, a long healthy log has some
    (at 5%, one of 20 windows at least 64 times in 100), and the exit code must not grow with the log's length."""
    alerts = [w for w in results if w["alert"]]
    if not alerts:
        which = "the one window looks" if len(results) == 1 else f"all {len(results)} windows look"
        return f"no alert: {which} like the reference (at a {rate:.0%} family-wise false-alarm rate per window)"
    allowed = chance_allows(len(results), rate)
    counts = Counter(group for w in alerts for group in dict.fromkeys(GROUPS[k] for k in w["exceeded"]))
    what = ", ".join(f"{k} in {n}" for k, n in counts.most_common())
    head = f"ALERT in {len(alerts)} of {len(results)} windows" if len(alerts) > allowed else \
        f"no alert: {len(alerts)} of {len(results)} windows alerted, no more than chance explains"
    return (f"{head}, the first from {alerts[0]['start']}: moved: {what} (at a {rate:.0%} false-alarm rate per "
            f"window, chance alone explains up to {allowed} of {len(results)}, 95 times in 100)")


def _when(time: str) -> str:
    return time[:19].replace("T", " ")  # to the second, for a terminal's columns


def _pair(r: dict[str, Any], key: str) -> str:
    return f"{r[f'sensitivity{key}']:+.3f} and {r[f'specificity{key}']:+.3f}"


def reference_line(r: dict[str, Any], positive: str) -> str:
    """The reference in a sentence: its size, prevalence, what the model calls it, its true and estimated
    sensitivity and specificity, and how far CBPE strayed from the truth on windows drawn from it."""
    head = f"Reference {r['name']}: {r['images']} images"
    called = f"called {positive} {r['positive_rate']:.3f}"
    cbpe_ = f"sensitivity {r['cbpe_sensitivity']:.3f} and specificity {r['cbpe_specificity']:.3f} estimated (CBPE)"
    if r["prevalence"] is None:
        return f"{head} (unlabelled), {called}; {cbpe_}."
    c = r["cbpe_check"]
    return (f"{head}, prevalence {r['prevalence']:.3f}, {called}; sensitivity {r['sensitivity']:.3f}, specificity "
            f"{r['specificity']:.3f} ({cbpe_}; on {c['windows']} windows of {c['window']} drawn from it, CBPE was off "
            f"by {_pair(c, '_bias')} on average, {c['sensitivity_mean_abs_error']:.3f} and "
            f"{c['specificity_mean_abs_error']:.3f} in absolute value).")


def threshold_line(cal: dict[str, Any], rate: float, resamples: int) -> str:
    t = cal["thresholds"]
    images = ", ".join(f"{NAMES[k[:-3]]} {t[k]:.2f}" for k in IMAGE_MEASURES)
    return (f"Alert thresholds for windows of {cal['window']}: each statistic's {cal['quantile']:.2%} quantile on "
            f"{resamples} windows resampled from the reference (against a resample of it), a family-wise "
            f"false-alarm rate of {cal['false_alarm_rate']:.1%} per window (asked {rate:.0%}): scores KS "
            f"{t['score_ks']:.2f}, PSI {t['score_psi']:.2f}; positive rate +-{t['positive_rate_change']:.2f}; "
            f"estimated sensitivity -{t['sensitivity_drop']:.2f}, specificity -{t['specificity_drop']:.2f}; "
            f"KS of the images' {images}.")


def log_line(g: dict[str, Any]) -> str:
    """The log in a sentence: the lines used, skipped, of other models and left out."""
    parts = [f"Log: {g['used']} lines of this model, {_when(g['first'])} to {_when(g['last'])}, in {g['files']} "
             f"file{'s' * (g['files'] != 1)}"]
    if g["skipped"]:
        parts.append(f"{g['skipped']} lines that do not parse skipped")
    if g["malformed"]:
        parts.append(f"{g['malformed']} of its lines malformed (a field missing or not a number), skipped")
    if g["other_models"]:
        ids = ", ".join(f"{m} ({v['lines']})" for m, v in list(g["other_models"].items())[:3])
        more = ", ..." if len(g["other_models"]) > 3 else ""
        parts.append(f"{sum(v['lines'] for v in g['other_models'].values())} lines of other models left out: "
                     f"{ids}{more}")
    if g["left_out"]:
        parts.append(f"the last {g['left_out']} lines left out (under half a window)")
    return "; ".join(parts) + "."


HEADER = (f"{'window':>6}  {'from':<19}  {'to':<19}  {'lines':>6}  {'KS':>5}  {'PSI':>5}  {'positive [95%]':<17}  "
          f"{'sens~':>6}  {'spec~':>6}  alert: what moved")


def row(w: dict[str, Any]) -> str:
    lo, hi = w["positive_rate_ci95"]
    doubt = "?" if w["unreliable"] else " "
    return (f"{w['index']:>6}  {_when(w['start'])}  {_when(w['end'])}  {w['lines']:>5}{'p' if w['partial'] else ' '}"
            f"  {w['score_ks']:5.2f}  {w['score_psi']:5.2f}  {w['positive_rate']:.2f} [{lo:.2f}-{hi:.2f}]  "
            f"{w['cbpe_sensitivity']:6.3f}{doubt} {w['cbpe_specificity']:6.3f}{doubt} "
            f"{'ALERT: ' + ', '.join(w['moved']) if w['alert'] else ''}").rstrip()


def render(result: dict[str, Any]) -> str:
    """The terminal's report: the model, the log, the reference and the thresholds in a few sentences, a row per
    window, the verdict."""
    m, s = result["model"], result["settings"]
    name = f"{m['name']} version {m['version']}, " if m["version"] else ""
    head = [f"{m['uri']} ({name}model_id {m['model_id']}, {m['variant']}): {m['positive']} where "
            f"P({m['positive'].lower()}) > {m['threshold']:.4f}.", log_line(result["logs"]),
            reference_line(result["reference"], m["positive"]),
            threshold_line(result["thresholds"]["by_window"][str(s["window"])], s["false_alarm_rate"],
                           s["resamples"]),
            *(f"Warning: {w}" for w in result["reference"]["warnings"])]
    foot = [f"KS and PSI: of P({m['positive'].lower()}) against the reference's; positive: the share called "
            f"{m['positive']}, with its Wilson 95% interval; sens~, spec~: sensitivity and specificity estimated "
            "without labels (CBPE), '?' where the images changed, which the estimate assumes they did not; 'p': a "
            "last, partial window (thresholds of its own size).", f"Verdict: {result['verdict']}"]
    if "mlflow" in result:
        run = result["mlflow"].get("link") or f"not logged ({result['mlflow']['error']})"
        foot.append(f"Report and figure: {result['files']['json']}, {result['files']['png']}; MLflow run {run}")
    return "\n".join([*map(_fill, head), "", HEADER, *map(row, result["windows"]), "", *map(_fill, foot)]) + "\n"


def _fill(text: str) -> str:
    return textwrap.fill(text, 120, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)


def _limits(result: dict[str, Any], key: str) -> list[float]:
    """Each window's threshold of statistic `key` (a partial window has its own)."""
    return [result["thresholds"]["by_window"][str(w["lines"])]["thresholds"][key] for w in result["windows"]]


def _ratio(value: float, limit: float) -> float:
    """A statistic over its threshold (above 1: alert), capped for the axis; a threshold of 0 (a statistic
    constant in the reference, e.g. every image 224 px wide): 0 where it stayed, the cap where it moved."""
    return min(value / limit, 4.0) if limit > 0 else (4.0 if value > 0 else 0.0)


def figure(result: dict[str, Any]) -> Figure:
    """A panel each for the scores (KS, PSI), the positive rate (interval band, the reference's rate and
    prevalence), the estimated sensitivity and specificity (unreliable windows hollow) and the image statistics
    (KS over its threshold); thresholds dashed, alerting windows shaded red in every panel."""
    ws, ref = result["windows"], result["reference"]
    x = np.array([w["index"] for w in ws])
    fig, axes = plt.subplots(4, 1, figsize=(12, 10.5), sharex=True, layout="constrained")
    for key, label, color in (("score_ks", "KS", "C0"), ("score_psi", "PSI", "C1")):
        axes[0].plot(x, [w[key] for w in ws], "o-", ms=3, color=color, label=f"P: {label}")
        axes[0].step(x, _limits(result, key), "--", where="mid", color=color, label=f"{label} threshold")
    axes[0].set_title("scores against the reference's", fontsize=9)
    rate = np.array([w["positive_rate"] for w in ws])
    band = np.array([w["positive_rate_ci95"] for w in ws])
    axes[1].fill_between(x, band[:, 0], band[:, 1], color="C0", alpha=0.2, step="mid", label="95% interval")
    axes[1].plot(x, rate, "o-", ms=3, color="C0", label="positive rate")
    axes[1].axhline(ref["positive_rate"], color="k", lw=1, label="reference's positive rate")
    change = np.array(_limits(result, "positive_rate_change"))
    for sign in (-1, 1):
        axes[1].step(x, ref["positive_rate"] + sign * change, "--", where="mid", color="k", lw=1,
                     label="thresholds" if sign > 0 else None)
    if ref["prevalence"] is not None:
        axes[1].axhline(ref["prevalence"], color="grey", lw=1, ls=":", label="reference's prevalence")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title(f"share called {result['model']['positive']}", fontsize=9)
    _cbpe_panel(axes[2], x, ws, ref, {k: _limits(result, f"{k}_drop") for k in ("sensitivity", "specificity")})
    for k in IMAGE_MEASURES:
        axes[3].plot(x, [_ratio(w[k], t) for w, t in zip(ws, _limits(result, k), strict=True)], "o-", ms=3, lw=1,
                     label=NAMES[k[:-3]])
    axes[3].axhline(1, color="k", ls="--", lw=1)
    axes[3].set_title("image statistics: KS over its threshold (above 1: alert; capped at 4)", fontsize=9)
    for w in ws:
        if w["alert"]:
            for ax in axes:
                ax.axvspan(w["index"] - 0.5, w["index"] + 0.5, color="red", alpha=0.08, lw=0)
    for ax in axes:  # beside the panels, never over a window's point
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    axes[3].set_xlabel(f"window ({result['settings']['window']} log lines each, in time order: {_when(ws[0]['start'])}"
                       f" to {_when(ws[-1]['end'])})")
    axes[3].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("\n".join(textwrap.wrap(f"{result['model']['uri']}: {result['verdict']}", 130)), fontsize=9)
    return fig


def _cbpe_panel(ax: Any, x: np.ndarray, ws: list[dict[str, Any]], ref: dict[str, Any],
                limits: dict[str, list[float]]) -> None:
    """The estimates per window (hollow where the images moved), the reference's true figures (dotted) and the
    thresholds (dashed: the reference's own estimate less the drop that alerts)."""
    doubt = np.array([w["unreliable"] for w in ws], bool)
    for key, color in (("sensitivity", "C2"), ("specificity", "C3")):
        y = np.array([w[f"cbpe_{key}"] for w in ws])
        ax.plot(x, y, "-", color=color, lw=1)
        ax.plot(x[~doubt], y[~doubt], "o", ms=4, color=color, label=f"{key} (CBPE)")
        if doubt.any():
            ax.plot(x[doubt], y[doubt], "o", ms=5, mfc="none", color=color, label=f"{key}: unreliable (images moved)")
        truth = ref[key] if ref[key] is not None else ref[f"cbpe_{key}"]
        ax.axhline(truth, color=color, ls=":", lw=1, label=f"reference's {key}")
        ax.step(x, ref[f"cbpe_{key}"] - np.array(limits[key]), "--", where="mid", color=color, lw=1,
                label=f"{key}: alert below")
    ax.set_title("sensitivity and specificity estimated without labels", fontsize=9)


def window_metrics(result: dict[str, Any], now: int) -> list[Metric]:
    """Per window (step = its index): every statistic, the positive rate, the estimates, whether it alerted."""
    keys = (*MEASURES, "positive_rate", "cbpe_sensitivity", "cbpe_specificity")
    return [Metric(k, float(w[k]), now, w["index"]) for w in result["windows"] for k in keys] + \
        [Metric("alert", float(w["alert"]), now, w["index"]) for w in result["windows"]]


def record(result: dict[str, Any], out: Path, experiment: str) -> None:
    """out/monitor.json and out/monitor.png (both or neither), then an MLflow run in `experiment` tied to the model
    by tags (its registered name, version and model_id: MLflow links a run to a model as its input on Databricks
    only), with every window's figures as metrics (step = window) and the two files as artifacts. An MLflow that
    does not answer costs the run, not the report: result["mlflow"] says why."""
    result["files"] = {"json": str(out / "monitor.json"), "png": str(out / "monitor.png")}
    with atomic_paths(out / "monitor.json", out / "monitor.png") as (js, png):
        write_json(js, result)
        fig = figure(result)
        fig.savefig(png, dpi=90, format="png")
        plt.close(fig)
    try:
        result["mlflow"] = log_run(result, out, experiment)
    except (MlflowException, OSError) as e:
        result["mlflow"] = {"error": tracking.store_and_error(e)}
    with atomic_path(out / "monitor.json") as tmp:  # again, with the run
        write_json(tmp, result)


def log_run(result: dict[str, Any], out: Path, experiment: str) -> dict[str, str]:
    m = result["model"]
    tags = {"job": "monitor", "registered_model": m["name"], "model_version": m["version"], "model_id": m["model_id"],
            "variant": m["variant"], "monitor.verdict": result["verdict"][:5000], "monitor.alert": str(bool(
                result["exit_code"])), tracking.NOTE: f"`cxr monitor` of {m['uri']}: {result['verdict']}"}
    exp_id = tracking.setup(experiment)
    name = f"monitor {m['name']} v{m['version']}" if m["version"] else f"monitor {m['model_id']}"
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags={k: v for k, v in tags.items() if v}) as run:
        s = result["settings"]
        mlflow.log_params({"logs": " ".join(result["logs"]["paths"])[:6000], "reference": result["reference"]["name"],
                           **{k: s[k] for k in ("window", "resamples", "seed", "false_alarm_rate")}})
        metrics, client = window_metrics(result, int(datetime.datetime.now().timestamp() * 1000)), MlflowClient()
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
        mlflow.log_artifact(str(out / "monitor.json"))
        mlflow.log_artifact(str(out / "monitor.png"))
    return {"run_id": run.info.run_id, "experiment_id": exp_id,
            "link": tracking.ui_link(f"experiments/{exp_id}/runs/{run.info.run_id}", tracking.ui_base())}


def resolve(uri: str) -> tuple[dict[str, str], str]:
    """{model, version, model_id} of `uri`, as the log lines carry them (serving.identity), and the URI pinned to
    that version: the alias is resolved once, so a promotion meanwhile cannot swap the model halfway."""
    try:
        who = identity(uri)
    except (MlflowException, OSError) as e:
        raise CxrError(f"cannot resolve {uri} in {tracking.store_and_error(e)}; give --model a registered version "
                       "(models:/<name>/<version>) or a logged model (models:/m-<id>), or promote a champion "
                       "first (`cxr promote`)") from e
    return who, tracking.model_uri(who["model"], who["version"]) if who["version"] else uri


def log_facts(paths: list[Path], found: Logs, model_id: str, kept: list[dict[str, Any]], malformed: int,
              result: dict[str, Any]) -> dict[str, Any]:
    """What monitor.json says of the log: its lines, those used, skipped (per file), malformed, of other models
    (per model_id) and left out at the end."""
    skipped = sum(found.skipped.values())
    return {"paths": [str(p) for p in paths], "files": len(found.files), "lines": len(found.lines) + skipped,
            "used": len(kept), "first": kept[0]["time"], "last": kept[-1]["time"], "skipped": skipped,
            "skipped_by_file": found.skipped, "malformed": malformed, "other_models": others(found.lines, model_id),
            "left_out": result["settings"]["lines_left_out"]}


def monitor(logs: list[Path], model_uri: str, reference: str, window: int, out: Path, experiment: str, *,
            since: str = "", rate: float = FALSE_ALARM, resamples: int = RESAMPLES, seed: int = SEED) -> int:
    """`cxr monitor`: the lines of the model at `model_uri` in the prediction log files or folders `logs` (from
    `since`, an ISO date or time in UTC, where given), in windows of `window` lines, against `reference`
    (shift.load_set's spec) scored by the model; prints the report, writes out/monitor.json and out/monitor.png,
    logs an MLflow run in `experiment`; returns the exit code: ALERT_EXIT where more windows alerted than chance
    explains (verdict), else 0. A CxrError (one line) where it cannot."""
    if window < MIN_WINDOW:
        raise CxrError(f"--window {window}: give {MIN_WINDOW} lines or more (default {WINDOW})")
    found = read_logs(logs)  # before any model loads: a wrong path fails in a moment
    who, pinned = resolve(model_uri)
    mine = [r for r in found.lines if r["model_id"] == who["model_id"] and r["time"] >= iso_since(since)]
    if not mine:
        raise no_line_of(model_uri, who["model_id"], found, since)
    model, card = load_logged(pinned)
    if not card.binary:
        raise CxrError(f"{model_uri} has {len(card.classes)} classes ({', '.join(card.classes)}); the monitor reads "
                       "a binary model's P(pneumonia): give --model a binary one")
    cols, kept, malformed = table(mine, card.classes[1])
    result = analyse(cols, kept, load_reference(reference, model, card), window, rate, resamples, seed)
    result = {"model": {"uri": model_uri, "name": who["model"], "version": who["version"],
                        "model_id": who["model_id"], "variant": card.variant, "threshold": card.threshold,
                        "positive": card.classes[1]},
              "logs": log_facts(logs, found, who["model_id"], kept, malformed, result)} | result
    alerts = sum(w["alert"] for w in result["windows"])
    result["exit_code"] = ALERT_EXIT if alerts > chance_allows(len(result["windows"]), rate) else 0
    record(result, out, experiment)
    sys.stdout.write(render(result))
    return result["exit_code"]
