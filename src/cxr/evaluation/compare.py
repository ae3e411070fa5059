"""The compare stage: the leaderboard of every variant (markdown, CSV, JSON), the spread of scores across seeds,
comparison figures, and an MLflow run that groups this pipeline run's variant runs as its children."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from cxr import tracking
from cxr.io import atomic_path, best_on_val, read_report, write_csv, write_json
from cxr.params import HEADLINE, WITH_INTERVAL, Params, metric_label
from cxr.plots import bars_figure, curve_figure, histories_figure
from cxr.wording import SCORE_NAMES, SHOWN, score_text, shift_summary

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]
Groups = list[dict[str, Any]]


def leaderboard(p: Params, reports: Path) -> Rows:
    """One row per variant and ensemble, best first by validation `compare.metric` (test is reported, never
    ranked on): headline test scores with their 95% intervals (`<score>_ci95`), the val scores ranked and
    selected on, the range of equally good thresholds on val, sensitivity per pneumonia subtype, calibration,
    and the MLflow ids. An ensemble's epochs and training time are its members' sums."""
    rows = []
    for variant in p.entries:
        ev = read_report(reports / variant / "evaluation.json", variant)
        members = p.ensembles.get(variant, [variant])
        train = [read_report(reports / m / "train.json", m) for m in members]
        cal, span = ev.get("calibration", {}), ev.get("threshold_range") or {}
        row: dict[str, Any] = {"variant": variant, "arch": p.variant(variant).arch if variant in p.models else
                               "ensemble: " + " + ".join(members), "image_size": p.image_size(members[0])}
        for m in HEADLINE:
            row[m] = _round(ev["test"][m])
            if m in WITH_INTERVAL:
                row[f"{m}_ci95"] = ev.get("test_ci95", {}).get(m)
        row["interval_unit"] = (ev.get("test_intervals") or {}).get("unit", "image")  # what the bootstrap drew
        row["accuracy_at_0.5"] = _round(ev.get("test_threshold_0_5", {}).get("accuracy"))
        for m in dict.fromkeys(("auroc", p.compare.metric, p.promote.metric)):
            row[f"val_{m}"] = _round(ev["val"][m])
            row[f"val_{m}_ci95"] = ev.get("val_ci95", {}).get(m)
        row |= {"threshold": _round(ev.get("threshold")), "threshold_low": _round(span.get("low")),
                "threshold_high": _round(span.get("high")), "threshold_wide": span.get("wide")}
        for cause, sub in ev.get("subtypes", {}).get("test", {}).items():  # where the file names say
            row |= {f"recall_{cause}": _round(sub["recall"]), f"recall_{cause}_ci95": sub["recall_ci95"]}
        for name, sub in ev.get("series", {}).get("test", {}).items():  # split.series: e.g. specificity_IM
            for k in ("specificity", "recall"):
                if k in sub:
                    row |= {f"{k}_{name}": _round(sub[k]), f"{k}_{name}_ci95": sub[f"{k}_ci95"]}
        row |= {"tta": ev.get("tta", 1), "temperature": _round(cal.get("temperature")),
                "val_ece": _round(cal.get("val_ece_after")), "test_ece": _round(cal.get("test_ece_after")),
                "test_class_ece": _round(cal.get("test_class_ece_after")),
                "epochs": sum(t["epochs_run"] for t in train),
                "train_seconds": round(sum(t["train_seconds"] for t in train), 2),
                "run_id": ev["mlflow"]["run_id"], "model_id": ev["mlflow"]["model_id"]}
        rows.append(row)
    key = f"val_{p.compare.metric}"
    return sorted(rows, key=lambda r: -(r[key] if r[key] is not None else -1.0))


def _round(x: float | None) -> float | None:
    """6 digits: tables print these at 3, and 4 stored digits rounded twice (0.97949 -> 0.9795 -> "0.980")."""
    return None if x is None else round(x, 6)


def interval_label(rows: Rows) -> str:
    """What the rows' intervals are: '95% interval by patient' (a bootstrap drawing patients), 'by image' where
    the source names none."""
    units = sorted({r.get("interval_unit", "image") for r in rows}) or ["image"]
    return f"95% interval by {' or '.join(units)}"


def flat(rows: Rows) -> Rows:
    """The rows with each interval as two numeric columns (<score>_ci95_low and _high), for CSV."""
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        for k, v in r.items():
            if k.endswith("_ci95"):
                row |= {f"{k}_low": v[0] if v else None, f"{k}_high": v[1] if v else None}
            else:
                row[k] = v
        out.append(row)
    return out


SPREAD = ("accuracy", "recall", "specificity", "f1", "auroc", "val_auroc")


def spread(p: Params, rows: Rows) -> Groups:
    """Per group of two or more variants that differ only in `seed_offset`: each headline score's mean, sample
    sd, min and max over the seeds, beside the score of an ensemble of exactly those variants."""
    by_recipe: dict[str, list[str]] = {}
    for v in (r["variant"] for r in rows if r["variant"] in p.models):
        recipe = dataclasses.asdict(dataclasses.replace(p.variant(v), seed_offset=0)) | {"size": p.image_size(v)}
        by_recipe.setdefault(json.dumps(recipe, sort_keys=True, default=str), []).append(v)
    by_name = {r["variant"]: r for r in rows}
    groups = []
    for members in (sorted(m) for m in by_recipe.values() if len(m) > 1):
        ensemble = next((e for e, ms in p.ensembles.items() if sorted(ms) == members and e in by_name), None)
        stats = {}
        for key in SPREAD:
            values = [by_name[m][key] for m in members if by_name[m].get(key) is not None]
            if len(values) > 1:
                stats[key] = {"mean": round(statistics.mean(values), 4), "sd": round(statistics.stdev(values), 4),
                              "min": min(values), "max": max(values),
                              "ensemble": by_name[ensemble].get(key) if ensemble else None}
        groups.append({"variants": members, "ensemble": ensemble, "scores": stats})
    return groups


def spread_lines(groups: Groups) -> list[str]:
    """The seed spread in plain text: a header per group, a line per score."""
    lines = []
    for g in groups:
        ens = f"; the ensemble {g['ensemble']} beside it" if g["ensemble"] else ""
        lines.append(f"Seed spread of {', '.join(g['variants'])} (one recipe, {len(g['variants'])} seeds): "
                     f"mean ± sd (min–max){ens}")
        for key, st in g["scores"].items():
            beside = f"   {g['ensemble']} {st['ensemble']:.4f}" if st["ensemble"] is not None else ""
            lines.append(f"  {SCORE_NAMES[key].long:<10} {st['mean']:.4f} ± {st['sd']:.4f} "
                         f"({st['min']:.4f}–{st['max']:.4f})" + beside)
    return lines


def threshold_lines(rows: Rows) -> list[str]:
    """In words, each entry whose validation split scores within one image of its best over a wide range of
    thresholds."""
    return [f"{r['variant']}: every threshold from {r['threshold_low']:.3f} to {r['threshold_high']:.3f} scores "
            f"within one image of the best on validation: validation cannot place it (it chose {r['threshold']:.3f}); "
            f"operating points at val specificity 0.90/0.95/0.99: reports/{r['variant']}/evaluation.json"
            for r in rows if r.get("threshold_wide")]


def markdown(rows: Rows, metric: str, groups: Groups | None = None, shift: dict[str, Any] | None = None) -> str:
    head = [k for k in (rows[0] if rows else {"variant": 0})
            if k not in ("run_id", "model_id", "threshold_wide", "interval_unit") and not k.endswith("_ci95")]
    lines = [f"# Leaderboard (test scores, sorted by validation {metric})", "",
             f"Scores [{interval_label(rows)}: 2,000 bootstrap resamples, each drawn within each class, "
             "pneumonia subtype and series]; recall_bacteria and recall_virus: the sensitivity within each "
             "pneumonia subtype; specificity_<series> and recall_<series>: within each series the file names give "
             "(split.series); test_ece: top-label (Guo et al.), test_class_ece: class-wise.",
             *(f"\n{line}" for line in shift_lines(shift)), "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(score_text(r.get(k), r.get(f"{k}_ci95")) for k in head) + " |" for r in rows]
    if extra := [*threshold_lines(rows), *spread_lines(groups or [])]:
        lines += ["", "```", *extra, "```"]
    return "\n".join(lines) + "\n"


def dvc_scores(rows: Rows, best: str | None) -> dict[str, dict[str, Any]]:
    """comparison/scores.json, DVC's metrics (and the comparison run's MLflow metrics), named by SCORE_NAMES' `dvc`.
    `best`: the variant promotion would pick (by validation) and its scores, first, so that a narrow `dvc exp
    show --keep 'Experiment|^best'` compares experiments whatever their variants (accuracy left out there, so
    that it fits 120 columns: sens and spec say more); then each score per variant."""
    top = next((r for r in rows if r["variant"] == best), None)
    named = [(key, name.dvc) for key, name in SCORE_NAMES.items() if name.dvc]
    head = {"best": {"variant": best, **{dvc: top.get(key) for key, dvc in named if key != "accuracy"}}} if top else {}
    return head | {dvc: {r["variant"]: r.get(key) for r in rows} for key, dvc in named}


def _table(rows: Rows, metric: str, *extra: str, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """The leaderboard's headline columns (and `extra` ones), as text with intervals: a header and a row each."""
    head = ["variant", f"val {metric}", *(SCORE_NAMES[k].long for k in SHOWN), *extra]
    keys = ["variant", f"val_{metric}", *SHOWN, *extra]
    return head, [[score_text(r.get(k), r.get(f"{k}_ci95"), short) for k in keys] for r in rows]


