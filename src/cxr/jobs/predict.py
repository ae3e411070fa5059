"""`cxr predict IMAGE...`: classify images with a registered model (by default the champion), preprocessed
exactly as the pipeline prepared its training data (the model card's size, fit, JPEG draft scale and
equalisation), then scored as evaluate scored it (TTA views, temperature, threshold)."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from cxr import explain
from cxr.data.sources import is_image_file
from cxr.inference import ModelCard, load_logged
from cxr.io import atomic_path
from cxr.plots import plt
from cxr.serving import LOG_ENV, Decoded, PredictionLog, identity, read, registered_version, score


def expand(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given; folders: their image files, recursively, sorted; globs (quoted, so the shell left them):
    what they match. And one 'item: reason' per name that matches nothing: checked before any model loads."""
    out: list[Path] = []
    missing: list[str] = []
    for item in items:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches or not Path(matches[0]).exists():  # a glob's matches exist; a plain name may not
            missing.append(f"{item}: {'no file matches this pattern' if glob.has_magic(item) else 'no such file'}")
            continue
        for path in map(Path, matches):
            if path.is_dir():
                out += sorted(f for f in path.rglob("*") if f.is_file() and is_image_file(f))
            else:
                out.append(path)
    return out, missing


def _load(uri: str, paths: list[Path]) -> tuple[Any, ModelCard, list[Path], list[Decoded], list[str]]:
    """The model and card at `uri`; the readable images as the card prepares them, and 'path: reason' for the
    others."""
    model, card = load_logged(uri)
    good, images, errors = [], [], []
    for path in paths:
        try:
            images.append(read(path, card))
            good.append(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    return model, card, good, images, errors


def predict(uri: str, paths: list[Path]) -> tuple[list[dict[str, Any]], list[str], ModelCard]:
    """Per readable image {image, score's columns}; one 'path: reason' per image that could not be read; and
    the model's card. Each scored image is logged as the served model logs it (where CXR_PREDICTION_LOG is set)."""
    model, card, good, images, errors = _load(uri, paths)
    scored = score(model, card, [d.gray for d in images])
    if os.environ.get(LOG_ENV):
        PredictionLog.from_env(identity(uri) | {"variant": card.variant}).write(images, scored)
    rows = [{"image": str(path)} | row for path, row in zip(good, scored, strict=True)]
    return rows, errors, card


def explain_images(uri: str, paths: list[Path], out: Path) -> tuple[list[str], list[str]]:
    """`cxr explain`: per readable image, out/<name>.png (the image as the model saw it, the map of what drove
    P(pneumonia) over it, the prediction in the title); a line per image written, and 'path: reason' per image
    that could not be read."""
    model, card, good, images, errors = _load(uri, paths)
    if not images:
        return [], errors
    grays = [d.gray for d in images]
    rows = score(model, card, grays)
    heat, label = explain.saliency(model, card, np.stack(grays))
    out.mkdir(parents=True, exist_ok=True)
    names: dict[str, int] = {}
    lines = []
    for path, row, image, h in zip(good, rows, grays, heat, strict=True):
        n = names[path.stem] = names.get(path.stem, 0) + 1  # same names in two folders: a suffix, not a clash
        target = out / f"{path.stem}{'' if n == 1 else f'-{n}'}.png"
        fig = explain.figure(image, h, path.name, row, label)  # the full path is in the line printed
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        lines.append(f"{target}  {explain.verdict(row)}  ({label})")
    return lines, errors


def model_facts(uri: str) -> dict[str, Any]:
    """The pipeline run behind a model URI (`models:/name@alias`, `models:/name/version`, `models:/<model id>`,
    `runs:/...`): the registry version where there is one, its DVC experiment and its sensitivity and
    specificity on validation and test; {} where MLflow knows no such run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(mlflow.models.get_model_info(uri).run_id)
        version = (registered_version(uri) or ("", ""))[1]
    except (MlflowException, OSError):
        return {}
    return {"version": f"version {version}" if version else "", "experiment": run.data.tags.get("dvc_exp_name", ""),
            **{k: run.data.metrics.get(k) for k in FACTS}}


FACTS = ("val_best/recall", "val_best/specificity", "test/recall", "test/specificity")


def summary(rows: list[dict[str, Any]], card: ModelCard, facts: dict[str, Any]) -> str:
    """The lines under `cxr predict`'s table: how many images each decision took, at which threshold, and (a
    binary model) how it did on validation and test, so that a run of calls is read against its operating
    point."""
    counts = {c: sum(r["decision"] == c for r in rows) for c in card.classes}
    rule = f" (P(pneumonia) > {card.threshold:.4f}, chosen on validation)" if card.binary else ""
    calls = ", ".join(f"{n} called {c}" for c, n in counts.items())
    lines = [f"{len(rows)} image{'s' * (len(rows) != 1)}: {calls}{rule}."]
    if card.binary and all(facts.get(k) is not None for k in FACTS):
        val_sens, val_spec, sens, spec = (facts[k] for k in FACTS)
        name = ", ".join(x for x in (card.variant, facts["version"]) if x)
        lines.append(f"This model ({name}) on validation: sensitivity {val_sens:.3f}, specificity {val_spec:.3f}; "
                     f"on test: sensitivity {sens:.3f}, specificity {spec:.3f}, so it calls about {1 - spec:.0%} "
                     "of normal test images pneumonia.")
    if facts.get("experiment") == "quick":
        lines.append(f"It comes from the experiment `quick` (`make quick`: a few epochs at {card.image_size} px), a "
                     "first run of the pipeline, not a model to screen with; `make cpu-best` trains the best 2-core "
                     "recipe, then `cxr promote`.")
    return "".join(textwrap.fill(line, 120, subsequent_indent="  ") + "\n" for line in lines)


def render(rows: list[dict[str, Any]], card: ModelCard, uri: str, fmt: str) -> str:
    """`cxr predict`'s output: "json" (an object per line), "csv" (a header, a row per image) or "table" (the
    model and its threshold, then image, P(pneumonia) and decision per line)."""
    if fmt == "json":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["image"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    rule = f", threshold {card.threshold:.4f} on P(pneumonia) (chosen on val)" if card.binary else ""
    lines = [f"{uri}: {card.variant} ({card.arch}, {card.image_size} px, TTA {len(card.tta_views)}{rule})"]
    width = max((len(r["image"]) for r in rows), default=5)
    scores = [k for k in (rows[0] if rows else {}) if k.startswith("p_")]
    lines.append(f"{'image':<{width}}  " + "  ".join(f"P({k[2:]})" for k in scores) + "  decision")
    lines += [f"{r['image']:<{width}}  " + "  ".join(f"{r[k]:>{len(k) + 1}.4f}" for k in scores) + f"  {r['decision']}"
              for r in rows]
    return "\n".join(lines) + "\n"
