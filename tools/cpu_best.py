"""`make cpu-best DATA=<folder or .npz>`: run the recipe of configs/cpu-best.yaml end to end as one DVC
experiment (`dvc exp run`), then print the leaderboard and the wall time. An empty DATA means the hub."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


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
    """-S values: `models` and `ensembles` replaced whole (only the recipe's variants run), every other
    section set key by key; DATA picks the source."""
    out = []
    for section, values in config.items():
        if section in ("models", "ensembles"):
            out += [f"~{section}", f"+{section}={hydra(values)}"]
        else:
            out += [f"{section}.{k}={hydra(v)}" for k, v in values.items()]
    if data:
        source = "npz" if data.endswith(".npz") else "imagefolder"
        if not Path(data).exists():
            sys.exit(f"error: DATA={data} does not exist; give a Kaggle-style folder or a MedMNIST .npz")
        out += [f"data.source={source}", f"data.path={hydra(data)}"]
    else:
        out += ["data.source=hub"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="", help="a Kaggle-style folder or a MedMNIST .npz; empty: the hub")
    parser.add_argument("--config", default="configs/cpu-best.yaml")
    parser.add_argument("--name", default="cpu-best", help="the DVC experiment's name")
    parser.add_argument("-S", "--set", action="append", default=[], help="more overrides, after the recipe's")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    cmd = ["dvc", "exp", "run", "--force", "-n", args.name]
    for o in [*overrides(config, args.data), *args.set]:
        cmd += ["-S", o]
    t0 = time.perf_counter()
    code = subprocess.call(cmd)
    minutes = (time.perf_counter() - t0) / 60
    if code:
        sys.exit(f"error: dvc exp run failed (exit {code}) after {minutes:.1f} min; see its output above")
    print(Path("comparison/leaderboard.md").read_text())
    print(f"cpu-best: {minutes:.1f} min wall time (dvc exp run -n {args.name}; `dvc exp show` lists it)")


if __name__ == "__main__":
    main()
