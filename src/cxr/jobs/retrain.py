"""`cxr retrain`: what the scheduled CI job runs. `dvc repro` (re-downloading the source first if asked), the
shift of the images the champion never saw from those it was validated on, then promotion (held back on a shift if
`retrain.on_shift` is stop), then a markdown summary for people (and for `$GITHUB_STEP_SUMMARY`)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from cxr import params, shift, tracking
from cxr.data.store import Split, load_split
from cxr.errors import CxrError
from cxr.inference import HASHES, CardError, ModelCard, load_logged
from cxr.jobs import experiment
from cxr.jobs.promote import Pin, Seen, not_applicable, pin, promote, removed_text, seen_images
from cxr.params import Params
from cxr.wording import shift_summary

log = logging.getLogger(__name__)


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """DVC of this environment; its stages' `python` is this interpreter too."""
    log.info("dvc %s", " ".join(args))
    res = subprocess.run([*experiment.DVC, *args], env=experiment.tool_env(), text=True,
                         stdout=None if check else subprocess.PIPE, stderr=None if check else subprocess.PIPE)
    if check and res.returncode:
        raise CxrError(f"`dvc {' '.join(args)}` failed (exit {res.returncode}); its output above says why")
    return res


SHIFT = Path("shift")  # where `cxr retrain` writes its shift report (`cxr shift` writes there by default too)
MIN_IMAGES = 50  # on either side, or no shift report: a domain classifier's folds need some of each class
MAX_IMAGES = 1000  # a seeded sample of each side beyond this: the report stays within a minute on a CPU
HEADS = {"promoted": "promoted a new champion", "kept": "kept the champion",
         "stopped": "stopped before promotion (retrain.on_shift: stop)"}


def champion_shift(p: Params, data: Path, pinned: Pin) -> dict[str, Any] | None:
    """The shift report (`shift_since_seen`) of the champion's version `pinned`, resolved once for the whole
    retraining, on the data prepared now: None without a champion; a report that says "not measured" for a
    champion of an older version of the project, which has no list of the images it saw."""
    if pinned.champion is None:
        return None
    tracking.setup(p.mlflow.experiment)
    uri = tracking.model_uri(p.mlflow.registered_model, pinned.champion.version)
    try:
        seen = seen_images(uri)
    except CxrError:  # a champion of an older version of the project
        return {"verdict": f"not measured: the champion has no list of the images it saw ({HASHES})", "shifted": {}}
    try:
        model, card = load_logged(uri)
        why_not = not_applicable(card, data)
    except CardError as e:
        model, card, why_not = None, None, str(e)
    if why_not:  # its images alone are compared, at the size the pipeline prepares
        model, card = None, None
    size = card.image_size if card else p.gray.image_size
    splits = [load_split(data / str(size), split, mmap=True) for split in ("train", "val", "test")]
    return shift_since_seen(seen, splits, p.seed, model, card, why_not)


def shift_since_seen(seen: Seen, splits: list[Split], seed: int, model: torch.nn.Module | None = None,
                     card: ModelCard | None = None, why_not: str = "") -> dict[str, Any]:
    """cxr.shift's report on the images of `splits` of patients the champion never trained or validated on (the
    new ones, and the test split) against those it was validated on (`seen`), through its features where it
    applies to this data (`why_not`: why it does not). Its validation images, not its training images: on those its
    features carry what it memorised, which a domain classifier reads as a shift (0.92 on a 1-epoch tinyvgg's 150
    training images against Kaggle's test, tests/test_retrain.py); with fewer than MIN_IMAGES of them, its
    training images join them and the report says so. Too few on a side: a report that says so."""
    inside = {"validated on": seen.validated, "trained or validated on": seen.images}
    picked = {side: [(s, i) for s in splits for i, m in enumerate(s.meta) if m["sha256"] in hashes]
              for side, hashes in inside.items()}
    picked["never seen"] = [(s, i) for s in splits for i, m in enumerate(s.meta)  # nor any image of its patient
                            if m["sha256"] not in seen.images and m["patient_id"] not in seen.patients]
    picked.pop("validated on" if len(picked["validated on"]) < MIN_IMAGES else "trained or validated on")
    if min(map(len, picked.values())) < MIN_IMAGES:
        return {"verdict": "not measured: " + " and ".join(f"{len(v)} images the champion {k}" for k, v in
                                                            picked.items()) +
                f" are in the prepared data; the report needs {MIN_IMAGES} of each", "shifted": {}}
    rng = np.random.default_rng(seed)
    report = shift.shift_report(*(image_set(side, items, rng) for side, items in picked.items()), model, card)
    if why_not:
        report["verdict"] += f" (images only: the champion cannot be applied to this data, {why_not})"
    elif "trained or validated on" in picked:
        report["verdict"] += (f" (fewer than {MIN_IMAGES} of its validation images are here: its training images "
                              "are in the reference, on which its features may differ by memorisation alone)")
    return report


