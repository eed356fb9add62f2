"""ruff (configured in pyproject.toml) finds nothing (skipped where ruff is not installed), and every
third-party package the code imports is declared."""
import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:                     # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    beside = Path(sys.executable).with_name("ruff")          # the one installed with the dev extra
    found = str(beside) if beside.is_file() else shutil.which("ruff")
    return [found] if found else None


def test_ruff_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    run = subprocess.run([*ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared():
    """Each third-party module imported by unike/, scripts/ or tests/ comes from a distribution that
    pyproject.toml declares (as a dependency or in an extra)."""
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(s) for s in project["dependencies"]}
    declared |= {_requirement_name(s) for extra in project["optional-dependencies"].values() for s in extra}
    local = {"unike", "tests", "archs", "guard", "labelled"} | {p.stem for p in ROOT.glob("scripts/*.py")}
    used = {}
    for path in [*ROOT.glob("unike/**/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    used.setdefault(top, path.relative_to(ROOT))
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in sorted(used.items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = (sorted(names), str(where))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
