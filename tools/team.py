"""The team's services on one machine: PostgreSQL as MLflow's store, an MLflow server with logins that also
serves the artifacts (so clients need no access to its disk), and a DVC remote in a private folder.

    python tools/team.py up      # start them (again: a no-op) and print what a clone sets
    python tools/team.py down    # stop them; the database, artifacts and remote stay

CXR_TEAM_DIR (default /var/tmp/cxr-team) holds everything, readable by its owner alone; CXR_TEAM_PG_PORT (5433)
and CXR_TEAM_MLFLOW_PORT (5050) choose the ports. Everything listens on 127.0.0.1 only: put a proxy with TLS in
front to share it, or swap in a managed database and S3 (docs/team.md, "Team setup").

No secret is ever on a command line (`ps` shows every process's to every local user), in a log, or in a file
anyone but the owner can read: each is created 0600 in one step, and the server finds the database password
in a libpq password file (PGPASSFILE) and its admin login in its auth config (MLFLOW_AUTH_CONFIG_PATH)."""

from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import errno
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DIR = Path(os.environ.get("CXR_TEAM_DIR", "/var/tmp/cxr-team"))
PG_PORT = int(os.environ.get("CXR_TEAM_PG_PORT", "5433"))
MLFLOW_PORT = int(os.environ.get("CXR_TEAM_MLFLOW_PORT", "5050"))
URL = f"http://127.0.0.1:{MLFLOW_PORT}"
ROOT = os.geteuid() == 0  # PostgreSQL refuses to run as root: then it runs as the postgres user
USER = "cxr"  # the login the pipeline, promotion, predict and the retrain job use
# What the folder holds (docs/team.md, "Team setup"); nothing else is expected there.
PGPASS, AUTH, USER_PASSWORD = DIR / "pgpass", DIR / "auth.ini", DIR / f"{USER}.password"
PGPASS_LINE = "127.0.0.1:*:*:mlflow:{}\n"  # libpq's format: host:port:database:user:password


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


def private_dir(path: Path) -> None:
    """`path` as a folder of ours that no one else can write: made 0700, or an existing one checked. A folder
    another user made first (a predictable name in /var/tmp) could be theirs to read, or hold their symlinks
    at our file names, which we (perhaps root) would then write through."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        fail(f"{path} is not a folder (a symlink?); remove it or set CXR_TEAM_DIR to a new path")
    if st.st_uid != os.geteuid():
        fail(f"{path} belongs to {pwd.getpwuid(st.st_uid).pw_name}, not to you: another user could read or swap "
             "the team's files there; remove it or set CXR_TEAM_DIR to a new path")
    if st.st_mode & 0o022:
        fail(f"{path} is writable by others (mode {stat.filemode(st.st_mode)}): they could plant files there; "
             "remove it or set CXR_TEAM_DIR to a new path")
    links = [e.path for e in os.scandir(path) if e.is_symlink()]
    if links:
        fail(f"{links[0]} is a symlink: the team folder holds only its own files; remove it and run this again")


def open_private(path: Path, flags: int) -> int:
    """os.open of a file in the team folder, never through a symlink, created 0600 in the same step."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            fail(f"{path} is a symlink: refusing to follow it; remove it and run this again")
        raise


