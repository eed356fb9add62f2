"""Read MMEdit (E-VQA / E-IC, as shipped with EasyEdit) JSON files into `EditCase`s.

Record fields: `src` (prompt), `pred` (the model's original answer), `alt` (edit target), `rephrase`,
`image`, `image_rephrase`, `loc`, `loc_ans`, `m_loc` (image), `m_loc_q`, `m_loc_a`. Files written by
`SynthWorld.export_mmedit` also carry `ci`, `ci_ans`, `ri_image`, `ri_ans`, `port`, `port_ans`. Images stay
paths (opened lazily by `EditCase.resolved()` / `load_image`); their existence is checked here.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .case import EditCase

REQUIRED = ("src", "alt", "image")


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {err}") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("records"))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of MMEdit records (objects with src, alt, image, ...)")
    return data


def load_mmedit(json_path, image_root=None, rephrase_root=None, task: str | None = None,
                check_images: bool = True) -> list[EditCase]:
    """`EditCase`s from an MMEdit E-VQA / E-IC JSON file.

    `image_root` resolves `image`, `m_loc` and `ri_image` (default: the JSON file's folder);
    `rephrase_root` resolves `image_rephrase` (default: `image_root`). `task` defaults to "caption" when
    the file name contains "caption", else "vqa". Records with an empty `src` or `alt` are skipped with
    a warning, as EasyEdit does. With `check_images`, every referenced image must exist.
    """
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"MMEdit file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    reroot = Path(rephrase_root) if rephrase_root is not None else root
    if not root.is_dir():
        raise FileNotFoundError(f"image_root {root} is not a folder")
    task = task or ("caption" if "caption" in path.name.lower() else "vqa")
    cases, skipped, missing = [], 0, []

    def image(rec: dict, key: str, base: Path):
        rel = rec.get(key) or ""
        if not rel:
            return None
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{key} = {rel!r} must be a path relative to its image folder ({base}), without "
                             "'..'; fix the record or move the image under that folder")
        p = base / rel
        if check_images and not p.is_file():
            missing.append(str(p))
        return str(p)

    for i, rec in enumerate(_records(path)):
        absent = [k for k in REQUIRED if k not in rec]
        if absent:
            raise ValueError(f"{path} record {i} lacks {absent}; is this an MMEdit E-VQA / E-IC file?")
        if not str(rec["src"]).strip() or not str(rec["alt"]).strip():
            skipped += 1
            continue
        try:
            if not rec["image"]:
                raise ValueError("its image is empty, and an E-VQA / E-IC edit is about an image; give the "
                                 "image's path (relative to image_root) or drop the record")
            cases.append(EditCase(
                image=image(rec, "image", root), prompt=rec["src"], target=rec["alt"],
                ground_truth=rec.get("pred", ""), rephrase_prompt=rec.get("rephrase", ""),
                rephrase_image=image(rec, "image_rephrase", reroot),
                loc_prompt=rec.get("loc", ""), loc_answer=rec.get("loc_ans", ""),
                mloc_image=image(rec, "m_loc", root), mloc_prompt=rec.get("m_loc_q", ""),
                mloc_answer=rec.get("m_loc_a", ""), ci_prompt=rec.get("ci", ""), ci_answer=rec.get("ci_ans", ""),
                ri_image=image(rec, "ri_image", root), ri_answer=rec.get("ri_ans", ""),
                port_prompt=rec.get("port", ""), port_answer=rec.get("port_ans", ""), task=task,
                meta={"record": i}))
        except ValueError as err:
            raise ValueError(f"{path} record {i}: {err}") from None
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) referenced by {path} are missing, e.g. {missing[:3]}; "
                                f"check image_root ({root}) and rephrase_root ({reroot})")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} record(s) with an empty src or alt")
    return cases
