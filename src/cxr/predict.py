"""`cxr predict IMAGE...`: classify images with a registered model (by default the champion), preprocessed
exactly as the pipeline prepared its training data (the model card's size, fit, JPEG draft scale and
equalisation), then scored as evaluate scored it (TTA views, temperature, threshold)."""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cxr.data.gray import decode
from cxr.data.sources import IMAGE_SUFFIXES
from cxr.inference import ModelCard, load_logged


def read(path: Path, card: ModelCard) -> np.ndarray:
    """One image as the grayscale stage stored it for this model; OSError with the reason when it cannot."""
    if not path.is_file():
        raise OSError("no such file" if not path.exists() else "not a file")
    result = decode((str(path), str(path)), [card.image_size], card.fit, card.draft, card.equalize)  # the stage's
    if isinstance(result, str):
        raise OSError(result)
    return result[0][0]


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
                out += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                              and not f.name.startswith("."))
            else:
                out.append(path)
    return out, missing


def predict(uri: str, paths: list[Path]) -> tuple[list[dict[str, Any]], list[str], ModelCard]:
    """Per readable image {path, class, probability} (the probability of the class given); one
    'path: reason' per image that could not be read; and the model's card."""
    model, card = load_logged(uri)
    good, images, errors = [], [], []
    for path in paths:
        try:
            images.append(read(path, card))
            good.append(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    if not images:
        return [], errors, card
    probs = card.probs_of(model, np.stack(images))
    rows = []
    for path, pr, k in zip(good, probs.tolist(), card.predicted(probs).tolist(), strict=True):
        row: dict[str, Any] = {"path": str(path), "class": card.classes[k]}
        if card.binary:  # P(PNEUMONIA) against the threshold chosen on validation, unrounded (float32)
            row |= {"probability": pr if k else 1 - pr, "p_pneumonia": pr, "threshold": card.threshold}
        else:
            row |= {"probability": pr[k], "probabilities": dict(zip(card.classes, pr, strict=True))}
        rows.append(row)
    return rows, errors, card


def render(rows: list[dict[str, Any]], card: ModelCard, uri: str, fmt: str) -> str:
    """`cxr predict`'s output: "json" (an object per line), "csv" (a header, a row per image) or "table" (the
    model and its threshold, then image, P(pneumonia) and decision per line)."""
    if fmt == "json":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "csv":
        flat = [{k: v for k, v in r.items() if k != "probabilities"}
                | {f"p_{c.lower()}": v for c, v in r.get("probabilities", {}).items()} for r in rows]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(flat[0]) if flat else ["path"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return out.getvalue()
    rule = f", threshold {card.threshold:.4f} on P(pneumonia) (chosen on val)" if card.binary else ""
    lines = [f"{uri}: {card.variant} ({card.arch}, {card.image_size} px, TTA {len(card.tta_views)}{rule})"]
    width = max((len(r["path"]) for r in rows), default=5)
    if card.binary:
        lines.append(f"{'image':<{width}}  P(pneumonia)  decision")
        lines += [f"{r['path']:<{width}}  {r['p_pneumonia']:>12.4f}  {r['class']}" for r in rows]
    else:
        lines.append(f"{'image':<{width}}  " + "  ".join(f"P({c.lower()})" for c in card.classes) + "  decision")
        lines += [f"{r['path']:<{width}}  " + "  ".join(f"{r['probabilities'][c]:>{len(c) + 3}.4f}"
                                                        for c in card.classes) + f"  {r['class']}" for r in rows]
    return "\n".join(lines) + "\n"
