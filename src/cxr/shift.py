"""Shift between two image sets (a reference, e.g. what a model trained on, and a target, e.g. new images):
image statistics with a two-sample test and an effect size each, and, given a model, its score distributions
and a domain classifier on its penultimate features (can the two sets be told apart?), an estimate of the
target's prevalence, a verdict in words and a figure.

Two-sample tests: scipy's Kolmogorov-Smirnov (a well-kept implementation of an exact test that needs no
distributional assumption); the domain classifier is a logistic regression written here (20 lines of torch)
rather than scikit-learn, which is a test-only dependency of this project."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch.nn import functional

from cxr import LABELS, bootstrap
from cxr.data.gray import Names, decode, pixel_stats
from cxr.data.sources import IMAGE_SUFFIXES, is_image_file
from cxr.data.store import Split, load_split, size_dir
from cxr.errors import CxrError
from cxr.inference import ModelCard, predict_logits, to_device
from cxr.plots import plt
from cxr.wording import score_text

STATS = ("width", "height", "aspect", "mean", "std", "sharpness", "border", "marker")
ALPHA = 0.01  # per test, before Bonferroni over the statistics
MIN_EFFECT = 0.2  # |standardised mean difference| below this is no shift worth a word, however significant
DOMAIN_AUROC = 0.6  # its interval and its range over refits must lie above this to call the sets different
MIN_SCORE_CHANGE = 0.02  # mean P(pneumonia) moved less: no shift in scores (a near-constant score has a tiny sd)
NEAR_COPIES = 0.4  # its interval below this: the sets share near-copies of images (each one's twin is misread)


@dataclass
class ImageSet:
    name: str
    images: np.ndarray  # (N, S, S) uint8, prepared at one size for both sets
    width: np.ndarray  # the originals' sizes
    height: np.ndarray
    labels: np.ndarray | None  # 0 NORMAL, 1 PNEUMONIA where known
    patients: np.ndarray | None = None  # each image's patient id ('' where unknown): folds and resamples by patient


def load_set(spec: str, size: int, fit: str = "stretch", draft: int = 0, how: str = "none",
             strict: bool = False) -> ImageSet:
    """`spec`: a prepared split `DATA_DIR:SPLIT` (e.g. data/split:test), a MedMNIST `.npz[:SPLIT]`, or a folder of
    images (searched recursively; a NORMAL or PNEUMONIA folder name gives the label). Images that are decoded here
    (a .npz, a folder) are at `draft`'s JPEG scale (default: `size`) and equalised by `how`, as a model card
    prepares them; a prepared split is as its stage stored it. `strict` (tracking.privacy): a folder's patients
    by pseudonym, as a prepared split under it names them."""
    path, _, split = spec.partition(":")
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as z:
            images = z[f"{split or 'test'}_images"]
            labels = z[f"{split or 'test'}_labels"].reshape(-1)
        images = images[..., 0] if images.ndim == 4 else images
        h, w = images.shape[1:3]
        resized = np.stack([decode(("", im), [size], fit, how=how)[0][0] for im in images])  # type: ignore[index]
        return ImageSet(spec, resized, np.full(len(images), w), np.full(len(images), h), labels.astype(int))
    if split:
        data = load_split(size_dir(p, size), split)
        return ImageSet(spec, np.asarray(data.images), np.array([int(m["width"]) for m in data.meta]),
                        np.array([int(m["height"]) for m in data.meta]), np.asarray(data.labels),
                        np.array([m["patient_id"] for m in data.meta]))
    if not p.is_dir():
        raise CxrError(f"{spec}: no such folder, .npz or DATA_DIR:SPLIT; give e.g. data/split:test or a folder")
    files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
    rows = [(f, decode(("", str(f)), [size], fit, draft or size, how)) for f in files]
    good = [(f, r) for f, r in rows if not isinstance(r, str)]
    if not good:
        raise CxrError(f"{spec}: no readable images ({'/'.join(sorted(IMAGE_SUFFIXES))})")
    namer = Names(strict)  # patients as the grayscale stage names them, so that the two can be matched
    folders = [[*f.relative_to(p).parts[-2::-1], p.resolve().name] for f, _ in good]  # the nearest folder first
    names = [next((d.upper() for d in ds if d.upper() in LABELS), "") for ds in folders]
    labels = np.array([LABELS.index(n) for n in names]) if all(names) else None
    return ImageSet(spec, np.stack([r[0][0] for _, r in good]), np.array([r[1] for _, r in good]),
                    np.array([r[2] for _, r in good]), labels,
                    np.array([namer.patient(f.name, r[5][0]) for f, r in good]))


def image_stats(s: ImageSet) -> dict[str, np.ndarray]:
    """Per image: original width, height and aspect, and the grey-level statistics of gray.pixel_stats."""
    return {"width": s.width.astype(float), "height": s.height.astype(float), "aspect": s.width / s.height,
            **pixel_stats(s.images)}


def two_sample(a: np.ndarray, b: np.ndarray, tests: int, min_change: float = 0.0) -> dict[str, Any]:
    """KS statistic and p-value, the standardised mean difference (target - reference, pooled sd), and whether
    it is a shift: p below ALPHA / tests, |difference| at least MIN_EFFECT and the means at least `min_change`
    apart."""
    ks = scipy_stats.ks_2samp(a, b)
    sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if len(a) > 1 and len(b) > 1 else 0.0
    d = float((b.mean() - a.mean()) / sd) if sd > 0 else (0.0 if a.mean() == b.mean() else math.inf)
    moved = abs(d) >= MIN_EFFECT and abs(b.mean() - a.mean()) >= min_change
    return {"reference_mean": float(a.mean()), "target_mean": float(b.mean()), "ks": float(ks.statistic),
            "p": float(ks.pvalue), "effect": d, "shift": bool(ks.pvalue < ALPHA / tests and moved)}


@torch.no_grad()
def features_and_scores(model: torch.nn.Module, card: ModelCard,
                        images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the model's last linear layer (its penultimate features) and P(pneumonia), identity view."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].flatten(1).float().cpu()))
    try:
        logits = predict_logits(model.cpu(), to_device(images, torch.device("cpu")))  # batched, in float32
    finally:
        hook.remove()
    probs = card.probabilities(logits[None])
    return torch.cat(seen), probs if probs.ndim == 1 else 1 - probs[:, 0]


def both_classes(la: np.ndarray | None, lb: np.ndarray | None) -> bool:
    """Both sets labelled, each with normal and pneumonia images (three-class labels: bacteria and virus are
    pneumonia)."""
    return la is not None and lb is not None and all(len(np.unique(v > 0)) == 2 for v in (la, lb))


def image_features(images: np.ndarray) -> torch.Tensor:
    """Features that need no model, for a domain classifier on the images themselves: each image at 16x16 (area
    means) and its 32-bin histogram of grey levels."""
    x = torch.from_numpy(images).float()[:, None] / 255
    thumb = functional.adaptive_avg_pool2d(x, 16).flatten(1)
    bins = (x.flatten(1) * 32).long().clamp(max=31) + 32 * torch.arange(len(x))[:, None]
    hist = torch.bincount(bins.flatten(), minlength=32 * len(x)).reshape(len(x), 32) / x[0].numel()
    return torch.cat([thumb, hist.float()], 1)


def likeness(a: Split, b: Split) -> dict[str, Any]:
    """How well the images alone tell `b` from `a` (the domain classifier below, no labels, folds by patient):
    split.val_by auto keeps the validation whose AUROC against the test images is lower."""
    ids = tuple(np.array([m["patient_id"] for m in s.meta]) for s in (a, b))
    return domain_auroc(image_features(np.asarray(a.images)), image_features(np.asarray(b.images)),
                        patients=ids)[0]  # type: ignore[arg-type]


REFITS = 10  # the cross-validation repeated with other patient folds: how much the AUROC moves with the split
MAX_FEATURES = 512  # wider features (a tinyvgg's 2,560) are projected on this many principal components


def patient_folds(strata: torch.Tensor, patients: list[str], folds: int, seed: int) -> torch.Tensor:
    """(N,) fold per image: each patient's images (across both sets) in one fold, patients dealt to folds in a
    seeded order within their stratum (as the bootstrap assigns it), so each fold keeps the strata's shares."""
    cluster, stratum = bootstrap.cluster_strata(bootstrap.clusters_of(patients), strata)
    order = torch.randperm(len(stratum), generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(len(stratum), dtype=torch.long)
    for s in stratum.unique():
        members = order[stratum[order] == s]  # this stratum's patients, in the seeded order
        fold[members] = torch.arange(len(members)) % folds
    return fold[cluster]


def held_out(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """Each image's score from a weighted logistic regression fitted on the other folds."""
    out = torch.empty(len(y), dtype=torch.float64)
    for k in fold.unique():
        held = fold == k
        out[held] = x[held] @ _logistic(x[~held], y[~held].double(), w[~held])
    return out


def domain_auroc(a: torch.Tensor, b: torch.Tensor, la: np.ndarray | None = None, lb: np.ndarray | None = None,
                 patients: tuple[np.ndarray | None, np.ndarray | None] = (None, None), folds: int = 5,
                 seed: int = 0, refits: int = REFITS) -> tuple[dict[str, Any], torch.Tensor]:
    """How well a logistic regression on the features tells the target from the reference: its AUROC on
    held-out folds (0.5: indistinguishable). Folds split `patients` (each set's ids, '' where unknown), so that
    no patient's images are on both sides of a fold: one patient's images look alike, and a patient in both sets
    would pull the AUROC towards chance. Two measures of its uncertainty: a 95% interval from the bootstrap by
    patient of the held-out scores (the sampling of the images), and the spread of the AUROC over `refits`
    repetitions of the cross-validation with other patient folds (the fitting, which that interval holds fixed);
    the sets are called different when both lie above DOMAIN_AUROC. With both sets' labels (each with both
    classes), each class holds half of its set's weight, in the fit and in the AUROC: a different share of
    pneumonia (prior shift) then tells the sets nothing; only a different look does. Also returns the held-out
    scores (reference first)."""
    x = torch.cat([a, b]).double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    if x.shape[1] > MAX_FEATURES:  # rotated onto their leading principal components (no set labels used), unscaled:
        # with at most MAX_FEATURES images the ridge fit is the same as on the raw features, beyond it a truncation
        # to the leading ones; either way Newton's Hessian stays small
        u, sv, _ = torch.linalg.svd(x, full_matrices=False)
        x = u[:, :MAX_FEATURES] * sv[:MAX_FEATURES]
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    strata, w = y.long(), torch.ones(len(y), dtype=torch.float64)
    balanced = both_classes(la, lb)
    if balanced:
        strata = 2 * y.long() + torch.from_numpy(np.concatenate([la, lb]) > 0).long()  # type: ignore[list-item]
        for s in range(4):
            cell = strata == s
            w[cell] = float((y == y[cell][0]).sum()) / (2 * float(cell.sum()))
    ids = [str(i) for side, n in zip(patients, (len(a), len(b)), strict=True)
           for i in (side if side is not None else [""] * n)]
    x = torch.cat([x, torch.ones(len(y), 1, dtype=torch.float64)], 1)  # the intercept
    out = held_out(x, y, w, patient_folds(strata, ids, folds, seed))
    point = float(bootstrap.weighted_auroc(out, y.bool(), w[None])[0])
    design = bootstrap.by_patient(strata, ids)
    ci = bootstrap.interval(bootstrap.weighted_auroc(out, y.bool(), bootstrap.resample_counts(design, seed=seed) * w))
    if ci is None:  # a resample without one of the sets: only where every patient has images in both
        raise CxrError("the two sets hold the same patients, so no resample by patient separates them; compare "
                       "sets of different patients")
    again = [float(bootstrap.weighted_auroc(held_out(x, y, w, patient_folds(strata, ids, folds, seed + r)), y.bool(),
                                            w[None])[0]) for r in range(1, refits + 1)]
    spread = [round(min(again, default=point), 6), round(max(again, default=point), 6)]
    return {"auroc": round(point, 6), "ci95": ci, "folds": folds, "class_balanced": balanced, "unit": design.unit,
            "refits": {"folds_redrawn": refits, "auroc_range": spread},
            "interval": f"bootstrap by {design.unit} of the held-out scores ({bootstrap.RESAMPLES} resamples); "
                        f"auroc_range: the cross-validation refitted on {refits} other deals of the patients to folds",
            "different": bool(min(ci[0], spread[0]) > DOMAIN_AUROC)}, out


def _logistic(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float = 1e-2, steps: int = 50) -> torch.Tensor:
    """Weights of an L2-penalised logistic regression with sample weights `w` (last column of x: the
    intercept, not penalised), by Newton's method with step halving: the loss is smooth and strongly convex, so
    it converges in about ten steps, each a solve with the (features x features) Hessian; L-BFGS took 200
    gradient steps and 20 times as long."""
    w = w / w.sum()
    penalty = torch.full((x.shape[1],), 2 * l2, dtype=torch.float64)
    penalty[-1] = 0.0

    def loss(beta: torch.Tensor) -> float:
        return float((functional.binary_cross_entropy_with_logits(x @ beta, y, reduction="none") * w).sum() +
                     (penalty * beta.square()).sum() / 2)

    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    value = loss(beta)
    for _ in range(steps):
        p = torch.sigmoid(x @ beta)
        grad = x.T @ (w * (p - y)) + penalty * beta
        hessian = (x * (w * p * (1 - p))[:, None]).T @ x + torch.diag(penalty)
        step, size = torch.linalg.solve(hessian, grad), 1.0
        while (new := loss(beta - size * step)) > value and size > 1e-4:
            size /= 2
        if new > value:  # no step lowers the loss: at the optimum to rounding
            break
        beta, value = beta - size * step, new
        if float(step.abs().max()) * size < 1e-9:
            break
    return beta


def prevalence(p_target: torch.Tensor, prior: float, steps: int = 100) -> float:
    """The target's share of pneumonia by EM on calibrated scores (Saerens et al. 2002): it assumes the classes
    look alike in both sets, which a domain classifier that tells them apart says is false."""
    p, q = p_target.double().clamp(1e-6, 1 - 1e-6), prior
    for _ in range(steps):
        r = (q / prior) * p / ((q / prior) * p + ((1 - q) / (1 - prior)) * (1 - p))
        q = float(r.mean())
    return q


def shifts_found(report: dict[str, Any]) -> dict[str, bool]:
    """Which kinds of shift the report found: images (a statistic, or a domain classifier on the images or on the
    model's features) and scores (within each class where both sets are labelled: a new share of pneumonia
    moves the mean score, and is no shift)."""
    model = report.get("model") or {}
    scores = model.get("scores_by_class") or {"all": model.get("scores") or {}}
    return {"images": any(v["shift"] for v in report["images"].values()) or report["domain"]["different"]
            or bool(model and model["domain"]["different"]),
            "scores": any(v.get("shift", False) for v in scores.values())}


def _domain(d: dict[str, Any]) -> str:
    return f"AUROC {score_text(d['auroc'], d['ci95'])}"


def verdict(report: dict[str, Any]) -> str:
    found, model = shifts_found(report), report.get("model") or {}
    domains = [("the images", report["domain"]), ("the model's features", model.get("domain"))]
    parts = []
    if found["images"]:
        why = [f"{k} ({v['effect']:+.2f} sd)" for k, v in report["images"].items() if v["shift"]]
        why += [f"a classifier on {name} tells them apart ({_domain(d)})" for name, d in domains
                if d and d["different"]]
        parts.append("shift in images: " + ", ".join(why))
    if found["scores"]:
        moved = [(f" of {c} images", v) for c, v in (model.get("scores_by_class") or {}).items() if v["shift"]]
        parts.append("shift in scores: " + ", ".join(f"mean P(pneumonia){c} {v['reference_mean']:.3f} -> "
                                                     f"{v['target_mean']:.3f}"
                                                     for c, v in moved or [("", model["scores"])]))
    elif model and model["scores"]["shift"] and model.get("scores_by_class"):
        s = model["scores"]
        parts.append(f"no shift in scores within each class: the mean P(pneumonia) moved ({s['reference_mean']:.3f} "
                     f"-> {s['target_mean']:.3f}) with the share of pneumonia")
    text = "; ".join(parts) if found["images"] or found["scores"] else \
        "; ".join(["no shift: the target looks like the reference in every measure", *parts])
    copies = [f"{name} ({_domain(d)})" for name, d in domains if d and d["ci95"][1] < NEAR_COPIES]
    if copies:  # a cross-validated classifier calls each image's twin, held out, the other set's
        text += f"; the sets share near-copies of images: a classifier on {' and '.join(copies)} scores below chance"
    return text


def shift_report(reference: ImageSet, target: ImageSet, model: torch.nn.Module | None = None,
                 card: ModelCard | None = None) -> dict[str, Any]:
    """The report: per statistic its test, a domain classifier on the images, and with a model its scores, a
    domain classifier on its features and the target's prevalence."""
    ra, ta = image_stats(reference), image_stats(target)
    la, lb = reference.labels, target.labels
    ha, hb = image_features(reference.images), image_features(target.images)
    ids = (reference.patients, target.patients)
    domain, held = domain_auroc(ha, hb, la, lb, ids)
    report: dict[str, Any] = {"reference": {"name": reference.name, "images": len(reference.images)},
                              "target": {"name": target.name, "images": len(target.images)},
                              "images": {k: two_sample(ra[k], ta[k], len(STATS)) for k in STATS}, "domain": domain,
                              "_panels": {"grey levels": (ha[:, -32:].mean(0).numpy(), hb[:, -32:].mean(0).numpy()),
                                          "domain classifier, images": _split(held, len(ha))}}
    if model is not None and card is not None:
        fa, pa = features_and_scores(model, card, reference.images)
        fb, pb = features_and_scores(model, card, target.images)
        share = float((la > 0).mean()) if la is not None else float(pa.mean())
        # EM's prior is the one the scores carry (in each step, and as its start): the one training weighed the
        # classes by (0.5 with balanced sampling), as the card records it; cards of older versions: the reference's
        prior, start = (card.prior, "the model's training prior (its card)") if card.prior is not None else \
            (share, "the reference set's share (the card records no training prior)")
        dom, held = domain_auroc(fa, fb, la, lb, ids)
        report["_panels"]["domain classifier, features"] = _split(held, len(fa))
        report["model"] = {"variant": card.variant, "scores": two_sample(pa.numpy(), pb.numpy(), 1, MIN_SCORE_CHANGE),
                           "domain": dom,
                           "prevalence": {"reference": share, "start": prior, "start_from": start,
                                          "reliable": not dom["different"],
                                          "target_estimate": prevalence(pb, prior) if 0 < prior < 1 else None}}
        if lb is not None:
            report["model"]["prevalence"]["target_actual"] = float((lb > 0).mean())
        if both_classes(la, lb):  # each class's scores: where a shift shows when the share of pneumonia moves
            assert la is not None and lb is not None
            by = {c: (pa.numpy()[(la > 0) == k], pb.numpy()[(lb > 0) == k]) for k, c in enumerate(LABELS)}
            report["model"]["scores_by_class"] = {c: two_sample(*v, 2, MIN_SCORE_CHANGE) for c, v in by.items()}
            report["_panels"] |= {f"P | {c.lower()}": v for c, v in by.items()}
        else:
            report["_panels"]["P(pneumonia)"] = (pa.numpy(), pb.numpy())
    report["shifted"] = shifts_found(report)
    report["verdict"] = verdict(report)
    report["_stats"] = (ra, ta)
    return report


def _split(x: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    return x[:n].numpy(), x[n:].numpy()


def figure(report: dict[str, Any]) -> Any:
    """Each statistic's two histograms overlaid (those constant and equal in both sets left out), the mean
    histogram of grey levels, the domain classifiers' held-out scores, and P(pneumonia) where a model was given
    (per class where both sets are labelled)."""
    ra, ta = report["_stats"]
    panels = [(k, ra[k], ta[k]) for k in STATS if np.ptp(np.concatenate([ra[k], ta[k]])) > 0]
    panels += [(k, *v) for k, v in report["_panels"].items()]
    model = report.get("model") or {}
    tests = report["images"] | {"P(pneumonia)": model.get("scores", {}), "domain classifier, images": report["domain"],
                                "domain classifier, features": model.get("domain", {})} | \
        {f"P | {c.lower()}": v for c, v in (model.get("scores_by_class") or {}).items()}
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows + 0.5), layout="constrained", squeeze=False)
    names = [Path(report[k]["name"]).name for k in ("reference", "target")]  # paths: their last part
    for ax, (name, a, b) in zip(axes.flat, panels, strict=False):
        t = tests.get(name, {})
        if name == "grey levels":  # already a histogram: the mean share of pixels per bin
            for h, who in zip((a, b), names, strict=True):
                ax.stairs(h, np.linspace(0, 256, len(h) + 1), label=who)
            ax.set_title("grey levels (mean share of pixels)", fontsize=9)
            continue
        bins = np.histogram_bin_edges(np.concatenate([a, b]), 30)
        for x, who in zip((a, b), names, strict=True):
            ax.hist(x, bins, alpha=0.5, density=True, label=who)
        ax.set_title(f"{name}: AUROC {t['auroc']:.3f}" if "auroc" in t else
                     f"{name}: KS {t.get('ks', 0):.2f}, d {t.get('effect', 0):+.2f}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(report["verdict"], 150)), fontsize=9)
    return fig


def render(report: dict[str, Any]) -> str:
    """The verdict, then a line per statistic (and the model's figures), for a terminal."""
    lines = [f"{report['reference']['name']} ({report['reference']['images']} images) -> {report['target']['name']} "
             f"({report['target']['images']} images)", report["verdict"], "",
             f"{'statistic':<13}{'reference':>11}{'target':>12}{'KS':>7}{'p':>10}{'effect sd':>11}  shift"]
    model = report.get("model") or {}
    rows = dict(report["images"]) | ({"P(pneumonia)": model["scores"]} if model else {}) | \
        {f"P | {c.lower()}": v for c, v in (model.get("scores_by_class") or {}).items()}
    for k, v in rows.items():
        flag = "" if not v["shift"] else "by class: below" if k == "P(pneumonia)" and len(rows) > len(STATS) + 1 \
            else "yes"  # with labels, the scores are judged within each class
        lines.append(f"{k:<13}{v['reference_mean']:>11.4g}{v['target_mean']:>12.4g}{v['ks']:>7.3f}{v['p']:>10.2g}"
                     f"{v['effect']:>+11.2f}  {flag}".rstrip())
    weighting = " (each class half of its set)" if report["domain"]["class_balanced"] else ""
    lines.append(f"domain classifier on the images (16x16 and histogram){weighting}: {_detail(report['domain'])}; "
                 "0.5 = indistinguishable")
    if report.get("model"):
        m = report["model"]
        d, q = m["domain"], m["prevalence"]
        lines.append(f"domain classifier on {m['variant']}'s features{weighting}: {_detail(d)}")
        actual = f", actual {q['target_actual']:.3f}" if "target_actual" in q else ""
        caveat = "" if q["reliable"] else " (unreliable: the sets differ, and EM assumes the classes look alike)"
        if q["target_estimate"] is not None:  # EM needs a reference with both classes
            lines.append(f"pneumonia prevalence: reference {q['reference']:.3f}, target estimated "
                         f"{q['target_estimate']:.3f}{actual}{caveat}; EM from {q['start_from']}, {q['start']:.3f}")
    return "\n".join(lines) + "\n"


def _detail(d: dict[str, Any]) -> str:
    """The AUROC with its interval, what it resampled, and its range over refits with other folds."""
    lo, hi = d["refits"]["auroc_range"]
    return (f"{_domain(d)} ({d['folds']}-fold by {d['unit']}, interval by {d['unit']}; "
            f"{lo:.3f}–{hi:.3f} over {d['refits']['folds_redrawn']} refits with other folds)")


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the arrays its figure is drawn from (the keys starting with _): what shift.json holds."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write(report: dict[str, Any], out: Path) -> None:
    """out/shift.json (the report) and out/shift.png (the figure), both or neither."""
    from cxr.io import atomic_paths, write_json

    with atomic_paths(out / "shift.json", out / "shift.png") as (js, fig_path):
        write_json(js, public(report))
        fig = figure(report)
        fig.savefig(fig_path, dpi=90, format="png")
        plt.close(fig)
