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
from cxr.params import metric_label
from cxr.wording import SCORE_NAMES, SHOWN, score_text

BOARD = "comparison/leaderboard.json"
SCORES_FILE = "comparison/scores.json"


# name, leaderboard rows, its best variant, and its outputs as its dvc.lock records them (None where DVC shows none)
Experiment = tuple[str, list[dict[str, Any]], str | None, str | None]
# The score columns (by index in `table`'s header) to leave out, first to last, when the rows are too wide: acc
# (sens and spec say more), val (the rule is in the title), spec, sens (pneumonia found, kept longer for a screen).
# Test AUROC always stays: alone it still ranks, where sens or spec alone flatters a model calling every image one way.
LEAST_FIRST = (3, 2, 5, 4)


def experiments() -> list[Experiment]:
    """Per experiment of `dvc exp show`, the workspace first: its name, leaderboard rows, the variant its
    compare stage named best (`best.variant` of comparison/scores.json: promotion's rule, on unrounded scores)
    and `outputs`. Those without results (a commit before any run) are left out."""
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
                out.append((name, rows, (scores.get("best") or {}).get("variant"), outputs(exp.get("data") or {})))
    return out


def outputs(data: dict[str, Any]) -> str | None:
    """The hash of every DVC output as an experiment's dvc.lock records it (the workspace's: the file as it is
    now), from its `data` in `dvc exp show --json`, as one string to compare; None when DVC shows none (a commit
    whose dvc.lock is not in git). Stages a profile did not run have none either: they compare as absent."""
    hashes = {path: (o or {}).get("hash") for path, o in (data.get("outs") or {}).items()}
    return json.dumps(hashes, sort_keys=True) if any(hashes.values()) else None


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
    return [{"variant": v, **{key: (data.get(name.dvc) or {}).get(v) for key, name in SCORE_NAMES.items() if name.dvc}}
            for v in data.get("val_auroc") or {}]


def best(rows: list[dict[str, Any]], metric: str, named: str | None) -> dict[str, Any]:
    """The row of the variant the run named best, else the one with the highest validation `metric`."""
    scored = [r for r in rows if r.get(f"val_{metric}") is not None]
    by_name = [r for r in rows if r["variant"] == named]
    return by_name[0] if by_name else max(scored, key=lambda r: r[f"val_{metric}"]) if scored else rows[0]


def table(exps: list[Experiment], metric: str, per_variant: bool, width: int) -> str:
    """The text `cxr results` prints: within `width` (80 and up) by leaving out the least important score columns
    (`LEAST_FIRST`, said in a line under the table); experiment and variant names are never cut (one too long for
    `width` widens the lines). A line says which experiments have the same scores, and why where DVC can tell."""
    if not exps:
        raise CxrError(f"no experiment has results yet; run {run_pipeline()}")
    label = metric_label(metric)
    head = ["experiment", "variant", f"val {label}", *(SCORE_NAMES[k].short for k in SHOWN)]
    shown: list[list[list[str]]] = []  # per experiment, its rows' cells
    for name, rows, named, _ in exps:
        top = best(rows, metric, named)
        shown.append([])
        for i, r in enumerate([top, *(r for r in rows if r is not top)] if per_variant else [top]):
            shown[-1].append([name if i == 0 else "", r["variant"], score_text(r.get(f"val_{metric}"), short=True),
                              *(score_text(r.get(k), r.get(f"{k}_ci95"), short=True) for k in SHOWN)])
    body = [row for rows in shown for row in rows]
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    cols = list(range(len(head)))

    def span(cs: list[int]) -> int:
        return sum(widths[i] for i in cs) + 2 * (len(cs) - 1)

    full = span(cols)
    for i in LEAST_FIRST:
        if span(cols) <= width:
            break
        cols.remove(i)
    lines = ["  ".join(row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in cols).rstrip()
             for row in [head, *body]]
    notes = []
    if dropped := [head[i] for i in range(len(head)) if i not in cols]:
        command = "cxr results --variants" if per_variant else "cxr results"
        notes.append(f"Left out to fit {width} columns: {', '.join(dropped)}. A terminal {full} columns wide shows "
                     f"them, as does `COLUMNS={full} {command}`.")
    notes += same_scores(exps, [[row[1:] for row in rows] for rows in shown])
    rule = ("every variant, best first" if per_variant else
            "its best variant (the one `cxr promote` would register)")
    units = {name: (rows[0] if rows else {}).get("interval_unit", "image") for name, rows, *_ in exps}
    ci = f"95% interval by {units[exps[0][0]]}" if len(set(units.values())) == 1 else \
        "95% interval by patient; by image for " + ", ".join(n for n, u in units.items() if u == "image")
    title = (f"Per experiment, {rule} by validation {label}. Test scores at the threshold chosen on validation "
             f"[{ci}]; sens = sensitivity (share of pneumonia found), spec = specificity (share of normal "
             "cleared).")
    return "\n".join([textwrap.fill(title, width), *lines, *(textwrap.fill(n, width) for n in notes)]) + "\n"


def same_scores(exps: list[Experiment], cells: list[list[list[str]]]) -> list[str]:
    """A line per group of experiments whose rows (`cells`, in the order of `exps`, without the name) read the
    same: whether their dvc.lock files record the same outputs (the workspace holds an experiment's after `dvc exp
    run` or `dvc exp apply`), different ones, or DVC shows none to tell."""
    groups: dict[str, list[Experiment]] = {}
    for exp, rows in zip(exps, cells, strict=True):
        groups.setdefault(json.dumps(rows), []).append(exp)
    out = []
    for group in (g for g in groups.values() if len(g) > 1):
        names = [name for name, *_ in group]
        outs = {exp[3] for exp in group}
        if None in outs:
            why = "the same scores to the digits shown (DVC shows no outputs for some of them: one run or not, unknown)"
        elif len(outs) > 1:
            why = "the same scores to the digits shown, from different outputs (their dvc.lock hashes differ)"
        elif names[0] == "workspace":
            why = (f"the workspace holds {' and '.join(names[1:])}'s outputs: its dvc.lock records the same output "
                   "hashes (as `dvc exp run` and `dvc exp apply` leave it)")
        else:
            why = "the same outputs: their dvc.lock files record the same hashes"
        out.append(f"{' = '.join(names)}: {why}.")
    return out


def show(metric: str, per_variant: bool) -> str:
    return table(experiments(), metric, per_variant, max(80, shutil.get_terminal_size((120, 24)).columns))
