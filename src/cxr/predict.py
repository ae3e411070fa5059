"""`cxr predict IMAGE...`: classify images with a registered model (by default the champion), preprocessed
exactly as the pipeline prepared its training data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr.data.gray import decode
from cxr.registry import load
from cxr.training.loop import probs_of


def read(path: Path, size: int, fit: str) -> np.ndarray:
    """One image as the grayscale stage would store it; OSError with the reason when it cannot."""
    if not path.is_file():
        raise OSError("no such file" if not path.exists() else "not a file")
    result = decode((str(path), str(path)), [size], fit)  # the grayscale stage's checks and conversion
    if isinstance(result, str):
        raise OSError(result)
    return result[0][0]


def predict(uri: str, paths: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per readable image {path, class, probability} (the probability of the class given); and one
    'path: reason' per image that could not be read."""
    model, card = load(uri)
    names, good, images, errors = card["classes"], [], [], []
    for path in paths:
        try:
            images.append(read(path, card["image_size"], card["fit"]))
            good.append(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    if not images:
        return [], errors
    probs = probs_of(model, np.stack(images))
    rows = []
    for path, pr in zip(good, probs.tolist(), strict=True):
        row: dict[str, Any] = {"path": str(path)}
        if isinstance(pr, float):  # binary: P(PNEUMONIA) against the threshold chosen on validation
            k = int(pr > card["threshold"])
            row |= {"class": names[k], "probability": round(pr if k else 1 - pr, 4), "p_pneumonia": round(pr, 4),
                    "threshold": round(card["threshold"], 4)}
        else:
            k = max(range(len(pr)), key=pr.__getitem__)
            row |= {"class": names[k], "probability": round(pr[k], 4)}
        rows.append(row)
    return rows, errors
