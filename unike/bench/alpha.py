"""α against relevance: does the semantic gate open for probes about the edit and stay shut elsewhere?

After each one-step edit, every probe prompt (without its answer) runs once through the edited model;
at its question-final token and in every edited layer we read α (the output of the `unike_memory.alpha`
submodule) and the best match of that token against the memory (`LatentMemory.relevance`: the quantity
the relevance gate thresholds; stored under "cosine", which it is for the edits' entries). Probes about
the edit (rel, t_gen, m_gen) should get a high α; unrelated ones (t_loc, m_loc, ci_loc, ri_loc) an α
near 0.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.case import load_image
from ..hooks import Hooks
from ..metrics import EDIT_METRICS, probes
from ..prompting import encode, on_model


@torch.no_grad()
def alpha_points(editor, cases, progress: bool = True) -> dict:
    """{"gate": {layer: min cosine}, "points": [{"metric", "relevant", "layer", "alpha", "cosine"}]}."""
    seen: dict[int, dict] = {l: {} for l in editor.layer_ids}
    with Hooks() as hooks:
        for l in editor.layer_ids:
            mem = editor.stack[l].block.unike_memory
            hooks.pre(mem, lambda m, args, l=l: seen[l].__setitem__("x", args[1]))
            hooks.forward(mem.alpha, lambda m, args, out, l=l: seen[l].__setitem__("alpha", out))
        points = []
        for case in tqdm(cases, desc="alpha vs relevance", disable=not progress):
            editor.reset()
            editor.edit(case)
            for p in probes(case):
                for l in editor.layer_ids:
                    seen[l].clear()
                editor.model(**on_model(encode(editor.processor, load_image(p.image), p.prompt), editor.model))
                for l in editor.layer_ids:
                    if "alpha" not in seen[l]:
                        continue      # the memory was not consulted (empty, or latent off)
                    mem = editor.memory[l]
                    x = seen[l]["x"].reshape(-1, seen[l]["x"].shape[-1])[-1:].float()
                    cosine = mem.relevance(x)[0]
                    points.append({"metric": p.metric, "relevant": p.metric in EDIT_METRICS, "layer": l,
                                   "alpha": round(float(seen[l]["alpha"].reshape(-1)[-1]), 5),
                                   "cosine": round(float(cosine), 5)})
    editor.reset()
    return {"gate": {str(l): float(editor.memory[l].min_similarity) for l in editor.layer_ids}, "points": points}


def summary(record: dict) -> dict[tuple[int, str], dict[str, float]]:
    """Per (layer, "relevant" | "unrelated"): mean α, share of tokens with α > 0 (the gate open), mean
    best match, and the count."""
    out = {}
    for layer in sorted({p["layer"] for p in record["points"]}):
        for name, want in (("relevant", True), ("unrelated", False)):
            pts = [p for p in record["points"] if p["layer"] == layer and p["relevant"] == want]
            if pts:
                a = [p["alpha"] for p in pts]
                out[(layer, name)] = {"mean_alpha": sum(a) / len(a), "open": sum(v > 0 for v in a) / len(a),
                                      "cosine": sum(p["cosine"] for p in pts) / len(pts), "count": len(a)}
    return out
