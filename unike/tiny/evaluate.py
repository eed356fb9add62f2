"""Held-out accuracy of the tiny model on its world, by teacher-forced argmax (and greedy on a subset)."""
from __future__ import annotations

import random

import torch

from ..data.world import ATTRIBUTES, CAPTION_PROMPTS, EVAL_SEED, FACTS, QUESTIONS, SynthWorld
from .batch import Encoder, Example
from .hide import hide
from .items import Items


@torch.no_grad()
def teacher_forced(model, encoder: Encoder, examples: list[Example], batch_size: int = 64,
                   hide_layers=()) -> list[bool]:
    """For each example: does argmax reproduce every answer token and the EOS, given the true prefix?
    Image demonstrations are hidden from the query in `hide_layers`."""
    was_training = model.training
    model.eval()
    ok: list[bool] = []
    for i in range(0, len(examples), batch_size):
        b = encoder.batch(examples[i:i + batch_size])
        labels = b.pop("labels")
        with hide(model, b.pop("demo", None), hide_layers):
            logits = model(**b).logits[:, :-1]
        target, mask = labels[:, 1:], labels[:, 1:] != -100
        hit = (logits.argmax(-1) == target) | ~mask
        ok += hit.all(-1).tolist()
    model.train(was_training)
    return ok


def eval_items(world: SynthWorld, per_cell: int | None = None, seed: int = 0) -> dict[str, list[Example]]:
    """Held-out items: VQA per fact/attribute x paraphrase, text-only facts, captions, image-dependence pairs,
    and two-hop questions where the world has them."""
    rng = random.Random(f"eval-{world.seed}-{seed}")
    ents, its = world.entities, Items(world, held_out=True)

    def some(seq):
        return seq if per_cell is None or per_cell >= len(seq) else rng.sample(seq, per_cell)

    def render(e):
        return world.render(e, rng.randrange(EVAL_SEED, 2**31))

    items: dict[str, list[Example]] = {"vqa": [], "text": [], "caption": [], "swap": []}
    for key in FACTS + ATTRIBUTES:
        for q, question in enumerate(QUESTIONS[key]):
            for e in some(ents):
                items["vqa"].append(Example(render(e), question, e.get(key), tag=f"{key}/{q}"))
    for rel, subj, ans in some(world.text_facts()):
        for q in range(len(its.text_questions[rel])):
            items["text"].append(Example(None, world.text_question(rel, subj, q), ans, tag=rel))
    for key, questions in its.two_hop.items():
        items.setdefault("two_hop", [])
        for q, question in enumerate(questions):
            for e in some(ents):
                items["two_hop"].append(Example(render(e), question, world.two_hop(e, key), tag=f"{key}/{q}"))
    for e in some(ents):
        for prompt in CAPTION_PROMPTS:
            items["caption"].append(Example(render(e), prompt, world.caption(e), tag="caption"))
    for ex in items["vqa"]:  # the same question over another entity's image, whose answer differs
        key = ex.tag.split("/")[0]
        if key in FACTS:
            other = rng.choice([o for o in ents if o.get(key) != ex.answer])
            items["swap"].append(Example(render(other), ex.question, other.get(key), tag=ex.tag))
    return items


def _pct(xs) -> float | None:
    xs = list(xs)
    return round(100.0 * sum(xs) / len(xs), 2) if xs else None


