"""Write the figures the README shows: run each notebook that tags a cell `figure:<name>` and save that
cell's image as docs/img/<name>.png, so the picture is exactly what the notebook draws.

    python scripts/make_figures.py      # about a minute on a CPU
"""
from __future__ import annotations

import base64
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "figure:"


def tagged(nb: nbformat.NotebookNode) -> list[tuple[str, nbformat.NotebookNode]]:
    return [(tag[len(PREFIX):], cell) for cell in nb.cells for tag in cell.metadata.get("tags", [])
            if tag.startswith(PREFIX)]


def figures(path: Path) -> dict[str, bytes]:
    """Run the notebook from the repository root; the PNG of each tagged cell, by figure name."""
    nb = nbformat.read(path, as_version=4)
    if not tagged(nb):
        return {}
    NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
    out = {}
    for name, cell in tagged(nb):
        pngs = [o["data"]["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
        if not pngs:
            raise RuntimeError(f"{path.name}: the cell tagged {PREFIX}{name} drew no figure")
        out[name] = base64.b64decode(pngs[-1])
    return out


def main() -> int:
    folder = ROOT / "docs" / "img"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for name, png in figures(path).items():
            (folder / f"{name}.png").write_bytes(png)
            print(f"{path.name} -> docs/img/{name}.png ({len(png) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
