"""`cxr run`: `dvc exp run -S` with the params checked first and everything put back on failure; profiles,
configs/<name>.yaml, are sets of such overrides (`make quick`, `make cpu-best`, `cxr retrain --profile`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from cxr import cli, params
from cxr.errors import CxrError
from cxr.evaluation.compare import stage_reports, summary

CONFIGS = Path("configs")
DVC = [sys.executable, "-m", "dvc"]  # this environment's DVC
# What DVC says of each output on a first run (it has no hash to restore yet): true, and nothing to act on.
NOISE = re.compile(r"WARNING: No file hash info found for '.*'\. It won't be created\.$")


def tool_env() -> dict[str, str]:
    """The environment with this interpreter's folder first on PATH, so that DVC's stages run its `python`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def hydra(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else "'" + text.replace("'", "\\'") + "'"


def overrides(config: dict[str, Any], data: str, current: params.Params | None = None) -> list[str]:
    """-S values: `models.<name>` definitions added or replaced (params.yaml's others stay), `variants` and
    `ensembles` replaced whole (ensembles only when they differ from `current`'s: a replaced mapping moves to
    the end of params.yaml), every other section set key by key; DATA picks the source."""
    out = []
    for section, values in config.items():
        if section == "models":
            out += [f"++models.{name}={hydra(v)}" for name, v in values.items()]
        elif section == "variants":
            out += [f"variants={hydra(values)}"]
        elif section == "ensembles":
            out += [] if current is not None and current.ensembles == values else \
                ["~ensembles", f"+ensembles={hydra(values)}"]
        else:
            out += [f"{section}.{k}={hydra(v)}" for k, v in values.items()]
    return out + source(data)


def source(data: str) -> list[str]:
    """The -S values of DATA: a folder or .npz picks the source, empty means the hub."""
    if not data:
        return ["data.source=hub"]
    if not Path(data).exists():
        raise CxrError(f"DATA={data} does not exist; give a Kaggle-style folder or a MedMNIST .npz")
    kind = "npz" if data.endswith(".npz") else "imagefolder"
    return [f"data.source={kind}", f"data.path={hydra(data)}"]  # as given: a relative path stays relative


def check(sets: list[str], text: bytes) -> None:
    """Apply the -S values to a copy of params.yaml (`text`), as DVC will, and validate the result: a bad value
    fails here, before DVC rewrites params.yaml or deletes any output."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_bytes(text)
        for one in sets:  # one at a time, so that the error names the value
            try:
                apply_overrides(str(copy), [one])
            except Exception as e:  # Hydra's grammar errors and DVC's "key not found" alike
                cause = str(e.__cause__ or e).strip().splitlines()[0]
                raise CxrError(f"-S {one}: {cause}; nothing was run, params.yaml and the outputs are as they "
                               "were") from e
        try:
            params.load(copy)
        except CxrError as e:
            raise CxrError(f"{e}; nothing was run, params.yaml and the outputs are as they were") from e


def committed(file: Path = Path("params.yaml")) -> bytes:
    """params.yaml as the last commit has it (what a profile starts from), else as it is."""
    res = subprocess.run(["git", "show", f"HEAD:{file}"], capture_output=True)
    return res.stdout if res.returncode == 0 else file.read_bytes()


class Snapshot:
    """What a failed `dvc exp run` changes, kept to put back: params.yaml and dvc.lock (bytes), the outputs DVC
    does not cache (reports, comparison: a failed stage has deleted them and `dvc checkout` cannot bring them
    back; copied aside) and the experiment of the run's name (renamed aside: DVC refuses a name in use)."""

    def __init__(self, name: str, env: dict[str, str], tmp: Path) -> None:
        from dvc.repo import Repo

        self.env, self.tmp, self.name = env, tmp, name
        self.files = {f: f.read_bytes() if f.exists() else None for f in (Path("params.yaml"), Path("dvc.lock"))}
        with Repo() as repo:
            self.outs = [Path(os.path.relpath(o.fs_path)) for o in repo.index.outs if not o.use_cache]
        for out in (o for o in self.outs if o.exists()):
            (tmp / out).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if out.is_dir() else shutil.copy2)(out, tmp / out)
        self.aside = f"{name}-replaced-{os.getpid()}" if name else ""
        if self.aside and dvc(["exp", "rename", name, self.aside], env).returncode:
            self.aside = ""  # no experiment of that name yet

    def drop(self) -> None:
        if self.aside:
            dvc(["exp", "remove", self.aside], self.env)

    def restore(self) -> str:
        """Put everything back; "" or what could not be."""
        for f, data in self.files.items():
            f.write_bytes(data) if data is not None else f.unlink(missing_ok=True)
        res = dvc(["checkout", "--quiet"], self.env)  # the cached outputs dvc.lock names
        for out in self.outs:
            if (self.tmp / out).exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
                (shutil.copytree if (self.tmp / out).is_dir() else shutil.copy2)(self.tmp / out, out)
        if self.aside:
            dvc(["exp", "remove", self.name], self.env)
            dvc(["exp", "rename", self.aside, self.name], self.env)
        return (res.stderr.strip().splitlines() or [""])[-1] if res.returncode else ""


