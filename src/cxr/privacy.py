"""Pseudonyms for what could name a patient (file names, patient ids), under `tracking.privacy: strict` and for
every PatientID read from a DICOM header: a keyed hash (HMAC-SHA256) with the project's secret salt, so the same
file or patient always gets the same pseudonym, and nobody without the salt can test a guessed name or id."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

SALT_ENV = "CXR_SALT"  # a team's shared salt (a CI secret); else the file below
SALT_FILE = ".cxr-salt"  # git-ignored; the nearest one in this folder or above (queued experiments run below)


def salt(start: Path | None = None) -> bytes:
    """$CXR_SALT, else the nearest .cxr-salt from `start` (the working folder) up; made at the project root (the
    folder with dvc.yaml) with 32 random bytes when there is none."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode()
    here = (start or Path.cwd()).resolve()
    found = next((d / SALT_FILE for d in (here, *here.parents) if (d / SALT_FILE).is_file()), None)
    if found is None:
        root = next((d for d in (here, *here.parents) if (d / "dvc.yaml").is_file()), here)
        found = root / SALT_FILE
        try:
            fd = os.open(found, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            log.warning("made the project's secret salt, %s: keep it with the data and out of git (a new salt "
                        "gives every file and patient a new pseudonym, and so a new split)", found)
        except FileExistsError:  # another stage made it just now
            pass
    return found.read_bytes().strip()


def pseudonym(value: str, key: bytes) -> str:
    """16 hex digits of HMAC-SHA256(key, value): unique among millions of values; "" stays "" (none known)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16] if value else ""
