"""The compare stage: the leaderboard of every variant (markdown, CSV, JSON), comparison figures, and an
MLflow run that groups this pipeline run's variant runs as its children."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from cxr import tracking
from cxr.io import atomic_path, best_on_val, read_report, write_csv, write_json
from cxr.params import HEADLINE, Params
from cxr.plots import bars_figure, curve_figure, histories_figure

Rows = list[dict[str, Any]]


def leaderboard(p: Params, reports: Path) -> Rows:
    """One row per variant and ensemble, best first by validation `compare.metric` (test is reported, never
    ranked on): headline test scores, the val scores ranked and selected on, calibration, and the MLflow ids.
    An ensemble's epochs and training time are its members' sums."""
    rows = []
    for variant in p.entries:
        ev = read_report(reports / variant / "evaluation.json", variant)
        members = p.ensembles.get(variant, [variant])
        train = [read_report(reports / m / "train.json", m) for m in members]
        cal = ev.get("calibration", {})
        rows.append({"variant": variant,
                     "arch": p.variant(variant).arch if variant in p.models else "ensemble: " + " + ".join(members),
                     "image_size": p.image_size(members[0]), **{k: _round(ev["test"][k]) for k in HEADLINE},
                     "accuracy_at_0.5": _round(ev.get("test_threshold_0_5", {}).get("accuracy")),
                     **{f"val_{m}": _round(ev["val"][m])
                        for m in dict.fromkeys(("auroc", p.compare.metric, p.promote.metric))},
                     "threshold": _round(ev.get("threshold")), "tta": ev.get("tta", 1),
                     "temperature": _round(cal.get("temperature")), "val_ece": _round(cal.get("val_ece_after")),
                     "test_ece": _round(cal.get("test_ece_after")),
                     "epochs": sum(t["epochs_run"] for t in train),
                     "train_seconds": round(sum(t["train_seconds"] for t in train), 2),
                     "run_id": ev["mlflow"]["run_id"],
                     "model_id": ev["mlflow"]["model_id"]})
    key = f"val_{p.compare.metric}"
    return sorted(rows, key=lambda r: -(r[key] if r[key] is not None else -1.0))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def markdown(rows: Rows, metric: str) -> str:
    head = [k for k in (rows[0] if rows else {"variant": 0}) if k not in ("run_id", "model_id")]
    lines = [f"# Leaderboard (test scores, sorted by validation {metric})", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


SUMMARY = {"accuracy": "test acc", "recall": "sens", "specificity": "spec", "auroc": "test AUROC"}
# comparison/scores.json, the only DVC metrics file: `dvc exp show` names its columns auroc.<variant> (test),
# val_auroc.<variant>, acc.<variant>..., short and unique, each variant's test AUROC first, to fit 120 columns.
SCORES = {"auroc": "auroc", "val_auroc": "val_auroc", "acc": "accuracy", "sens": "recall", "spec": "specificity"}


def scores(rows: Rows) -> dict[str, dict[str, float | None]]:
    return {name: {r["variant"]: r.get(key) for r in rows} for name, key in SCORES.items()}


def _headline(rows: Rows, metric: str, *extra: str) -> tuple[list[str], list[list[Any]]]:
    """The leaderboard's headline columns (and `extra` ones): a header and one row of values per entry."""
    head = ["variant", f"val {metric}", *SUMMARY.values(), *extra]
    return head, [[r["variant"], r[f"val_{metric}"], *(r[k] for k in [*SUMMARY, *extra])] for r in rows]


def summary(rows: Rows, metric: str, out: Path) -> str:
    """The leaderboard's headline columns as a plain-text table, and where the rest is: what the compare stage
    prints at the end of a run."""
    head, body = _headline(rows, metric, "threshold")
    cells = [head, *[["-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row]
                     for row in body]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    return "\n".join([f"Leaderboard: test scores at the threshold chosen on val, best first by val {metric}", *lines,
                      f"Full table and figures: {out}/leaderboard.md, {out}/*.png; every run in MLflow: make ui"])


def note(rows: Rows, metric: str) -> str:
    """The parent run's description: the headline columns as a markdown table (the full one is an artifact)."""
    head, body = _headline(rows, metric)
    lines = [f"**Leaderboard**: test scores at the threshold chosen on val, best first by val {metric} "
             "(all columns: leaderboard.md)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in body]
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


def compare(p: Params, reports: Path, out: Path) -> Rows:
    """Write out/{leaderboard.md,leaderboard.csv,leaderboard.json,scores.json,*.png} and log the comparison
    run; `out` appears only once both are done. Returns the leaderboard's rows."""
    rows = leaderboard(p, reports)
    figs = figures(p, rows, reports)
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "leaderboard.md").write_text(markdown(rows, p.compare.metric))
        write_csv(tmp / "leaderboard.csv", rows)
        write_json(tmp / "leaderboard.json", rows)
        write_json(tmp / "scores.json", scores(rows))
        for name, fig in figs.items():
            fig.savefig(tmp / name, dpi=110)
        log_comparison(p, rows, figs, reports)
    return rows


def log_comparison(p: Params, rows: Rows, figs: dict[str, Any], reports: Path) -> str:
    """An MLflow run for this pipeline run: the leaderboard and figures; each variant run that has no parent
    yet (trained since the last compare) becomes its child, so the UI nests one pipeline run's variants."""
    root = tracking.project_root()
    experiment_id = tracking.setup(p.mlflow.experiment, root)
    # Named after the DVC experiment, described by the leaderboard: the parent row the UI shows first.
    tags = {**tracking.run_tags("compare", root), "cxr.kind": "comparison", tracking.NOTE: note(rows, p.compare.metric)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=tracking.pipeline_run_name(), tags=tags) as run:
        mlflow.log_dict(rows, "leaderboard.json")
        mlflow.log_text(markdown(rows, p.compare.metric), "leaderboard.md")
        for name, fig in figs.items():
            mlflow.log_figure(fig, f"plots/{name}")
        if rows:  # the variant promotion would pick: best on validation
            best = next(r for r in rows if r["variant"] == best_on_val(p.entries, reports, p.promote.metric)[0])
            mlflow.log_metrics({f"best/{k}": best[k] for k in HEADLINE if best[k] is not None})
            mlflow.set_tag("best_variant", best["variant"])
        # The same columns as `dvc exp show` (auroc.<variant>, val_auroc.<variant>...): in the UI's chart view
        # each is one bar chart across pipeline runs, e.g. how tinyvgg's test AUROC moved from run to run.
        mlflow.log_metrics({f"{name}.{variant}": value for name, column in scores(rows).items()
                            for variant, value in column.items() if value is not None})
        client = MlflowClient()
        for r in rows:
            if "mlflow.parentRunId" not in client.get_run(r["run_id"]).data.tags:
                client.set_tag(r["run_id"], "mlflow.parentRunId", run.info.run_id)
                client.set_tag(r["run_id"], "pipeline_run", run.info.run_id)
    return run.info.run_id
