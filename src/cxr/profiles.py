"""Profiles: configs/<name>.yaml as `dvc exp run -S` overrides of params.yaml, run as one DVC experiment
(`make quick`, `make cpu-best`, `cxr retrain --profile`). By default params.yaml is put back afterwards, so
that a profile never edits it; when the run fails, dvc.lock and the outputs are put back too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cxr import params
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


def overrides(config: dict[str, Any], data: str) -> list[str]:
    """-S values: `models.<name>` definitions added or replaced (params.yaml's others stay), `variants` and
    `ensembles` replaced whole, every other section set key by key; DATA picks the source."""
    out = []
    for section, values in config.items():
        if section == "models":
            out += [f"++models.{name}={hydra(v)}" for name, v in values.items()]
        elif section == "variants":
            out += [f"variants={hydra(values)}"]
        elif section == "ensembles":
            out += ["~ensembles", f"+ensembles={hydra(values)}"]
        else:
            out += [f"{section}.{k}={hydra(v)}" for k, v in values.items()]
    if data:
        if not Path(data).exists():
            raise CxrError(f"DATA={data} does not exist; give a Kaggle-style folder or a MedMNIST .npz")
        source = "npz" if data.endswith(".npz") else "imagefolder"
        out += [f"data.source={source}", f"data.path={hydra(data)}"]  # as given: a relative path stays relative
    else:
        out += ["data.source=hub"]
    return out


def load(profile: str) -> dict[str, Any]:
    path = CONFIGS / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise CxrError(f"no profile {profile!r} ({path} is missing); known: {known}")
    return yaml.safe_load(path.read_text())


def run(profile: str, data: str = "", name: str = "", extra: tuple[str, ...] = (), keep_params: bool = False,
        force: bool = False) -> float:
    """Run the profile as the DVC experiment `name` (default: the profile's) and return its minutes. DVC
    skips what is unchanged (its run cache) unless `force`; the experiment of the same name is replaced."""
    name = name or profile
    cmd = [*DVC, "exp", "run", "-n", name, *(["--force"] if force else [])]
    for o in [*overrides(load(profile), data), *extra]:
        cmd += ["-S", o]
    # `dvc exp run -S` writes the overrides into params.yaml and leaves them there; a failed stage also loses
    # its previous outputs. Keep both files' bytes to put back.
    kept = {f: f.read_bytes() if f.exists() else None for f in (Path("params.yaml"), Path("dvc.lock"))}
    env = tool_env()
    subprocess.run([*DVC, "exp", "remove", name], capture_output=True, env=env)  # it may not exist
    t0, skipped, proc = time.perf_counter(), False, None
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=env) as proc:
            for line in proc.stdout or ():  # echoed as it comes; the compare stage prints the leaderboard
                if not NOISE.match(line):
                    sys.stdout.write(line)
                skipped |= line.startswith("Stage 'compare' didn't change")
    finally:
        if not keep_params or proc is None or proc.returncode:  # None: dvc did not start
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
    kept_text = "params.yaml holds its params" if keep_params else \
        f"params.yaml is unchanged (`dvc exp apply {name}` adopts its params)"
    print(f"{profile}: {minutes:.1f} min wall time. The experiment is `dvc exp show`'s {name!r}; {kept_text}")
    if not keep_params:  # `make quick`: what a first run goes on with (`cxr retrain` promotes by itself)
        print("Next (after `source .venv/bin/activate`): `cxr promote` registers its best variant as the champion, "
              "`cxr predict IMAGE...` uses it; `cxr results`, `dvc plots show` and `make ui` compare the variants")
    return minutes