def evaluate_tiny(model, processor, world: SynthWorld | None = None, per_cell: int | None = None, seed: int = 0,
                  greedy: int = 0) -> dict:
    """Accuracies in %: VQA (facts; per fact, per paraphrase), attributes, text-only, caption, image dependence.

    Image dependence = share of (item, other-entity item) pairs, same question, different true answers,
    where both answers are right. `greedy` > 0 also runs `answer()` on that many items per group and
    reports its accuracy and its agreement with teacher forcing.
    """
    world = world or SynthWorld(0)
    enc = Encoder(processor.tokenizer)
    items = eval_items(world, per_cell, seed)
    ok = {k: teacher_forced(model, enc, v) for k, v in items.items()}
    vqa = [(ex.tag, r) for ex, r in zip(items["vqa"], ok["vqa"])]
    fact_ok = [r for t, r in vqa if t.split("/")[0] in FACTS]  # aligned with items["swap"]
    m = {
        "vqa": _pct(fact_ok),
        "attributes": _pct(r for t, r in vqa if t.split("/")[0] in ATTRIBUTES),
        "text": _pct(ok["text"]),
        "caption": _pct(ok["caption"]),
        "image_dependence": _pct(a and b for a, b in zip(fact_ok, ok["swap"])),
        "per_key": {k: _pct(r for t, r in vqa if t.split("/")[0] == k) for k in FACTS + ATTRIBUTES},
        "per_cell": {t: _pct(r for t2, r in vqa if t2 == t) for t in dict.fromkeys(t for t, _ in vqa)},
        "text_per_relation": {rel: _pct(r for ex, r in zip(items["text"], ok["text"]) if ex.tag == rel)
                              for rel in dict.fromkeys(ex.tag for ex in items["text"])},
        **({"two_hop": _pct(ok["two_hop"])} if "two_hop" in ok else {}),
        "n_items": {k: len(v) for k, v in items.items()},
    }
    if greedy:
        from ..answer import answer

        agree, right = [], []
        for k in ("vqa", "text", "caption"):
            for ex, tf in list(zip(items[k], ok[k]))[:: max(1, len(items[k]) // greedy)][:greedy]:
                said = answer(model, processor, ex.image, ex.question)
                right.append(said == ex.answer)
                agree.append((said == ex.answer) == tf)
        m["greedy"] = {"n": len(right), "accuracy": _pct(right), "agrees_with_teacher_forced": _pct(agree)}
    return m


@torch.no_grad()
def greedy_tokens(model, encoder: Encoder, ex: Example, hide_layers=(), max_new_tokens: int = 16) -> str:
    """Greedy answer by full forward passes (no cache), so an image demonstration can stay hidden in
    `hide_layers` (`unike.answer` serves examples without one)."""
    b = encoder.batch([Example(ex.image, ex.question, "", tag=ex.tag, demo=ex.demo)])
    ids, said = b["input_ids"][:, :-1], []  # drop the EOS the encoder appended to the empty answer
    for _ in range(max_new_tokens):
        demo = b["demo"][:, :ids.shape[1]] if "demo" in b else None
        if demo is not None:
            demo = torch.cat([demo, demo.new_zeros(1, ids.shape[1] - demo.shape[1])], 1)
        with hide(model, demo, hide_layers):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=b.get("pixel_values")).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == encoder.eos:
            break
        said.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    words = {i: w for w, i in encoder.vocab.items()}
    return " ".join(words[i] for i in said)


def evaluate_in_context(model, processor, world: SynthWorld | None = None, n: int = 200, seed: int = 0,
                        hide_layers=(0, 1), greedy: int = 0) -> dict:
    """In-context figures in % over `n` held-out items each (teacher-forced argmax):

    - `a_update` / `a_text_update`: format A, one counterfactual demonstration among 3 distractors, queried
      with another paraphrase (VQA facts / text-only facts): answers the demonstration;
    - `a_retain` / `a_text_retain`: 4 demonstrations about other facts only: answers the truth;
    - `b_update`: format B, same entity and fact, the demonstration visible only in the layers outside
      `hide_layers`: answers it (`b_update_visible`: visible in every layer); `b_entity` / `b_fact`: a
      demonstration about another entity / another fact (visible outside `hide_layers`): answers the truth.

    `greedy` > 0 also decodes that many items per group greedily (format A through `unike.answer`) and
    reports the accuracy and the agreement with teacher forcing.
    """
    world = world or SynthWorld(0)
    enc = Encoder(processor.tokenizer)
    groups = Items(world, held_out=True).in_context(n, seed)
    ok = {k: teacher_forced(model, enc, v, hide_layers=hide_layers) for k, v in groups.items()}
    m = {k: _pct(v) for k, v in ok.items()}
    m["b_update_visible"] = _pct(teacher_forced(model, enc, groups["b_update"]))
    if greedy:
        from ..answer import answer

        agree, right = [], []
        for k, exs in groups.items():
            for ex, tf in list(zip(exs, ok[k]))[:greedy]:
                said = (greedy_tokens(model, enc, ex, hide_layers) if ex.demo
                        else answer(model, processor, ex.image, ex.question))
                right.append(said == ex.answer)
                agree.append((said == ex.answer) == tf)
        m["greedy"] = {"n": len(right), "accuracy": _pct(right), "agrees_with_teacher_forced": _pct(agree)}
    return m