GAP = 0.05  # val minus test AUROC of the top row above which the summary says the test set is shifted


def reading_lines(rows: Rows, metric: str, stages: dict[str, dict[str, Any]]) -> list[str]:
    """How to read the leaderboard: why the top row is first, what sens and spec mean, the shift stage's verdict, a
    large validation/test gap, and the split stage's warning about patients on both sides of the source's
    splits. `stages`: stage_reports."""
    lines = [f"Ranked by validation {metric_label(metric)}, the one score choices are made on (the top row is what "
             "`cxr promote` registers); test is read once and never ranked on. sens = sensitivity: the share of "
             "pneumonia images called pneumonia; spec = specificity: the share of normal images called normal.",
             *shift_lines(stages.get("shift"))]
    top = rows[0] if rows else {}
    if top.get("val_auroc") is not None and top.get("auroc") is not None and top["val_auroc"] - top["auroc"] > GAP:
        lines.append(f"{top['variant']}: validation AUROC {top['val_auroc']:.3f} against test {top['auroc']:.3f}. "
                     "The test split is shifted from the training data, and validation, carved from training, "
                     "cannot see it: validation overrates every variant; judge them on the test columns, whose "
                     "labels no choice has seen.")
    split = stages.get("split") or {}
    lines += validation_lines(split.get("validation") or {})
    crossing = split.get("source_patients_across_splits") or {}
    if crossing and not split.get("pooled"):
        lines.append(f"Warning (split stage): {sum(crossing.values())} patients have images on both sides of the "
                     f"source's splits ({', '.join(f'{k}: {v}' for k, v in crossing.items())}), so those test "
                     "scores are optimistic; split.pool: true re-splits every image by patient.")
    return lines


