"""`cxr run`: `dvc exp run -S` with the params checked first and everything put back on failure; profiles,
configs/<name>.yaml, are sets of such overrides (`make quick`, `make cpu-best`, `cxr retrain --profile`)."""

from __future__ import annotations

import json
import os
import re
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


def check(sets: list[str], file: Path = Path("params.yaml")) -> None:
    """Apply the -S values to a copy of params.yaml, as DVC will, and validate the result: a bad value fails
    here, before DVC rewrites params.yaml or deletes any output."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_bytes(file.read_bytes())
        try:
            apply_overrides(str(copy), sets)
        except Exception as e:  # Hydra's grammar errors and DVC's "key not found" alike
            raise CxrError(f"cannot apply -S {' '.join(sets)}: {str(e).splitlines()[0]}; nothing was run") from e
        try:
            params.load(copy)
        except CxrError as e:
            raise CxrError(f"{e}; nothing was run, params.yaml and the outputs are as they were") from e


def load(profile: str) -> dict[str, Any]:
    path = CONFIGS / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise CxrError(f"no profile {profile!r} ({path} is missing); known: {known}")
    return yaml.safe_load(path.read_text())


def run(profile: str = "", data: str = "", name: str = "", extra: tuple[str, ...] = (), force: bool = False) -> float:
    """Run the profile (configs/<profile>.yaml; none: params.yaml as it is) with `extra` -S overrides as one DVC
    experiment in the workspace, and return its minutes. The workspace is left as that experiment, the way
    `dvc exp apply` leaves it: its params in params.yaml and its outputs in place, so that `dvc status` is clean
    and every later command sees one consistent state. The params are checked before DVC touches anything;
    when a stage fails, params.yaml, dvc.lock and the outputs are put back. DVC skips what is unchanged (its
    run cache) unless `force`; an experiment of the same name is replaced."""
    sets = [*(overrides(load(profile), data, params.load()) if profile else source(data) if data else []), *extra]
    check(sets)
    name = name or profile
    cmd = [*DVC, "exp", "run", *(["-n", name] if name else []), *(["--force"] if force else [])]
    for o in sets:
        cmd += ["-S", o]
    # A failed stage has deleted its previous outputs, and DVC leaves the -S values in params.yaml: keep both
    # files' bytes to put back.
    kept = {f: f.read_bytes() if f.exists() else None for f in (Path("params.yaml"), Path("dvc.lock"))}
    env = tool_env() | {cli.RESTORES: "1"}
    if name:
        subprocess.run([*DVC, "exp", "remove", name], capture_output=True, env=env)  # it may not exist
    t0, skipped, proc = time.perf_counter(), False, None
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=env) as proc:
            for line in proc.stdout or ():  # echoed as it comes; the compare stage prints the leaderboard
                if not NOISE.match(line):
                    sys.stdout.write(line)
                skipped |= line.startswith("Stage 'compare' didn't change")
                name = line.removeprefix("Ran experiment(s): ").strip() if line.startswith("Ran exp") else name
    finally:
        if proc is None or proc.returncode:  # None: dvc did not start
            Path("params.yaml").write_bytes(kept[Path("params.yaml")] or b"")
    minutes = (time.perf_counter() - t0) / 60
    if proc.returncode:
        lock = kept[Path("dvc.lock")]
        Path("dvc.lock").write_bytes(lock) if lock is not None else Path("dvc.lock").unlink(missing_ok=True)
        subprocess.run([*DVC, "checkout", "--quiet"], env=env)  # the previous outputs, from DVC's cache
        raise CxrError(f"dvc exp run failed (exit {proc.returncode}) after {minutes:.1f} min, see above; "
                       "params.yaml, dvc.lock and the outputs are as they were before it")
    if skipped:  # nothing changed since the last run: its leaderboard, as the compare stage prints it
        rows, groups = (json.loads(Path(f"comparison/{f}.json").read_text()) for f in ("leaderboard", "seed_spread"))
        print(summary(rows, params.load().compare.metric, Path("comparison"), groups, stage_reports(Path("reports"))))
    print(f"{profile or 'cxr run'}: {minutes:.1f} min wall time. The workspace is now the experiment {name}: "
          "params.yaml holds its params (`git diff params.yaml`), the outputs are its outputs, `dvc status` is "
          "clean. `git checkout params.yaml` goes back to the defaults.")
    return minutes
