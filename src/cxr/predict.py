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
    """Per readable image {image, p_pneumonia, decision, threshold} (binary; P(PNEUMONIA) unrounded, float32,
    against the threshold chosen on validation) or {image, p_<class>..., decision}; one 'path: reason' per
    image that could not be read; and the model's card."""
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
        row: dict[str, Any] = {"image": str(path)}
        if card.binary:
            row |= {"p_pneumonia": pr, "decision": card.classes[k], "threshold": card.threshold}
        else:
            row |= {f"p_{c.lower()}": v for c, v in zip(card.classes, pr, strict=True)} | {"decision": card.classes[k]}
        rows.append(row)
    return rows, errors, card


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