def validation_lines(validation: dict[str, Any]) -> list[str]:
    """How the split stage carved validation (reports/split.json `validation`), where it carved one."""
    if validation.get("by") == "acquisition":
        blocks = ", ".join(f"{b['series']} {b['numbers'][0]}–{b['numbers'][1]}" for b in validation["blocks"])
        how = (f"as a new acquisition: the patients at the {validation['end']} end of each numbered series' "
               f"running numbers ({blocks})" + (", the other patients at random"
                                                 if validation["unnumbered"]["carved"] else ""))
    elif validation.get("by") == "patient":
        how = "at random by patient"
    else:
        return []
    choice = validation.get("choice") or {}
    measured = choice.get("domain_auroc") or {}
    why = f"; split.val_by auto chose it: {choice['reason']}" if choice else ""
    why += (", " + ", ".join(f"{by} {d['auroc']:.3f}" for by, d in measured.items())) if measured else ""
    return [f"Validation (split stage): carved {how}{why}."]


def wrap(lines: list[str], width: int = 120) -> list[str]:
    """Long lines of words folded to the terminal's usual width, continuation lines indented."""
    return [w for line in lines for w in (textwrap.wrap(line, width, subsequent_indent="  ") if len(line) > width
                                          else [line])]


def stage_reports(reports: Path) -> dict[str, dict[str, Any]]:
    """The split and shift stages' reports (reports/split.json, reports/shift.json) that the pipeline wrote, for
    the leaderboard's words."""
    return {name: json.loads(path.read_text()) for name in ("split", "shift")
            if (path := reports / f"{name}.json").exists()}


def shift_lines(shift: dict[str, Any] | None) -> list[str]:
    """The shift stage's verdict on validation against test, what it means for the choices made on validation,
    and its domain classifier, in the words `cxr retrain`'s summary uses too."""
    if not shift:
        return []
    meaning = ("Validation cannot speak for the test set: what was chosen on it (variant, epoch, threshold) may "
               "not carry over." if any(shift["shifted"].values()) else "Choices made on validation should carry "
               "over to test.")
    return shift_summary(shift, "Validation against test (shift stage)", "reports/shift.json, reports/shift.png",
                         meaning)


