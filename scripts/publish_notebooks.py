"""Execute the tutorial notebooks and write the copies with their outputs to docs/notebooks/.

    python scripts/publish_notebooks.py                  # all four, a few minutes on a CPU
    python scripts/publish_notebooks.py 01_quickstart    # one

Each runs with its default parameters from notebooks/ (as `pytest --nbmake` runs it), so the plots show
on the repository page. Links into docs/ are rewritten for the copy's folder; progress-bar widgets, which
a static page cannot show, are dropped, and so is the pairing with the `.py` file.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = ROOT / "notebooks", ROOT / "docs" / "notebooks"
WIDGET = "application/vnd.jupyter.widget-view+json"
LINKS = ("](../docs/", "](../")   # notebooks/ -> docs/notebooks/


def publish(name: str) -> Path:
    nb = nbformat.read(SOURCE / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=1200, resources={"metadata": {"path": str(SOURCE)}}).execute()
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("jupytext", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)      # run timestamps: noise in every diff
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace(*LINKS)
        elif cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
    TARGET.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, TARGET / f"{name}.ipynb")
    return TARGET / f"{name}.ipynb"


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in SOURCE.glob("*.ipynb"))
    for name in names:
        start = time.time()
        path = publish(name)
        print(f"{path.relative_to(ROOT)}: {time.time() - start:.0f} s, {path.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
