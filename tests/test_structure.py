"""The package's import layering (docs/pipeline.md "Layout"; DESIGN.md "Layering"), no function over 50 lines,
and dvc.yaml deps that cover exactly the code each stage reads."""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
# Each module imports only from lower levels or from its own subpackage (docs/pipeline.md "Layout").
LEVELS = {
    0: ("cxr", "cxr.errors", "cxr.params", "cxr.io", "cxr.wording", "cxr.tracking", "cxr.cli", "cxr.task",
        "cxr.privacy"),
    1: ("cxr.models", "cxr.data", "cxr.metrics", "cxr.plots"),
    2: ("cxr.inference", "cxr.bootstrap"),
    3: ("cxr.serving", "cxr.explain", "cxr.shift"),
    4: ("cxr.training", "cxr.evaluation"),  # the work of the pipeline's stages
    # cxr.jobs: what a user runs on what the pipeline made; the library above never imports it
    5: ("cxr.jobs.promote", "cxr.jobs.predict", "cxr.jobs.results", "cxr.jobs.monitor", "cxr.jobs.serve"),
    6: ("cxr.jobs.retrain", "cxr.jobs.experiment", "cxr.jobs"),  # jobs made of other jobs
    7: ("cxr.__main__", "cxr.pyfunc_model"),  # entry points (pyfunc_model: MLflow's)
}


# Files a module reads rather than imports: serving logs pyfunc_model.py with every model (MLflow loads it).
READ_AS_FILES = {"cxr.serving": SRC / "cxr" / "pyfunc_model.py"}


def module_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def file_of(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def imports(path: Path) -> set[str]:
    """The cxr modules a file imports, at its top or inside functions (a lazy import is still read)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import; the project imports cxr.* absolutely"
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if file_of(f"{node.module}.{a.name}")}
    return {m for m in out if m.split(".")[0] == "cxr" and file_of(m)}


def closure(path: Path) -> set[Path]:
    """Every file of src/cxr that importing `path` runs: the modules it imports, their parent packages, and
    so on."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        for module in imports(todo.pop()):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                f = file_of(".".join(parts[:i]))
                if f and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return seen


def level(module: str) -> tuple[int, str]:
    for n, prefixes in LEVELS.items():
        for prefix in sorted(prefixes, key=len, reverse=True):
            if module == prefix or (prefix != "cxr" and module.startswith(prefix + ".")):
                return n, prefix
    raise AssertionError(f"{module} is in no level of LEVELS: add it")


def test_no_module_imports_one_above_it_or_a_sibling_job():
    wrong = []
    for path in sorted((SRC / "cxr").rglob("*.py")):
        mine, my_group = level(module_of(path))
        for module in imports(path):
            theirs, group = level(module)
            if theirs > mine or (theirs == mine and group != my_group and 0 < mine < 6):  # composites compose
                wrong.append(f"{module_of(path)} (level {mine}) imports {module} (level {theirs})")
    assert not wrong, "\n".join(wrong)


def test_training_and_evaluation_do_not_import_each_other():
    for a, b in (("training", "evaluation"), ("evaluation", "training")):
        for path in (SRC / "cxr" / a).rglob("*.py"):
            assert not any(m.startswith(f"cxr.{b}") for m in imports(path)), f"{path} imports cxr.{b}"


def stage_deps() -> dict[str, tuple[Path, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = ROOT / body["cmd"].split()[1]
        out[name] = (script, [d for d in body["deps"] if d.startswith("src/")])
    return out


@pytest.mark.parametrize("stage", list(stage_deps()))
def test_dvc_deps_cover_exactly_the_code_each_stage_imports(stage):
    script, deps = stage_deps()[stage]
    used = {str(p.relative_to(ROOT)) for p in closure(script)}
    covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    missing = sorted(f for f in used if not covered(f))
    assert not missing, f"{stage} imports these, but dvc.yaml does not list them in its deps: {missing}"
    used |= {str(f.relative_to(ROOT)) for module, f in READ_AS_FILES.items() if file_of(module) in closure(script)}
    unused = [d for d in deps if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in used)]
    assert not unused, f"{stage} lists deps it never imports: {unused}"


LONGEST = 50  # lines of a function, its docstring included: a longer one mixes steps that want names of their own


def test_no_function_in_src_is_longer_than_50_lines():
    long = []
    for path in sorted((SRC / "cxr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "split these into steps of their own:\n" + "\n".join(long)
