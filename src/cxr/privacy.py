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

from cxr.errors import CxrError

log = logging.getLogger(__name__)

SALT_ENV = "CXR_SALT"  # a team's shared salt (a CI secret); else the file below
SALT_FILE = ".cxr-salt"  # git-ignored; the nearest one in this folder or above (queued experiments run below)


def salt(start: Path | None = None) -> bytes:
    """$CXR_SALT, else the nearest .cxr-salt from `start` (the working folder) up; made with 32 random bytes at
    the outermost folder above with a dvc.yaml (the project's root, not a queued experiment's copy of it under
    .dvc/tmp) when there is none."""
    key = os.environ.get(SALT_ENV, "").encode()
    if not key:
        here = (start or Path.cwd()).resolve()
        found = next((d / SALT_FILE for d in (here, *here.parents) if (d / SALT_FILE).is_file()), None)
        if found is None:
            roots = [d for d in (here, *here.parents) if (d / "dvc.yaml").is_file()]
            found = _make((roots[-1] if roots else here) / SALT_FILE)
        key = found.read_bytes().strip()
    if len(key) < 16:
        raise CxrError(f"the salt ({SALT_ENV} or {SALT_FILE}) has {len(key)} characters: a guessable one makes "
                       "pseudonyms reversible; use 16 or more random ones (delete the file to have one made)")
    return key


def _make(path: Path) -> Path:
    """Write the salt whole under another name, then link it in place: no reader sees it half written, and of two
    stages making one at once, the first wins and the other reads it."""
    tmp = path.with_name(f"{SALT_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)
        log.warning("made the project's secret salt, %s: keep it with the data and out of git (a new salt gives "
                    "every file and patient a new pseudonym, and so a new split)", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path


def pseudonym(value: str, key: bytes) -> str:
    """16 hex digits of HMAC-SHA256(key, value): unique among millions of values; "" stays "" (none known)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16] if value else ""