def image_set(side: str, items: list[tuple[Split, int]], rng: np.random.Generator) -> shift.ImageSet:
    """The images `items` (split, index) as one side of a shift report, a seeded sample of MAX_IMAGES of them
    where there are more."""
    if len(items) > MAX_IMAGES:
        items = [items[i] for i in sorted(rng.choice(len(items), MAX_IMAGES, replace=False))]
    metas = [s.meta[i] for s, i in items]
    return shift.ImageSet(side, np.stack([s.images[i] for s, i in items]), np.array([int(m["width"]) for m in metas]),
                          np.array([int(m["height"]) for m in metas]), np.array([s.labels[i] for s, i in items]),
                          np.array([m["patient_id"] for m in metas]))


def shift_section(report: dict[str, Any] | None, decision: str, on_shift: str) -> list[str]:
    """The summary's section on the images the champion never saw against those it was validated on, and what
    the shift did to the decision."""
    if report is None:
        return []
    if decision == "stopped":
        meaning = ("retrain.on_shift is stop: nothing was promoted. Look at the report; `cxr promote` decides "
                   "without it, or set retrain.on_shift: warn.")
    elif any(report["shifted"].values()) and on_shift == "warn":
        meaning = "retrain.on_shift is warn: the decision went ahead as usual (stop would have held it back)."
    else:
        meaning = ""
    lines = ["### Shift: the images the champion never saw against those it was validated on"]
    for paragraph in shift_summary(report, "", f"{SHIFT}/shift.json, {SHIFT}/shift.png (and the candidate's MLflow "
                                   "run, under shift/)", meaning):
        lines += ["", paragraph]
    return [*lines, ""]


def summary(record: dict[str, Any], comparison: Path, on_shift: str = "warn") -> str:
    """Markdown: the decision, candidate against champion, the shift of the new images, the leaderboard and
    what changed since HEAD."""
    m, cand, prev = record["metric"], record["candidate"], record["previous_champion"]
    lines = [f"## Retraining: {HEADS[record['decision']]}",
             "", f"{record['reason']}.", "", f"| | variant | version | val {m} | test {m} |", "|---|---|---|---|---|",
             f"| candidate | {cand['variant']} | {cand['version']} | {cand['val']:.4f} | {cand['test']:.4f} |"]
    if prev:
        score = "n/a" if prev["test"] is None else f"{prev['test']:.4f}"
        lines.append(f"| champion before | {prev['variant']} | {prev['version']} | | {score} |")
    if d := record.get("difference"):
        lines += ["", f"Candidate - champion on test {m}: {d['difference']:+.4f}, 95% interval "
                      f"[{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}] ({d['resamples']} paired bootstrap resamples by "
                      f"{d.get('unit', 'image')}); "
                      f"promotion needs the interval above min_delta {record['min_delta']}."]
    if n := record.get("test_images"):
        patients = f" ({n['patients_used']} of {n['patients_total']} patients)" if n["patients_total"] else ""
        whose = "whose patients" if n["patients_total"] else "that"
        lines += ["", f"Test scores are on the {n['used']} of {n['total']} test images{patients} {whose} no model "
                      f"compared trained or validated on (removed: {removed_text(n) or 'none'})."]
    lines += ["", f"`{record['registered_model']}@{tracking.CHAMPION}` is version {record['champion_version']}.", ""]
    lines += shift_section(record.get("shift"), record["decision"], on_shift)
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
            profile: str = "", source: str = "") -> tuple[str, dict[str, Any]]:
    """Run the pipeline (as params.yaml says, or a profile of it on `source`), the shift report and the
    promotion; return the markdown summary and the promotion's record."""
    if profile:  # e.g. quick on a CPU runner: its params stay in params.yaml for promotion (CI's checkout)
        experiment.run(profile, source, force=refresh_data)  # a small run: all of it again
        p = params.load()
    else:
        if refresh_data:  # the source may have changed upstream while its params did not
            dvc("repro", "--force", "--single-item", "download")
        dvc("repro")
    pinned = pin(p)  # the champion's version, once: its shift report and the comparison read that version
    report = champion_shift(p, data, pinned)
    if report and "images" in report:
        shift.write(report, SHIFT)
    record = promote(p, reports, data, out, comparison, report and shift.public(report), pinned)
    if report and "images" in report:  # beside the candidate's scores, where its promotion tags are
        for path in (SHIFT / "shift.json", SHIFT / "shift.png"):
            MlflowClient().log_artifact(record["candidate"]["run_id"], str(path), "shift")
    return summary(record, comparison, p.retrain.on_shift), record
