"""Saving and loading an editor: `unike.safetensors` (every tensor of `Edits`, by name) and `unike.json`
(the config and counters, with the tensor file's SHA-256). Safetensors and JSON only, never pickle; every
name, shape and count is checked before a loaded editor is kept, and states of older versions are upgraded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import UniKEConfig, conforms
from .router import EditRouter
from .subject import WIDTH

STATE_FILE, CONFIG_FILE = "unike.safetensors", "unike.json"
META_FIELDS = {"config": dict, "layer_ids": list[int], "num_layers": int, "hidden_size": int, "fitted": bool,
               "n_edits": int, "fit_questions": list[str], "model_class": str, "sha256": str}
# names before tensors were named by their module (spaces.3.x, memory.3.x, negatives.3, ...) -> layers.3.…
_OLD = re.compile(r"^(spaces|memory|neurons)\.(\d+)\.(.+)$"
                  r"|^(negatives|answer_negatives|prompt_negatives|edited)\.(\d+)$")
_INDEX = ("basis", "coords", "residual")      # the memory's index, now a module of its own


def save(editor, path) -> Path:
    """Write `unike.safetensors` and `unike.json` into the folder `path` (created if needed). Each file is
    written under a temporary name and then renamed, so a failed save leaves an earlier one whole."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; save() writes a folder (unike.safetensors + unike.json): "
                              "pass a folder path")
    path.mkdir(parents=True, exist_ok=True)
    tmp_state, tmp_meta = path / f".{STATE_FILE}.tmp", path / f".{CONFIG_FILE}.tmp"
    try:
        save_file(editor.state(), str(tmp_state))
        meta = {"config": asdict(editor.config), "layer_ids": editor.layer_ids, "num_layers": len(editor.stack),
                "hidden_size": editor.stack.hidden_size, "fitted": editor.fitted, "n_edits": editor.n_edits,
                "fit_questions": editor.fit_questions, "asked": editor.asked,
                "model_class": type(editor.model).__name__, "sha256": _sha256(tmp_state)}
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_state, path / STATE_FILE)
        os.replace(tmp_meta, path / CONFIG_FILE)
    finally:
        tmp_state.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return path


def read(path) -> tuple[dict, dict[str, Tensor], UniKEConfig]:
    """The checked JSON record, the tensors and the config of a saved editor."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass the folder written by editor.save()")
    for name in (STATE_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; pass the folder written by editor.save()")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(str(path / STATE_FILE))
    except Exception as err:
        raise ValueError(f"{path} holds a corrupt or truncated UniKE state ({err}); save it again") from err
    _check_meta(meta, path / CONFIG_FILE)
    if _sha256(path / STATE_FILE) != meta["sha256"]:
        raise ValueError(f"{path / STATE_FILE} does not match the checksum in {CONFIG_FILE}: the files come from "
                         "two different saves or one was altered; save the editor again")
    try:
        config = UniKEConfig(**meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_FILE}: {err}") from None
    return meta, state, config


def restore(editor, meta: dict, state: dict[str, Tensor]) -> None:
    """Put a read state into a fresh editor (checked first; the caller detaches it on error)."""
    if meta["layer_ids"] != editor.layer_ids:
        raise ValueError(f"{CONFIG_FILE} lists layers {meta['layer_ids']}, but its config gives "
                         f"{editor.layer_ids}; save the editor again")
    state, unindexed = upgrade(editor, state)
    check_state(editor, state, meta["n_edits"])
    asked = _asked(meta, len(state["router.has_image"]))
    for name, value in state.items():
        editor.edits.put(name, value)
    for l in unindexed:
        editor.memory[l].reindex()
    editor.fitted, editor.n_edits = meta["fitted"], meta["n_edits"]
    editor.fit_questions = list(meta["fit_questions"])
    editor.asked = asked


def _asked(meta: dict, routed: int) -> list[list[str] | None]:
    """Each routed edit's [question, base answer] (for rivals); none for a state saved before they were kept,
    and none past the router's edits (a state whose router was saved before routing)."""
    asked = meta.get("asked", [])
    if (not isinstance(asked, list) or len(asked) > max(routed, meta.get("n_edits", 0))
            or not all(a is None or isinstance(a, list) and len(a) == 2 and all(isinstance(x, str) for x in a)
                       for a in asked)):
        raise ValueError(f"{CONFIG_FILE}: 'asked' must list at most one [question, answer] pair or null per edit; "
                         "it was altered; save the editor again")
    return (list(asked) + [None] * routed)[:routed]