def write_private(path: Path, text: str, owner: str | None = None, new: bool = True) -> None:
    """`text` in a file of the team folder, 0600 from the start: a new one (`new`; else replaced), optionally
    then given to `owner`."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else os.O_TRUNC))
    if owner:
        os.fchown(fd, pwd.getpwnam(owner).pw_uid, -1)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def read_private(path: Path) -> str:
    with os.fdopen(open_private(path, os.O_RDONLY)) as f:
        return f.read().strip()


def start_postgres() -> None:
    pg = DIR / "pg"
    if not (pg / "PG_VERSION").exists():
        password = secrets.token_urlsafe(24)
        write_private(PGPASS, PGPASS_LINE.format(password))
        os.mkdir(pg, 0o700)
        pwfile = DIR / "initdb.pw"  # initdb reads it as the server's user; removed straight after
        write_private(pwfile, password, owner="postgres" if ROOT else None)
        if ROOT:
            shutil.chown(pg, "postgres")
        try:
            run(as_postgres(pg_bin("initdb"), "-D", str(pg), "-U", "mlflow", f"--pwfile={pwfile}", "-E", "UTF8",
                            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256"))
        finally:
            pwfile.unlink()
    status = subprocess.run(as_postgres(pg_bin("pg_ctl"), "-D", str(pg), "status"), capture_output=True)
    if status.returncode:  # not running
        run(as_postgres(pg_bin("pg_ctl"), "-D", str(pg), "-l", str(pg / "server.log"), "-w", "start", "-o",
                        f"-p {PG_PORT} -k {pg} -c listen_addresses=127.0.0.1"))
    env = os.environ | {"PGPASSFILE": str(PGPASS)}
    psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "mlflow", "-d", "postgres", "-w", "-tAc"]
    if run([*psql, "SELECT 1 FROM pg_database WHERE datname = 'mlflow'"], env=env).stdout.strip() != "1":
        run([*psql, "CREATE DATABASE mlflow"], env=env)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def start_mlflow() -> None:
    if not AUTH.exists():  # the logins' store and the admin, whom the auth app creates on its first start
        settings = {"default_permission": "READ", "database_uri": f"sqlite:///{DIR / 'auth.db'}",
                    "admin_username": "admin", "admin_password": secrets.token_urlsafe(24),
                    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
        write_private(AUTH, "[mlflow]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    if not answers(f"{URL}/health"):
        log = open_private(DIR / "mlflow.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        env = os.environ | {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # the store's URI holds no password (libpq reads it from PGPASSFILE), and comes from the environment:
            # a process's environment is readable by its user alone, its arguments by everyone
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://mlflow@127.0.0.1:{PG_PORT}/mlflow",
            "PGPASSFILE": str(PGPASS), "MLFLOW_AUTH_CONFIG_PATH": str(AUTH),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--serve-artifacts",
             "--artifacts-destination", str(DIR / "artifacts"), "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
             "--workers", "1"],
            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, umask=0o077,  # its files: the owner's
            start_new_session=True)  # outlives this command, as a service
        os.close(log)
        write_private(DIR / "mlflow.pid", str(proc.pid), new=False)
        for _ in range(240):
            if answers(f"{URL}/health"):
                break
            if proc.poll() is not None:
                fail(f"the MLflow server stopped on start; see {DIR / 'mlflow.log'}")
            time.sleep(0.5)
        else:
            fail(f"the MLflow server did not come up on {URL}; see {DIR / 'mlflow.log'}")
    make_user()


def api(method: str, path: str, body: dict, user: str, password: str) -> tuple[int, dict]:
    """A JSON request to the server's REST API with a basic-auth login; (status, reply)."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(f"{URL}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"message": text}


def make_user() -> None:
    """The `cxr` login, with a generated password (0600); made again with it if the file is new."""
    auth = configparser.ConfigParser()
    auth.read_string(read_private(AUTH))
    admin = auth["mlflow"]["admin_username"], auth["mlflow"]["admin_password"]
    new = not USER_PASSWORD.exists()
    if new:
        write_private(USER_PASSWORD, secrets.token_urlsafe(24))
    password = read_private(USER_PASSWORD)
    code, reply = api("POST", "users/create", {"username": USER, "password": password}, *admin)
    if code == 400 and reply.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        if not new:
            return
        code, reply = api("PATCH", "users/update-password", {"username": USER, "password": password}, *admin)
    if code != 200:
        fail(f"the MLflow server did not create the {USER} login (HTTP {code}: {reply.get('message', '')[:200]})")


def up() -> None:
    os.umask(0o077)  # everything made here is the owner's alone
    DIR.parent.mkdir(parents=True, exist_ok=True)
    private_dir(DIR)
    pg_bin("initdb")  # installed, or one line saying how (before the folder is given to its group)
    if ROOT:  # the postgres user goes through the folder to its data, and nobody else
        shutil.chown(DIR, group="postgres")
        DIR.chmod(0o710)
    else:
        DIR.chmod(0o700)
    old = DIR / "password"  # an older version's database password: moved to the libpq file
    if old.exists() and not PGPASS.exists():
        write_private(PGPASS, PGPASS_LINE.format(read_private(old)))
        old.unlink()
    for entry in os.scandir(DIR):  # what an older version left readable by others
        if entry.name != "pg":
            os.chmod(entry.path, 0o700 if entry.is_dir() else 0o600)
    start_postgres()
    for folder in ("dvc-remote", "artifacts"):
        private_dir(DIR / folder)
    start_mlflow()
    print(f"team services up in {DIR}: PostgreSQL on 127.0.0.1:{PG_PORT}, MLflow on {URL} (logins required)\n"
          f"Every clone and shell: export MLFLOW_TRACKING_URI={URL}\n"
          f"                       export MLFLOW_TRACKING_USERNAME={USER}\n"
          f"                       export MLFLOW_TRACKING_PASSWORD=\"$(cat {USER_PASSWORD})\"\n"
          f"  (the password file is yours alone: give it to teammates as you would any secret)\n"
          f"Once, committed: dvc remote add --default team {DIR / 'dvc-remote'}\n"
          "                 git commit -m 'team remote' .dvc/config")


def down() -> None:
    pid_file = DIR / "mlflow.pid"
    if pid_file.exists():
        pid = int(read_private(pid_file))
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
