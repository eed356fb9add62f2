"""Read MMEdit (E-VQA / E-IC, as shipped with EasyEdit) JSON files into `EditCase`s.

Record fields: `src` (prompt), `pred` (the model's original answer), `alt` (edit target), `rephrase`,
`image`, `image_rephrase`, `loc`, `loc_ans`, `m_loc` (image), `m_loc_q`, `m_loc_a`. Files written by
`SynthWorld.export_mmedit` also carry `ci`, `ci_ans`, `ri_image`, `ri_ans`, `port`, `port_ans`. Images stay
paths (opened lazily by `EditCase.resolved()` / `load_image`); their existence is checked here.

Image paths are relative, as in EasyEdit, where `VQADataset` / `CaptionDataset` join `image` and `m_loc`
to the hparams' `coco_image` and `image_rephrase` to `rephrase_image` (both `../` in every shipped
hparams file, i.e. relative to the working directory; MMEdit's paths look like
`val2014/COCO_val2014_000000451435.jpg` and `val2014_image_rephrase/451435003_COCO_val2014_000000451435.png`).
Here `image_root` plays `coco_image` and `rephrase_root` plays `rephrase_image`.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

from .case import EditCase

REQUIRED = ("src", "alt", "image")
# a probe given by its first field needs the others: EasyEdit's VQADataset drops records with an empty field
PROBES = (("loc", "loc_ans"), ("m_loc", "m_loc_q", "m_loc_a"), ("m_loc_q", "m_loc_a"), ("ci", "ci_ans"),
          ("ri_image", "ri_ans"), ("port", "port_ans"))
IMAGES = (("image", False), ("image_rephrase", True), ("m_loc", False), ("ri_image", False))  # (key, rephrase root)


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


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    return value.strip() if isinstance(value, str) else ""


def _problem(rec: dict) -> str | None:
    """Why a record cannot make a complete case (None if it can)."""
    empty = [k for k in REQUIRED if not _text(rec, k)]
    if empty:
        return f"an empty {'/'.join(empty)}"
    for first, *rest in PROBES:
        gaps = [k for k in rest if not _text(rec, k)]
        if _text(rec, first) and gaps:
            return f"{first} without {'/'.join(gaps)}"
    for key, _ in IMAGES:
        rel = _text(rec, key)
        if rel and (Path(rel).is_absolute() or ".." in Path(rel).parts):
            return f"an {key} path outside its image folder (absolute, or with '..')"
    return None


def load_mmedit(json_path, image_root=None, rephrase_root=None, task: str | None = None,
                check_images: bool = True) -> list[EditCase]:
    """`EditCase`s from an MMEdit E-VQA / E-IC JSON file.

    `image_root` resolves `image`, `m_loc` and `ri_image` (EasyEdit's `coco_image`; default here: the
    JSON file's folder, where `SynthWorld.export_mmedit` puts them); `rephrase_root` resolves
    `image_rephrase` (EasyEdit's `rephrase_image`; default: `image_root`). `task` defaults to "caption"
    when the file name contains "caption", else "vqa". A record that cannot make a complete case (an
    empty `src`, `alt` or `image`; a probe's question without its answer, e.g. `loc` without `loc_ans`;
    with `check_images`, an image that does not exist) is skipped, and one warning counts the skipped
    records by reason. It raises only when no record is usable.
    """
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"MMEdit file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    reroot = Path(rephrase_root) if rephrase_root is not None else root
    for name, folder in (("image_root", root), ("rephrase_root", reroot)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} {folder} is not a folder")
    task = task or ("caption" if "caption" in path.name.lower() else "vqa")
    records = _records(path)
    if records and not any(all(k in r for k in REQUIRED) for r in records):
        raise ValueError(f"{path}: every record lacks one of {REQUIRED}; is this an MMEdit E-VQA / E-IC file?")
    cases, skipped, missing = [], Counter(), []
    for i, rec in enumerate(records):
        problem = _problem(rec)
        paths = {k: str((reroot if re else root) / _text(rec, k)) if _text(rec, k) else None for k, re in IMAGES}
        absent = [p for p in paths.values() if p and check_images and not Path(p).is_file()]
        if problem is None and absent:
            problem, missing = "a missing image", missing + absent
        if problem is not None:
            skipped[problem] += 1
            continue
        try:
            cases.append(EditCase(
                image=paths["image"], prompt=rec["src"], target=rec["alt"], ground_truth=_text(rec, "pred"),
                rephrase_prompt=_text(rec, "rephrase"), rephrase_image=paths["image_rephrase"],
                loc_prompt=_text(rec, "loc"), loc_answer=_text(rec, "loc_ans"), mloc_image=paths["m_loc"],
                mloc_prompt=_text(rec, "m_loc_q"), mloc_answer=_text(rec, "m_loc_a"), ci_prompt=_text(rec, "ci"),
                ci_answer=_text(rec, "ci_ans"), ri_image=paths["ri_image"], ri_answer=_text(rec, "ri_ans"),
                port_prompt=_text(rec, "port"), port_answer=_text(rec, "port_ans"), task=task, meta={"record": i}))
        except ValueError as err:      # anything else EditCase rejects: still one record, not the file
            skipped[f"a field EditCase rejects ({err})"] += 1
    hint = (f"; e.g. {missing[:2]}: image paths are relative to image_root ({root}; EasyEdit's coco_image, the "
            f"folder that holds val2014/) and rephrase_root ({reroot}; EasyEdit's rephrase_image)") if missing else ""
    reasons = ", ".join(f"{n} with {why}" for why, n in skipped.most_common())
    if not cases:
        raise (FileNotFoundError if missing else ValueError)(
            f"{path}: no usable record among {len(records)} ({reasons or 'the file is empty'}){hint}")
    if skipped:
        warnings.warn(f"{path}: skipped {sum(skipped.values())} of {len(records)} records: {reasons} (EasyEdit's "
                      f"dataset classes drop incomplete records too){hint}", stacklevel=2)
    return cases


def write_mmedit(cases: list[EditCase], directory, prefix: str, name: str) -> Path:
    """Write `cases` as an MMEdit (E-VQA / E-IC) JSON file `directory/name` plus PNGs under
    `directory/images/` (named `prefix_k_field.png`, paths relative to `directory`); return the JSON path.
    The extra keys `ci`, `ci_ans`, `ri_image`, `ri_ans`, `port`, `port_ans` carry SynthWorld's other probes."""
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for k, c in enumerate(cases):
        paths = {}
        for field in ("image", "rephrase_image", "mloc_image", "ri_image"):
            rel = f"images/{prefix}_{k:05d}_{field}.png"
            getattr(c, field).save(root / rel)
            paths[field] = rel
        records.append({
            "src": c.prompt, "pred": c.ground_truth, "alt": c.target, "rephrase": c.rephrase_prompt,
            "image": paths["image"], "image_rephrase": paths["rephrase_image"],
            "loc": c.loc_prompt, "loc_ans": c.loc_answer,
            "m_loc": paths["mloc_image"], "m_loc_q": c.mloc_prompt, "m_loc_a": c.mloc_answer,
            "ci": c.ci_prompt, "ci_ans": c.ci_answer, "ri_image": paths["ri_image"], "ri_ans": c.ri_answer,
            "port": c.port_prompt, "port_ans": c.port_answer,
        })
    path = root / name
    path.write_text(json.dumps(records, indent=1))
    return path