def summary(rows: Rows, metric: str, out: Path, groups: Groups | None = None,
            stages: dict[str, dict[str, Any]] | None = None) -> str:
    """The headline columns with their intervals as a plain-text table, what the ranking and columns mean, what
    validation cannot decide, the seed spread, and where the rest is: what the compare stage prints at the end of
    a run. `stages`: stage_reports."""
    head, body = _table(rows, metric, "threshold", short=True)
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head, *body]]
    return "\n".join([f"Leaderboard: test scores [{interval_label(rows)}] at the threshold chosen on val, best first "
                      f"by val {metric}", *lines, *wrap([*reading_lines(rows, metric, stages or {}),
                                                  *threshold_lines(rows), *spread_lines(groups or []),
                                                  f"Full table and figures: {out}/leaderboard.md, {out}/*.png, "
                                                  "dvc plots show; every run in MLflow: make ui; all experiments: "
                                                  "cxr results"])])


def note(rows: Rows, metric: str, experiment_id: str = "", reused: frozenset[str] = frozenset(),
         shift: dict[str, Any] | None = None) -> str:
    """The parent run's description: the headline columns as a markdown table (the full one is an artifact), each
    variant linked to its run; a variant reused from an earlier pipeline run (its run is that one's child) is
    marked, so the table lists every variant of this run whichever parent its run has."""
    head, body = _table(rows, metric)
    for row, r in zip(body, rows, strict=True):
        if experiment_id:
            link = tracking.ui_link(f"experiments/{experiment_id}/runs/{r['run_id']}")
            row[0] = f"[{row[0]}]({link})"
        if r["run_id"] in reused:
            row[0] += " (reused)"
    lines = [f"**Leaderboard**: test scores [{interval_label(rows)}] at the threshold chosen on val, best first "
             f"by val {metric} (all columns: leaderboard.md). (reused): trained by an earlier pipeline run, unchanged "
             "since, so its run is nested under that run's parent.", *(f"\n{line}" for line in shift_lines(shift)),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if experiment_id and rows:  # one click to MLflow's comparison of exactly this run's variants
        ids = ",".join(f"%22{r['run_id']}%22" for r in rows)
        link = tracking.ui_link(f"compare-runs?runs=[{ids}]&experiments=[%22{experiment_id}%22]")
        lines.insert(1, f"\n[Compare all {len(rows)} variants of this pipeline run]({link})")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def figures(p: Params, rows: Rows, reports: Path) -> dict[str, Any]:
    """file name -> figure: headline scores side by side, ROC curves overlaid, training curves overlaid."""
    roc = {r["variant"]: read_report(reports / r["variant"] / "roc.json", r["variant"]) for r in rows}
    hist = {r["variant"]: [{k: float(v) if v else math.nan for k, v in row.items()} for row in
                           read_report(reports / r["variant"] / "history.csv", r["variant"])] for r in rows
            if r["variant"] not in p.ensembles}
    return {"metrics.png": bars_figure(rows, list(HEADLINE), "test scores per variant"),
            "roc.png": curve_figure(roc, "fpr", "tpr", "ROC (test), all variants", True,
                                    {r["variant"]: r["auroc"] for r in rows}),
            "history.png": histories_figure(hist, ("val_loss", "val_auroc", "train_loss"))}


HISTORY = {"train_loss": "train loss", "val_loss": "validation loss", "val_auroc": "validation AUROC"}


def plot_data(p: Params, rows: Rows, reports: Path) -> dict[str, list[dict[str, Any]]]:
    """out/plots/<name>.json for DVC's top-level plots, every variant in one file each, so that one chart
    overlays them (.dvc/plots/*.json colour by `variant`; `i` keeps a curve's order): test ROC and PR curves,
    training history (train and validation loss, validation AUROC), confusion counts with each cell's share of
    its actual class, and the headline test scores with their 95% intervals."""
    roc, pr, history, confusion, scores_ = [], [], [], [], []
    for rank, r in enumerate(rows):  # best on validation first
        v, folder = r["variant"], reports / r["variant"]
        roc += [{"variant": v, "i": i, **c} for i, c in enumerate(read_report(folder / "roc.json", v))]
        pr += [{"variant": v, "i": i, **c} for i, c in enumerate(read_report(folder / "pr.json", v))]
        if v not in p.ensembles:
            history += [{"variant": v, "epoch": int(h["epoch"]), "metric": label, "value": float(h[key])}
                        for h in read_report(folder / "history.csv", v) for key, label in HISTORY.items() if h[key]]
        cells = collections.Counter((c["actual"], c["predicted"]) for c in read_report(folder / "confusion.json", v))
        names = sorted({a for a, _ in cells} | {b for _, b in cells})
        for actual in names:
            total = sum(cells[(actual, b)] for b in names)
            confusion += [{"variant": v, "actual": actual, "predicted": b, "count": cells[(actual, b)],
                           "share": round(cells[(actual, b)] / total, 4) if total else 0.0} for b in names]
        for key in SHOWN:
            low, high = r.get(f"{key}_ci95") or (None, None)
            if r.get(key) is not None:
                scores_.append({"variant": v, "rank": rank, "score": SCORE_NAMES[key].word, "value": r[key], "low": low,
                                "high": high})
    return {"roc": roc, "pr": pr, "history": history, "confusion": confusion, "scores": scores_}


def compare(p: Params, reports: Path, out: Path) -> Rows:
    """Write out/{leaderboard.md,leaderboard.csv,leaderboard.json,seed_spread.json,scores.json,*.png} and log
    the comparison run; `out` appears only once both are done. Returns the leaderboard's rows."""
    rows = leaderboard(p, reports)
    best = best_on_val([r["variant"] for r in rows], reports, p.promote.metric)[0] if rows else None
    groups = spread(p, rows)
    figs = figures(p, rows, reports)
    shift = stage_reports(reports).get("shift")
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "leaderboard.md").write_text(markdown(rows, p.compare.metric, groups, shift))
        write_csv(tmp / "leaderboard.csv", flat(rows))
        write_json(tmp / "leaderboard.json", rows)
        write_json(tmp / "seed_spread.json", groups)
        write_json(tmp / "scores.json", dvc_scores(rows, best))
        for name, fig in figs.items():
            fig.savefig(tmp / name, dpi=110)
        (tmp / "plots").mkdir()
        for name, data in plot_data(p, rows, reports).items():
            write_json(tmp / "plots" / f"{name}.json", data)
        log_comparison(p, rows, groups, figs, best, reports, shift)
    return rows


