"""`cxr results`: the DVC experiments as a table that fits a terminal. One row per experiment (its best variant
by validation, as `cxr promote` picks it) or, with `--variants`, one per experiment and variant; test scores with
their 95% intervals. The experiments are `dvc exp show --json`'s; each one's leaderboard (comparison/
leaderboard.json, which DVC commits with the experiment) gives the intervals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from typing import Any

from cxr.errors import CxrError, run_pipeline
from cxr.io import short_interval
from cxr.params import SCORES, metric_label

BOARD = "comparison/leaderboard.json"
SCORES_FILE = "comparison/scores.json"
TEST = {"accuracy": "acc", "recall": "sens", "specificity": "spec", "auroc": "AUROC"}


Experiment = tuple[str, list[dict[str, Any]], str | None]  # name, leaderboard rows, its best variant


def experiments() -> list[Experiment]:
    """Per experiment of `dvc exp show`, the workspace first: its name, leaderboard rows and the variant its
    compare stage named best (`best.variant` of comparison/scores.json: promotion's rule, on unrounded scores).
    Those without results (a commit before any run) are left out."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if proc.returncode:
        raise CxrError(f"dvc exp show failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    out = []
    for state in json.loads(proc.stdout or "[]"):
        tips = [(state.get("name") or state["rev"][:7] if state["rev"] != "workspace" else "workspace", state),
                *((r.get("name") or r["revs"][0]["rev"][:7], r["revs"][0]) for r in state.get("experiments") or [])]
        for name, exp in tips:
            scores = (((exp.get("data") or {}).get("metrics") or {}).get(SCORES_FILE) or {}).get("data") or {}
            if rows := _board(exp["rev"]) or _from_scores(scores):
                out.append((name, rows, (scores.get("best") or {}).get("variant")))
    return out


def _board(rev: str) -> list[dict[str, Any]] | None:
    """The leaderboard the experiment at `rev` wrote ("workspace": the file as it is now)."""
    if rev == "workspace":
        try:
            with open(BOARD) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
    proc = subprocess.run(["git", "show", f"{rev}:{BOARD}"], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        return None


def _from_scores(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows from the metrics DVC shows, without intervals: for an experiment whose leaderboard is not in git."""
    return [{"variant": v, **{key: (data.get(short) or {}).get(v) for short, key in SCORES.items()}}
            for v in data.get("val_auroc") or {}]


def cell(row: dict[str, Any], key: str) -> str:
    """A score as `0.812 [.781–.842]` (its 95% interval, leading zeros dropped to fit), or `-`."""
    v = row.get(key)
    if v is None:
        return "-"
    return f"{v:.3f}{short_interval(row.get(f'{key}_ci95'))}"


def best(rows: list[dict[str, Any]], metric: str, named: str | None) -> dict[str, Any]:
    """The row of the variant the run named best, else the one with the highest validation `metric`."""
    scored = [r for r in rows if r.get(f"val_{metric}") is not None]
    by_name = [r for r in rows if r["variant"] == named]
    return by_name[0] if by_name else max(scored, key=lambda r: r[f"val_{metric}"]) if scored else rows[0]


def table(exps: list[Experiment], metric: str, per_variant: bool, width: int) -> str:
    """The text `cxr results` prints; the experiment column is cut to keep each line within `width`."""
    if not exps:
        raise CxrError(f"no experiment has results yet; run {run_pipeline()}")
    label = metric_label(metric)
    head = ["experiment", "variant", f"val {label}", *TEST.values()]
    body = []
    for name, rows, named in exps:
        top = best(rows, metric, named)
        for i, r in enumerate([top, *(r for r in rows if r is not top)] if per_variant else [top]):
            v = r.get(f"val_{metric}")
            body.append([name if i == 0 else "", r["variant"], "-" if v is None else f"{v:.3f}",
                         *(cell(r, k) for k in TEST)])
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    widths[0] = max(4, min(widths[0], width - sum(widths[1:]) - 2 * (len(widths) - 1)))
    lines = ["  ".join((c if len(c) <= w else c[:w - 1] + "…").ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in [head, *body]]
    rule = ("every variant, best first" if per_variant else
            "its best variant (the one `cxr promote` would register)")
    units = {name: (rows[0] if rows else {}).get("interval_unit", "image") for name, rows, _ in exps}
    ci = f"95% interval by {units[exps[0][0]]}" if len(set(units.values())) == 1 else \
        "95% interval by patient; by image for " + ", ".join(n for n, u in units.items() if u == "image")
    title = (f"Per experiment, {rule} by validation {label}. Test scores at the threshold chosen on validation "
             f"[{ci}]; sens = sensitivity (share of pneumonia found), spec = specificity (share of normal "
             "cleared).")
    return "\n".join([textwrap.fill(title, width), *lines]) + "\n"


def show(metric: str, per_variant: bool) -> str:
    return table(experiments(), metric, per_variant, shutil.get_terminal_size((120, 24)).columns)
