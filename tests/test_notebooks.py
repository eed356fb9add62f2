"""The tutorial notebooks: `notebooks/NN_name.py` (jupytext percent format) paired with `NN_name.ipynb`
(outputs stripped; `pytest --nbmake`, on in pyproject, runs it top to bottom), and an executed copy with
outputs in docs/notebooks/ (scripts/publish_notebooks.py writes it; nbmake leaves it alone)."""
import json
import re
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "notebooks").glob("*.py"))
MAX_CELL_LINES = 16


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_has_its_pair():
    assert NAMES and NAMES == sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", NAMES)
def test_py_and_ipynb_agree(name):
    script, notebook = (jupytext.read(ROOT / "notebooks" / f"{name}.{ext}") for ext in ("py", "ipynb"))
    cells = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
    assert cells(script) == cells(notebook), f"run `jupytext --sync notebooks/{name}.py`"
    assert notebook.metadata["jupytext"]["formats"] == script.metadata["jupytext"]["formats"] == "ipynb,py:percent"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_stripped_parameters_first_and_short_cells(name):
    raw = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
    assert all(not c["outputs"] and c["execution_count"] is None for c in raw["cells"] if c["cell_type"] == "code")
    cells = code_cells(jupytext.read(ROOT / "notebooks" / f"{name}.py"))
    assert [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])] == [0]
    setup = cells[1].source          # threads set before the set-up loads anything
    assert "torch.set_num_threads(1)" in setup and setup.index("set_num_threads") < setup.index("tutorial.setup(")
    long = [c.source.splitlines()[0] for c in cells if len(c.source.splitlines()) > MAX_CELL_LINES]
    assert not long, f"code cells over {MAX_CELL_LINES} lines: {long}"


@pytest.mark.parametrize("name", NAMES)
def test_only_public_api(name):
    source = (ROOT / "notebooks" / f"{name}.py").read_text(encoding="utf-8")
    assert "unike.prompting" not in source and "on_model(" not in source and "encode(" not in source
    assert not re.search(r"editor\._|\._[a-z]", source), "a private attribute"


@pytest.mark.parametrize("name", NAMES)
def test_published_copy_is_executed_and_current(name):
    path = ROOT / "docs" / "notebooks" / f"{name}.ipynb"
    assert path.is_file(), "run `make notebooks-docs`"
    published, source = jupytext.read(path), jupytext.read(ROOT / "notebooks" / f"{name}.ipynb")
    assert [c.source for c in code_cells(published)] == [c.source for c in code_cells(source)], \
        f"{path.relative_to(ROOT)} is stale: run `make notebooks-docs`"
    assert all(c.execution_count for c in code_cells(published))
    assert sum(bool(c.outputs) for c in code_cells(published)) >= len(code_cells(published)) // 2
    assert any("image/png" in o.get("data", {}) for c in code_cells(published) for o in c.outputs)
    assert not any(o.get("output_type") == "error" for c in code_cells(published) for o in c.outputs)


def test_nbmake_runs_notebooks_but_not_the_published_copies(pytestconfig):
    paths = pytestconfig.getini("testpaths")
    assert "--nbmake" in pytestconfig.getini("addopts") and "notebooks" in paths
    assert not any(p == "docs" or p.startswith("docs/") for p in paths)
    assert "docs" in pytestconfig.getini("norecursedirs")
