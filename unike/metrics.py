"""`evaluate`: reliability, generality and locality of an editing method, under named protocols.

Protocols (docs/metrics.md gives the formulas, who uses each and since when):
* ``token_acc`` (UniKE's code; EasyEdit for Rel/Gen): teacher-forced share of target tokens whose argmax
  is the target token; locality is the share of answer positions whose argmax is unchanged (top-1).
* ``exact``: the greedy answer equals the target (after normalisation); locality is the share of
  probes whose greedy answer is unchanged.
* ``easyedit`` (EasyEdit's `MultimodalEditor` since Dec 2024): edit probes as ``token_acc``; locality
  compares the top-k token ids at *every* position of the teacher-forced input (image tokens, template,
  prompt and answer): k = 1 for the text-only T-Loc, k = 10 (rank by rank) for the probes with an image
  (M-Loc, and here CI-Loc and RI-Loc).

A *method* is any object with ``model``, ``processor``, ``edit(case)``, ``reset()`` and a
``disabled()`` context manager that gives the unedited model; a bare model is the "base" row. A method
with ``rewrite(prompt) -> str`` (in-context editing) has every probe's prompt rewritten when the edited
model is scored, never for the unedited predictions.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .data.case import EditCase, load_image, missing_images
from .prompting import collate, encode, on_model, pad_id_of, tokenizer_of

PROTOCOLS = ("token_acc", "exact", "easyedit")
SCORE_AFTER = ("all", "each")
EDIT_METRICS = ("rel", "t_gen", "m_gen", "port")
LOC_METRICS = ("t_loc", "m_loc", "ci_loc", "ri_loc")
METRICS = EDIT_METRICS + LOC_METRICS
EASYEDIT_TOPK = {"t_loc": 1, "m_loc": 10, "ci_loc": 10, "ri_loc": 10}   # text-only: top-1; with an image: top-10


@dataclass
class Probe:
    metric: str
    image: object
    prompt: str
    answer: str


def probes(case: EditCase) -> list[Probe]:
    """The probes an edit case carries (missing fields give no probe)."""
    c = case
    out = [Probe("rel", c.image, c.prompt, c.target)]
    if c.rephrase_prompt:
        out.append(Probe("t_gen", c.image, c.rephrase_prompt, c.target))
    if c.rephrase_image is not None:
        out.append(Probe("m_gen", c.rephrase_image, c.prompt, c.target))
    if getattr(c, "port_prompt", ""):   # a two-hop question answered from the edited fact
        out.append(Probe("port", c.image, c.port_prompt, c.port_answer))
    if c.loc_prompt:
        out.append(Probe("t_loc", None, c.loc_prompt, c.loc_answer))
    if c.mloc_image is not None and c.mloc_prompt:
        out.append(Probe("m_loc", c.mloc_image, c.mloc_prompt, c.mloc_answer))
    if c.ci_prompt:
        out.append(Probe("ci_loc", c.image, c.ci_prompt, c.ci_answer))
    if c.ri_image is not None:
        out.append(Probe("ri_loc", c.ri_image, c.prompt, c.ri_answer))
    return out


class Unedited:
    """The base row: a model that never changes (reliability near 0, locality 100)."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def edit(self, case):
        return self

    def reset(self):
        return self

    def disabled(self):
        return contextlib.nullcontext()


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


@torch.no_grad()
def token_predictions(model, processor, items: Sequence[Probe], batch_size: int = 16) -> list[torch.Tensor]:
    """Teacher-forced argmax ids at the answer positions, one 1-D tensor per probe."""
    pad, out = pad_id_of(processor), []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encs = [encode(processor, load_image(p.image), p.prompt, p.answer) for p in chunk]
        batch = on_model(collate(encs, pad, side="right"), model)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1]:]
        pred = logits[:, :-1].argmax(-1)
        mask = labels[:, 1:] != -100
        out += [pred[i][mask[i]].cpu() for i in range(len(chunk))]
    return out


