"""`cxr retrain`: what the scheduled CI job runs. `dvc repro` (re-downloading the source first if asked),
then promotion, then a markdown summary for people (and for `$GITHUB_STEP_SUMMARY`)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from cxr import params, profiles
from cxr.errors import CxrError
from cxr.params import Params
from cxr.registry import promote

log = logging.getLogger(__name__)


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """DVC of this environment; its stages' `python` is this interpreter too."""
    log.info("dvc %s", " ".join(args))
    res = subprocess.run([*profiles.DVC, *args], env=profiles.tool_env(), text=True,
                         stdout=None if check else subprocess.PIPE, stderr=None if check else subprocess.PIPE)
    if check and res.returncode:
        raise CxrError(f"`dvc {' '.join(args)}` failed (exit {res.returncode}); its output above says why")
    return res


def summary(record: dict[str, Any], comparison: Path) -> str:
    """Markdown: the decision, candidate against champion, the leaderboard and what changed since HEAD."""
    m, cand, prev = record["metric"], record["candidate"], record["previous_champion"]
    lines = [f"## Retraining: {'promoted a new champion' if record['decision'] == 'promoted' else 'kept the champion'}",
             "", f"{record['reason']}.", "", f"| | variant | version | val {m} | test {m} |", "|---|---|---|---|---|",
             f"| candidate | {cand['variant']} | {cand['version']} | {cand['val']:.4f} | {cand['test']:.4f} |"]
    if prev:
        score = "n/a" if prev["test"] is None else f"{prev['test']:.4f}"
        lines.append(f"| champion before | {prev['variant']} | {prev['version']} | | {score} |")
    if d := record.get("difference"):
        lines += ["", f"Candidate - champion on test {m}: {d['difference']:+.4f}, 95% interval "
                      f"[{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}] ({d['resamples']} paired bootstrap resamples); "
                      f"promotion needs the interval above min_delta {record['min_delta']}."]
    if n := record.get("test_images"):
        seen = ", ".join(f"{v} seen by the {k.removeprefix('seen_by_')}" for k, v in n.items()
                         if k.startswith("seen_by_"))
        lines += ["", f"Test scores are on the {n['used']} of {n['total']} test images that no model compared trained "
                      f"or validated on ({seen})."]
    lines += ["", f"`{record['registered_model']}@champion` is version {record['champion_version']}.", ""]
    board = comparison / "leaderboard.md"
    if board.exists():
        lines += ["##" + board.read_text().removeprefix("#"), ""]  # a section of the summary
    return "\n".join(lines + metrics_diff())


def metrics_diff() -> list[str]:
    """The test scores that changed since the last commit (`dvc metrics diff`), as a markdown table."""
    res = dvc("metrics", "diff", "--json", check=False)
    try:
        diff = json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return []
    rows = [f"| {key.split('.', 1)[1]} | {key.split('.')[0]} | {_num(d.get('old'))} | {_num(d.get('new'))} | "
            f"{_num(d.get('diff'), '+')} |" for path, changes in sorted(diff.items()) if path.endswith("scores.json")
            for key, d in sorted(changes.items()) if not key.startswith(("val_", "best."))]  # best: a repeat
    head = ["## Test scores changed since the last commit", "", "| variant | metric | before | now | change |",
            "|---|---|---|---|---|"]
    return head + rows + [""] if rows else []


def _num(x: float | None, sign: str = "") -> str:
    return "" if x is None else f"{x:{sign}.4f}"


def retrain(p: Params, refresh_data: bool, reports: Path, data: Path, comparison: Path, out: Path,
            profile: str = "", source: str = "") -> str:
    """Run the pipeline (as params.yaml says, or a profile of it on `source`) and the promotion; return the
    markdown summary."""
    if profile:  # e.g. quick on a CPU runner: its params stay in params.yaml for promotion (CI's checkout)
        profiles.run(profile, source, keep_params=True, force=refresh_data)  # a small run: all of it again
        p = params.load()
    else:
        if refresh_data:  # the source may have changed upstream while its params did not
            dvc("repro", "--force", "--single-item", "download")
        dvc("repro")
    record = promote(p, reports, data, out, comparison)
    return summary(record, comparison)
