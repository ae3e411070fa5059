"""The team's services on one machine: PostgreSQL as MLflow's store, an MLflow server that also serves the
artifacts (so clients need no access to its disk), and a DVC remote in a shared folder.

    python tools/team.py up      # start them (again: a no-op) and print what a clone sets
    python tools/team.py down    # stop them; the database, artifacts and remote stay

CXR_TEAM_DIR (default /var/tmp/cxr-team) holds everything; CXR_TEAM_PG_PORT (5433) and CXR_TEAM_MLFLOW_PORT
(5050) choose the ports. Everything listens on 127.0.0.1 only: put a proxy with TLS and auth in front to share
it, or swap in a managed database and S3 (README, "Team setup")."""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DIR = Path(os.environ.get("CXR_TEAM_DIR", "/var/tmp/cxr-team"))
PG_PORT = int(os.environ.get("CXR_TEAM_PG_PORT", "5433"))
MLFLOW_PORT = int(os.environ.get("CXR_TEAM_MLFLOW_PORT", "5050"))
ROOT = os.geteuid() == 0  # PostgreSQL refuses to run as root: then it runs as the postgres user


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    if not found:
        fail(f"PostgreSQL's {name} is not installed: apt-get install postgresql (Debian/Ubuntu), then run this again")
    return found


def as_postgres(*cmd: str) -> list[str]:
    if not ROOT:
        return list(cmd)
    # in /usr/sbin, which a bare environment's PATH (env -i, cron) leaves out
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if not runuser:
        fail("runuser (util-linux) is missing: it starts PostgreSQL as the postgres user when run as root")
    return [runuser, "-u", "postgres", "--", *cmd]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode:
        fail(f"{' '.join(cmd[:4])} ... failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def database_uri() -> str:
    return f"postgresql+psycopg2://mlflow:{(DIR / 'password').read_text().strip()}@127.0.0.1:{PG_PORT}/mlflow"


def start_postgres() -> None:
    pg = DIR / "pg"
    if not (pg / "PG_VERSION").exists():
        pg.mkdir(parents=True, exist_ok=True)
        password = DIR / "password"
        password.write_text(secrets.token_urlsafe(24))
        password.chmod(0o600)
        pwfile = DIR / ".pw"  # initdb reads it as the server's user
        shutil.copy(password, pwfile)
        if ROOT:
            shutil.chown(pg, "postgres")
            shutil.chown(pwfile, "postgres")
        probe = subprocess.run(as_postgres("test", "-w", str(pg)))
        if probe.returncode:
            fail(f"the postgres user cannot write {pg}: set CXR_TEAM_DIR to a folder it can reach (/var/tmp/...)")
        run(as_postgres(pg_bin("initdb"), "-D", str(pg), "-U", "mlflow", f"--pwfile={pwfile}", "-E", "UTF8",
                        "--auth-local=scram-sha-256", "--auth-host=scram-sha-256"))
        pwfile.unlink()
    status = subprocess.run(as_postgres(pg_bin("pg_ctl"), "-D", str(pg), "status"), capture_output=True)
    if status.returncode:  # not running
        run(as_postgres(pg_bin("pg_ctl"), "-D", str(pg), "-l", str(pg / "server.log"), "-w", "start", "-o",
                        f"-p {PG_PORT} -k {pg} -c listen_addresses=127.0.0.1"))
    env = os.environ | {"PGPASSWORD": (DIR / "password").read_text().strip()}
    psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "mlflow", "-d", "postgres", "-tAc"]
    if run([*psql, "SELECT 1 FROM pg_database WHERE datname = 'mlflow'"], env=env).stdout.strip() != "1":
        run([*psql, "CREATE DATABASE mlflow"], env=env)


def start_mlflow() -> None:
    url = f"http://127.0.0.1:{MLFLOW_PORT}"
    if answers(f"{url}/health"):
        return
    log = (DIR / "mlflow.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database_uri(), "--serve-artifacts",
         "--artifacts-destination", str(DIR / "artifacts"), "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
         "--workers", "1"],
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=log,
        stdin=subprocess.DEVNULL, start_new_session=True)  # outlives this command, as a service
    (DIR / "mlflow.pid").write_text(str(proc.pid))
    for _ in range(240):
        if answers(f"{url}/health"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    fail(f"the MLflow server did not come up on {url}; see {DIR / 'mlflow.log'}")


def up() -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    DIR.chmod(0o755)  # the postgres user goes through it to its data folder
    start_postgres()
    (DIR / "dvc-remote").mkdir(exist_ok=True)
    start_mlflow()
    print(f"team services up in {DIR}: PostgreSQL on 127.0.0.1:{PG_PORT}, MLflow on http://127.0.0.1:{MLFLOW_PORT}\n"
          f"Every clone: export MLFLOW_TRACKING_URI=http://127.0.0.1:{MLFLOW_PORT}\n"
          f"Once, committed: dvc remote add --default team {DIR / 'dvc-remote'}\n"
          "                 git commit -m 'team remote' .dvc/config")


def down() -> None:
    pid_file = DIR / "mlflow.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)  # the server and its workers
            for _ in range(60):
                os.kill(pid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    pg = DIR / "pg"
    if (pg / "postmaster.pid").exists():
        run(as_postgres(pg_bin("pg_ctl"), "-D", str(pg), "-m", "fast", "-w", "stop"))
    print(f"team services stopped; their data stays in {DIR}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    {"up": up, "down": down}[parser.parse_args().action]()