def upgrade(editor, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[int]]:
    """What a state saved by an older version lacks or names otherwise: tensors named by module kind and
    layer (renamed), empty `prompt_negatives` pools (the option's default), α's scale (1), the memory's
    masks (none), its entries' edits (one entry per edit) and head keys (none: read by the output shift),
    an empty router (routing then off, with a warning) or one without its fit negatives' features (new
    edits then train against every negative, as before), no edit's subject (`unike.subject`; nor the fit
    words to choose one, until fit again), ζ′ decoders (new edits without ζ′, with a warning) and, where the
    memory's index has no residuals, an empty index to be rebuilt from the saved keys after loading (the
    layers returned)."""
    state = {_rename(k): v for k, v in state.items()}
    d, ids = editor.stack.hidden_size, editor.layer_ids
    state = {**{f"layers.{l}.prompt_negatives": torch.zeros(0, d) for l in ids}, **state}
    old_zeta = [l for l in ids if f"layers.{l}.spaces.decoder" not in state]
    if old_zeta:
        warnings.warn("this state was saved when each edit learned its own W_ζ: its edits keep their ζ′, and "
                      "edits made after loading carry none (fit again for the fixed ζ′ = Dec(ζ))", stacklevel=4)
        for l in old_zeta:
            state[f"layers.{l}.spaces.decoder"] = torch.zeros(editor.config.truth_dim, d)
            state[f"layers.{l}.neurons.truth"] = torch.zeros(0)
    if "router.keys" not in state:
        if editor.config.route:
            warnings.warn("this state was saved before edits were routed (unike.router): its edits act "
                          "ungated, as then; loading it with route=False", stacklevel=4)
            editor.config = replace(editor.config, route=False)
    if "router.radius" not in state and "router.has_image" in state:   # saved before per-edit image thresholds
        state["router.radius"] = torch.full((len(state["router.has_image"]),), editor.config.route_image)
    if "router.subject" not in state and "router.has_image" in state:  # saved before subjects: none (and no
        state["router.subject"] = torch.full((len(state["router.has_image"]), WIDTH), -1)   # fit words either)
    for l in ids:   # saved before α had its scale, the memory its entries' edits and masks: raw cosines, no masks
        state.setdefault(f"layers.{l}.memory.alpha.scale", torch.tensor(1.0))
        n_fit, n = int(state.get(f"layers.{l}.memory.n_fit", 0)), len(state.get(f"layers.{l}.memory.keys", ()))
        state.setdefault(f"layers.{l}.memory.masked", torch.zeros(n_fit, dtype=torch.bool))
        state.setdefault(f"layers.{l}.memory.owner", torch.arange(n - n_fit))
        state.setdefault(f"layers.{l}.memory.head_keys", torch.zeros(n, 0))     # read by the output shift only
        state.setdefault(f"layers.{l}.memory.head_values", torch.zeros(n, 0))
    # a router saved before it kept its fit negatives' features: new edits train against every negative
    state = {**{f"router.{k}": v for k, v in EditRouter(d).state_dict().items()}, **state}
    index = [f"layers.{l}.memory.index.{k}" for l in ids for k in _INDEX]
    if (any(f"layers.{l}.memory.index.residual" in state for l in ids)
            or any(f"layers.{l}.memory.n_fit" not in state for l in ids)):
        return state, []
    warnings.warn("this state was saved before the latent memory had its index (or the index's residuals); "
                  "rebuilding it from the saved keys (save the editor again to store it)", stacklevel=4)
    state = {k: v for k, v in state.items() if k not in index}
    for l in ids:
        n_fit = int(state[f"layers.{l}.memory.n_fit"])
        empty = {"basis": torch.zeros(0, d), "coords": torch.zeros(n_fit, 0), "residual": torch.zeros(n_fit)}
        state.update({f"layers.{l}.memory.index.{k}": v for k, v in empty.items()})
    return state, list(ids)


