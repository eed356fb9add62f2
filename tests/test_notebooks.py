"""The tutorial notebooks: committed without outputs, one parameter cell each, and identical to what
scripts/make_notebooks.py writes. `pytest --nbmake` (on in pyproject) runs them top to bottom."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped_and_first_code_cell_holds_the_parameters(path):
    cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    assert cells and all(not c["outputs"] and c["execution_count"] is None for c in cells)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0]
    assert "torch.set_num_threads(1)" in "".join(cells[1]["source"])   # before the set-up loads anything


def test_notebooks_match_their_generator():
    gen = _generator()
    assert [p.stem for p in NOTEBOOKS] == sorted(gen.NOTEBOOKS)
    for name in gen.NOTEBOOKS:
        on_disk = (ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8")
        assert on_disk == gen.text(name), f"{name}.ipynb is stale: run python scripts/make_notebooks.py"