def dvc(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DVC, *args], capture_output=True, text=True, env=env)


def load(profile: str) -> dict[str, Any]:
    path = CONFIGS / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise CxrError(f"no profile {profile!r} ({path} is missing); known: {known}")
    return yaml.safe_load(path.read_text())


def run(profile: str = "", data: str = "", name: str = "", extra: tuple[str, ...] = (), force: bool = False) -> float:
    """Run `extra` -S overrides (after a profile's, configs/<profile>.yaml, applied to params.yaml as committed;
    without one, to params.yaml as it is) as one DVC experiment in the workspace, and return its minutes. The
    workspace is left as that experiment, the way `dvc exp apply` leaves it: its params in params.yaml and its
    outputs in place, so that `dvc status` is clean and every later command sees one state. The params are
    checked before DVC touches anything; when the run fails or is interrupted, params.yaml, dvc.lock, the
    outputs and an experiment of the same name are put back. DVC skips what is unchanged (its run cache) unless
    `force`."""
    base = committed() if profile else Path("params.yaml").read_bytes()
    sets = [*(overrides(load(profile), data, params.parse(yaml.safe_load(base) or {})) if profile else
              source(data) if data else []), *extra]
    check(sets, base)
    name = name or profile
    cmd = [*DVC, "exp", "run", *(["-n", name] if name else []), *(["--force"] if force else [])]
    for o in sets:
        cmd += ["-S", o]
    env = tool_env() | {cli.RESTORES: "1"}
    t0, skipped, proc = time.perf_counter(), False, None
    with tempfile.TemporaryDirectory() as tmp:
        kept = Snapshot(name, env, Path(tmp))
        try:
            Path("params.yaml").write_bytes(base)
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  env=env) as proc:
                for line in proc.stdout or ():  # echoed as it comes; the compare stage prints the leaderboard
                    if not NOISE.match(line):
                        sys.stdout.write(line)
                    skipped |= line.startswith("Stage 'compare' didn't change")
                    name = line.removeprefix("Ran experiment(s): ").strip() if line.startswith("Ran exp") else name
        except BaseException:  # Ctrl-C (DVC has it too), a closed pipe: DVC stops, then everything goes back
            if proc is not None:
                proc.wait()
            kept.restore()
            raise
        minutes = (time.perf_counter() - t0) / 60
        if proc.returncode:
            left = kept.restore()
            raise CxrError(f"dvc exp run failed (exit {proc.returncode}) after {minutes:.1f} min, see above; "
                           "params.yaml, dvc.lock and the outputs are as they were before it" +
                           (f", but dvc checkout said: {left}" if left else ""))
        kept.drop()
    if skipped:  # nothing changed since the last run: its leaderboard, as the compare stage prints it
        rows, groups = (json.loads(Path(f"comparison/{f}.json").read_text()) for f in ("leaderboard", "seed_spread"))
        print(summary(rows, params.load().compare.metric, Path("comparison"), groups, stage_reports(Path("reports"))))
    print(f"{profile or 'cxr run'}: {minutes:.1f} min wall time. The workspace is now the experiment "
          f"{name or '(dvc exp show names it)'}: params.yaml holds its params (`git diff params.yaml`), the outputs "
          "are its outputs, `dvc status` is clean.")
    return minutes