@torch.no_grad()
def position_topk(model, processor, items: Sequence[Probe], k: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Top-`k` token ids at every position of the teacher-forced prompt + answer (image tokens and
    template included), one ``[positions, k]`` tensor per probe, in rank order."""
    pad, out = pad_id_of(processor), []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encs = [encode(processor, load_image(p.image), p.prompt, p.answer) for p in chunk]
        batch = on_model(collate(encs, pad, side="right"), model)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        ids = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        real = batch["attention_mask"].bool()
        out += [ids[i][real[i]].cpu() for i in range(len(chunk))]
    return out


def answer_ids(processor, items: Sequence[Probe]) -> list[torch.Tensor]:
    """The answer's token ids as `encode` appends them."""
    tok = tokenizer_of(processor)
    return [torch.tensor(tok(" " + p.answer.strip(), add_special_tokens=False)["input_ids"]) for p in items]


@torch.no_grad()
def generations(model, processor, items: Sequence[Probe], batch_size: int = 16, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers (new tokens only), batched with left padding."""
    tok, pad, out = tokenizer_of(processor), pad_id_of(processor), []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encs = [encode(processor, load_image(p.image), p.prompt) for p in chunk]
        batch = on_model(collate(encs, pad, side="left"), model)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += [s.strip() for s in tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def _predict(protocol, model, processor, items: Sequence[Probe], batch_size: int) -> list:
    """What each probe is scored on: ``exact``, the greedy answer; ``token_acc``, the argmax ids at the
    answer positions; ``easyedit``, those for edit probes and the top-k ids at every position for
    locality probes (k from `EASYEDIT_TOPK`)."""
    if protocol == "exact":
        return generations(model, processor, items, batch_size)
    if protocol == "token_acc":
        return token_predictions(model, processor, items, batch_size)
    out = [None] * len(items)
    for k in (None, *sorted(set(EASYEDIT_TOPK.values()))):      # None: the edit probes
        idx = [i for i, p in enumerate(items) if EASYEDIT_TOPK.get(p.metric) == k]
        sub = [items[i] for i in idx]
        preds = token_predictions(model, processor, sub, batch_size) if k is None else \
            position_topk(model, processor, sub, k, batch_size)
        for i, pred in zip(idx, preds):
            out[i] = pred
    return out


def agreement(pred, ref) -> float:
    """Strings: 1 if equal after `normalize`. Id tensors: the share of equal entries over the aligned
    last positions (EasyEdit's alignment, for inputs an in-context prefix made longer)."""
    if isinstance(pred, str):
        return float(normalize(pred) == normalize(ref))
    n = min(len(pred), len(ref))
    return float((pred[len(pred) - n:] == ref[len(ref) - n:]).float().mean()) if n else 0.0


def _score(protocol, model, processor, items, base, batch_size) -> list[float]:
    """Per-probe scores in [0, 1]: edit probes against the target, locality probes against `base`."""
    preds = _predict(protocol, model, processor, items, batch_size)
    gold = [p.answer for p in items] if protocol == "exact" else answer_ids(processor, items)
    return [agreement(pred, b if p.metric in LOC_METRICS else g) for p, pred, g, b in zip(items, preds, gold, base)]


def evaluate(method, cases: Iterable[EditCase], protocol: str = "token_acc", *, mode: str = "one-step",
             k: int = 1, score_after: str = "all", processor=None, batch_size: int = 16,
             progress: bool = True) -> dict[str, float]:
    """Mean scores in % for rel, t_gen, m_gen, t_loc, m_loc (and ci_loc, ri_loc, port when cases carry them).

    ``method``: an editor (`unike.method.EditMethod`: UniKE or a baseline), or a bare model for the
    unedited row (its edits are no-ops).

    ``mode="one-step"``: reset, edit one case, score its probes. ``mode="sequential"``: in chunks of
    ``k`` cases, reset, edit the k in order; ``score_after="all"`` scores every probe of the k cases
    after the k-th edit, ``"each"`` scores each case right after its own edit (EasyEdit's and the
    UniKE code's rule; earlier cases are not rescored). Locality compares with the unedited model.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if mode not in ("one-step", "sequential"):
        raise ValueError(f"unknown mode {mode!r}; choose 'one-step' or 'sequential'")
    if score_after not in SCORE_AFTER:
        raise ValueError(f"unknown score_after {score_after!r}; choose 'all' (after the K-th edit) or 'each' "
                         "(each case right after its own edit)")
    if isinstance(method, torch.nn.Module):
        if processor is None:
            raise ValueError("evaluate(model, ...) on a bare model needs processor=...")
        method = Unedited(method, processor)
    cases = list(cases)
    if not cases:
        raise ValueError("evaluate() got no cases")
    step = 1 if mode == "one-step" else max(1, int(k))
    model, proc = method.model, method.processor
    rewrite = getattr(method, "rewrite", None)
    per_case = [probes(c) for c in cases]
    missing = missing_images(p.image for ps in per_case for p in ps)
    if missing:   # found now, not after some edits were made
        raise FileNotFoundError(f"{len(missing)} probe image(s) do not exist, e.g. {missing[:3]}; fix the cases' "
                                "image paths (or load_mmedit's image_root)")
    loc_items = [p for ps in per_case for p in ps if p.metric in LOC_METRICS]
    with method.disabled():
        base_loc = iter(_predict(protocol, model, proc, loc_items, batch_size))
    base = [[next(base_loc) if p.metric in LOC_METRICS else None for p in ps] for ps in per_case]
    totals: dict[str, list[float]] = {}

    def score(ids: range) -> None:
        items = [p for i in ids for p in per_case[i]]
        if rewrite is not None:
            items = [replace(p, prompt=rewrite(p.prompt)) for p in items]
        refs = [b for i in ids for b in base[i]]
        for p, s in zip(items, _score(protocol, model, proc, items, refs, batch_size)):
            totals.setdefault(p.metric, []).append(s)

    after = f", score after {score_after}" if mode == "sequential" else ""
    bar = tqdm(total=len(cases), desc=f"evaluate ({mode}, {protocol}{after})", disable=not progress)
    try:
        for start in range(0, len(cases), step):
            method.reset()
            chunk = range(start, min(start + step, len(cases)))
            for group in ([chunk] if score_after == "all" else [range(i, i + 1) for i in chunk]):
                for i in group:
                    method.edit(cases[i])
                score(group)
                bar.update(len(group))
    finally:
        bar.close()
        method.reset()    # no edit outlives evaluate(), even when it stops with an error
    return {m: 100.0 * sum(totals[m]) / len(totals[m]) for m in METRICS if m in totals}
