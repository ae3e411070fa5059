"""Resume states on disk: written every `checkpoint_every` epochs on a background thread (one at a time),
read back only when they come from the same settings and the same arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from cxr.io import atomic_path

log = logging.getLogger(__name__)


def fingerprint(settings: Any, data: Path) -> str:
    """What a resume state must match: the settings (JSON-able) and the training arrays themselves, so a
    change of image size, fit, draft or data starts afresh."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in ("classes.json", "preprocessing.json", "train_images.npy", "train_labels.npy", "val_images.npy",
                 "val_labels.npy"):
        with (data / name).open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def read_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.info("%s is from other settings or data: starting afresh", path)
        return None
    return state


class StateWriter:
    """Writes states (already copied off the training tensors) on a thread, so that the next epoch runs while
    the file is written; the time the training thread spends waiting for a write is counted in `seconds`."""

    def __init__(self, path: Path, extra: dict[str, Any]) -> None:
        self.path, self.extra, self.seconds = path, extra, 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __call__(self, state: dict[str, Any]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state | self.extra,), daemon=True)
        self._thread.start()

    def _write(self, state: dict[str, Any]) -> None:
        try:
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)
        except BaseException as e:  # raised in the training thread at its next wait
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self.seconds += time.perf_counter() - t0
            self._thread = None
        if self._error is not None:
            raise self._error