def _rename(name: str) -> str:
    m = _OLD.match(name)
    if m is None:
        return name
    kind, l, rest = (m[1], m[2], m[3]) if m[1] else ("", m[5], m[4])
    if kind == "memory" and rest in _INDEX:
        rest = f"index.{rest}"
    return f"layers.{l}.{kind}.{rest}" if kind else f"layers.{l}.{rest}"


def check_state(editor, state: dict[str, Tensor], n_edits: int) -> None:
    """A saved state has this editor's tensor names and shapes (sizes that grow with fit and edits, 0 in
    a fresh editor, excepted) and consistent counts."""
    template = editor.state()
    missing, extra = sorted(set(template) - set(state)), sorted(set(state) - set(template))
    if missing or extra:
        raise ValueError(f"the saved state lacks {missing[:3]} and has unexpected {extra[:3]}: it belongs to "
                         "another editor layout or unike version; save it again")
    for k, t in template.items():
        v = state[k]
        if (v.dim() != t.dim() or v.is_floating_point() != t.is_floating_point()
                or any(a != b and b != 0 for a, b in zip(v.shape, t.shape))):
            want = tuple("any" if b == 0 else b for b in t.shape)
            raise ValueError(f"saved tensor {k} is {v.dtype} {tuple(v.shape)}; this editor needs "
                             f"{t.dtype} {want}: the state is from another model or was altered")
    cfg = editor.config
    for l in editor.layer_ids:
        s = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{l}.")}
        sizes = {k: s[f"memory.{k}"].shape[0] for k in ("keys", "values", "attn_values", "head_keys", "head_values")}
        owned = len(s["memory.owner"]) + int(s["memory.n_fit"])
        neurons = [s["neurons.keys"].shape[1], len(s["neurons.bias"]), len(s["neurons.values"]),
                   len(s["neurons.zeta"]) * cfg.n_neurons]
        edits = len(s["neurons.zeta"]) if cfg.intrinsic else n_edits
        n_fit = int(s["memory.n_fit"])
        if (len(set(sizes.values())) > 1 or n_fit > sizes["keys"] or owned != sizes["keys"]
                or len(s["memory.masked"]) != n_fit
                or {len(s["memory.index.coords"]), len(s["memory.index.residual"])} != {n_fit}
                or s["memory.index.coords"].shape[1] != len(s["memory.index.basis"])
                or len(set(neurons)) > 1 or edits != n_edits
                or s["neurons.truth"].numel() not in (0, editor.stack.hidden_size)):
            raise ValueError(f"the saved state of layer {l} is inconsistent (memory sizes {sizes}, n_fit {n_fit}, "
                             f"neurons {neurons}, {n_edits} edits): it was altered or truncated; save it again")
    routed, owner = len(state["router.has_image"]), state["router.owner"]
    if ({len(state[f"router.{k}"]) for k in ("images", "open", "radius", "subject")} != {routed}
            or len(state["router.negative_words"]) != len(state["router.negative_word_rows"])
            or len(owner) != len(state["router.keys"]) or (len(owner) and int(owner.max()) >= routed)
            or any(state[f"router.{k}"].shape[1:] != (2,) or bool((state[f"router.{k}"] >= routed).any())
                   for k in ("rivals", "yields"))
            or (cfg.intrinsic and cfg.route and routed != n_edits)):
        raise ValueError(f"the saved router is inconsistent ({routed} edits routed, {len(owner)} keys, "
                         f"{n_edits} edits): it was altered or truncated; save it again")


def _check_meta(meta, where: Path) -> None:
    """unike.json has every field with its type, and its config no field UniKEConfig lacks."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where} holds a {type(meta).__name__}, not a UniKE record; save the editor again")
    wrong = [f"{k} (needs {t if hasattr(t, '__origin__') else t.__name__})" for k, t in META_FIELDS.items()
             if not conforms(meta.get(k), t)]
    if wrong:
        raise ValueError(f"{where} has missing or mistyped fields: {', '.join(wrong)}; "
                         "it was altered or written by another tool; save the editor again")
    unknown = sorted(set(meta["config"]) - {f.name for f in fields(UniKEConfig)})
    if unknown:
        raise ValueError(f"{where} sets config fields UniKEConfig does not have: {unknown}; it was written by "
                         "another unike version or altered; remove them or save the editor again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
