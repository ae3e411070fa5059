"""`cxr predict IMAGE...`: classify images with a registered model (by default the champion), preprocessed
exactly as the pipeline prepared its training data (the model card's size, fit, JPEG draft scale and
equalisation), then scored as evaluate scored it (TTA views, temperature, threshold)."""

from __future__ import annotations

import glob
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


def expand(items: list[str]) -> list[Path]:
    """Files as given; folders: their image files, recursively, sorted; globs (quoted, so the shell left them):
    what they match. A name that matches nothing stays, so that it is reported as missing."""
    out: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        for path in map(Path, matches or [item]):
            if path.is_dir():
                out += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                              and not f.name.startswith("."))
            else:
                out.append(path)
    return out


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
