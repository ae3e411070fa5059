"""File helpers: outputs written atomically (to a temporary sibling, renamed into place only when complete),
reports read back, and progress bars."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cxr.errors import CxrError, run_pipeline


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path` to; on success it replaces `path`, on failure it is
    removed, so an interrupted stage never leaves an output that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run (SIGKILL skips cleanup)
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """atomic_path for files that belong together: all appear (renamed in the given order at the end) or none."""
    with contextlib.ExitStack() as stack:  # an ExitStack exits last-in first-out: enter them in reverse
        yield [stack.enter_context(atomic_path(p)) for p in reversed(paths)][::-1]


# Plain writers: every caller writes into a temporary of atomic_path(s). Wrapping them in atomic_path as well
# would nest a temporary of the temporary (`..x.tmp-1.tmp-1`), which a SIGKILL leaves and no cleanup matches.
def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields or (rows[0].keys() if rows else [])))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def progress(iterable: Iterable[Any], quiet: bool = False, **kw: Any) -> Any:
    """A tqdm bar on a terminal only (`disable=None`): in a piped log its carriage-return frames pile up, and the
    work logs a line per epoch or stage anyway. TQDM_DISABLE=1 turns it off on a terminal too."""
    from tqdm import tqdm

    off = quiet or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(iterable, disable=True if off else None, **kw)


def read_report(path: Path, variant: str) -> Any:
    """A variant's report file (JSON or CSV); missing means the pipeline has not produced it yet."""
    if not path.exists():
        raise CxrError(f"{path} is missing; run {run_pipeline()} to train and evaluate {variant}")
    return read_csv(path) if path.suffix == ".csv" else json.loads(path.read_text())


def best_on_val(variants: Iterable[str], reports: Path, metric: str) -> tuple[str, dict[str, Any]]:
    """The variant with the highest validation `metric` (the first listed, of equal ones) and its evaluation
    report: the one rule for the promotion candidate and the leaderboard's best_variant. Never test."""
    best: tuple[str, dict[str, Any]] | None = None
    for variant in variants:
        ev = read_report(reports / variant / "evaluation.json", variant)
        score = ev["val"][metric]
        if score is not None and (best is None or score > best[1]["val"][metric]):
            best = (variant, ev)
    if best is None:
        raise CxrError(f"no variant has a validation {metric} to choose by (params.yaml models: {list(variants)})")
    return best
