"""tools/team.py refuses a team folder someone else could read or swap files in, before it starts anything:
one owned by another user, one others can write, a symlink for the folder or for any file in it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def team_up(folder: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"CXR_TEAM_DIR": str(folder), "CXR_TEAM_PG_PORT": "1", "CXR_TEAM_MLFLOW_PORT": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "team.py"), "up"], capture_output=True, text=True,
                          env=env, timeout=60)


def refused(folder: Path, why: str) -> None:
    res = team_up(folder)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and why in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not res.stdout
    assert not (folder / "pg").exists() and not (folder / "pgpass").exists()  # nothing started, nothing written


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser", path="/usr/sbin:/sbin") is None,
                    reason="making a folder another user owns needs root")
def test_a_team_folder_another_user_owns_is_refused(tmp_path):
    folder = tmp_path / "team"
    folder.mkdir(mode=0o700)
    shutil.chown(folder, "nobody")
    refused(folder, "belongs to nobody, not to you")


def test_a_team_folder_others_can_write_is_refused(tmp_path):
    folder = tmp_path / "team"
    folder.mkdir()
    folder.chmod(0o777)
    refused(folder, "is writable by others")


def test_symlinks_for_the_folder_or_a_file_in_it_are_refused_and_never_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("someone else's file\n")
    folder = tmp_path / "team"
    folder.mkdir(mode=0o700)
    (folder / "mlflow.log").symlink_to(target)  # planted where the server's log goes
    refused(folder, "mlflow.log is a symlink")
    assert target.read_text() == "someone else's file\n" and oct(target.stat().st_mode)[-3:] != "600"
    (folder / "mlflow.log").unlink()
    link = tmp_path / "link"
    link.symlink_to(folder)
    refused(link, "is not a folder (a symlink?)")