def log_comparison(p: Params, rows: Rows, groups: Groups, figs: dict[str, Any], best: str | None,
                   reports: Path, shift: dict[str, Any] | None) -> str:
    """An MLflow run for this pipeline run: the leaderboard, figures and the shift stage's report (`shift`, read
    from `reports`); each variant run that has no parent yet (trained since the last compare) becomes its child,
    so the UI nests one pipeline run's variants."""
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    client = MlflowClient()
    reused = frozenset(r["run_id"] for r in rows if "mlflow.parentRunId" in client.get_run(r["run_id"]).data.tags)
    # Named after the DVC experiment, described by the leaderboard: the parent row the UI shows first.
    tags = {**tracking.run_tags("compare", root), "cxr.kind": "comparison",
            tracking.NOTE: note(rows, p.compare.metric, experiment_id, reused, shift),
            "variant_runs": ",".join(r["run_id"] for r in rows)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=tracking.pipeline_run_name(), tags=tags) as run:
        mlflow.log_dict(rows, "leaderboard.json")
        mlflow.log_dict(groups, "seed_spread.json")
        mlflow.log_text(markdown(rows, p.compare.metric, groups, shift), "leaderboard.md")
        for name in ("shift.json", "shift.png"):  # validation against test, as the shift stage found it
            if (reports / name).exists():
                mlflow.log_artifact(str(reports / name), "shift")
        if shift:
            mlflow.set_tags(tracking.shift_tag(shift["verdict"]))
        for name, fig in figs.items():
            mlflow.log_figure(fig, f"plots/{name}")
        if best:  # the variant promotion would pick: best on validation
            top = next(r for r in rows if r["variant"] == best)
            mlflow.log_metrics({f"best/{k}": top[k] for k in HEADLINE if top[k] is not None})
            mlflow.set_tag("best_variant", best)
        # The same columns as `dvc exp show` (test_auroc.<variant>, val_auroc.<variant>...): in the UI's chart view
        # each is one bar chart across pipeline runs, e.g. how tinyvgg's test AUROC moved from run to run.
        mlflow.log_metrics({f"{name}.{variant}": value for name, column in dvc_scores(rows, None).items()
                            for variant, value in column.items() if value is not None})
        for r in rows:
            if r["run_id"] not in reused:
                client.set_tag(r["run_id"], "mlflow.parentRunId", run.info.run_id)
                client.set_tag(r["run_id"], "pipeline_run", run.info.run_id)
    log.info("this pipeline run in the MLflow UI (its description links every variant's run): %s",
             tracking.ui_link(f"experiments/{experiment_id}/runs/{run.info.run_id}", tracking.ui_base()))
    return run.info.run_id
