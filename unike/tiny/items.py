"""What the tiny model is trained and evaluated on: plain questions and in-context items of a `SynthWorld`.

- plain: a VQA question (facts, looks, two-hop where the world has them), a caption or a text-only fact;
- format A, what `unike.baselines.PromptIKE` writes: k text demonstrations "question answer" before the
  question, joined by `JOIN` (" ; "); a counterfactual demonstration asks the queried fact (any
  paraphrase) and its answer is the label; the others (distractors) ask about other facts or subjects;
- format B, what latent IKE emulates: an image demonstration (image, "question answer") before the query
  image and question; the label is the demonstration's answer only for the same entity and fact.

Everything the world knows is read from the world object where it offers it (`aux_labels`,
`text_questions`, `two_hop_facts`), else from `unike.data.world`'s tables, so a later world works unchanged.
Training renderings use seeds below `EVAL_SEED`, evaluation ones at or above it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import world as W
from .batch import Example
from .build import JOIN

IMAGE_KINDS = ("vqa", "caption", "two_hop")


@dataclass(frozen=True)
class Ask:
    """One question the world can answer: kind ("vqa", "caption", "text", "two_hop"), key (fact, look,
    text relation), the entity shown (None for text-only), the text subject, its paraphrases, the truth."""

    kind: str
    key: str
    entity: object
    subject: str | None
    paraphrases: tuple[str, ...]
    truth: str

    @property
    def topics(self) -> set[str]:
        """What a demonstration must not ask for the query to keep its truth: the facts it depends on."""
        if self.kind == "text":
            return {f"{self.key}:{self.subject}"}
        return {"name", "kind", "habitat", "colour", "caption"} if self.kind == "caption" else {self.key}


class Items:
    """Samplers of training items (`plain`, `format_a`, `format_b`) and evaluation items over one world."""

    def __init__(self, world, held_out: bool = False):
        self.world, self.held_out = world, held_out
        self.facts, self.looks = W.FACTS, W.ATTRIBUTES
        self.text_questions = getattr(world, "text_questions", W.TEXT_QUESTIONS)
        self.two_hop = {f: W.TWO_HOP_QUESTIONS[f] for f in getattr(world, "two_hop_facts", ())}
        self.all_text = world.text_facts()
        self.text_facts: dict[str, list[tuple[str, str]]] = {}
        for rel, subj, ans in self.all_text:
            self.text_facts.setdefault(rel, []).append((subj, ans))

    # ------------------------------------------------------------------ the world's questions
    def render(self, rng: random.Random, e):
        lo, hi = (W.EVAL_SEED, 2**31) if self.held_out else (0, W.EVAL_SEED)
        return self.world.render(e, rng.randrange(lo, hi))

    def aux(self, e) -> dict:
        """Class labels of the vision heads for entity `e` (entity index and each look)."""
        if hasattr(self.world, "aux_labels"):
            return self.world.aux_labels(e)
        return {"entity": e.index, **{a: list(self.world.values(a)).index(e.get(a)) for a in self.looks}}

    def aux_classes(self) -> dict[str, int]:
        if hasattr(self.world, "aux_classes"):
            return self.world.aux_classes()
        return {"entity": len(self.world.entities), **{a: len(self.world.values(a)) for a in self.looks}}

    def ask(self, rng: random.Random, kind: str | None = None, key: str | None = None, entity=None) -> Ask:
        """A question: by default 70% about an image (15% of them looks, 10% two-hop where the world has
        them, else facts), 15% a caption, 15% a text-only fact (each equally often)."""
        if kind is None:
            u = rng.random()
            kind = "vqa" if u < 0.70 else "caption" if u < 0.85 else "text"
            if kind == "vqa" and self.two_hop and rng.random() < 0.10:
                kind = "two_hop"
        e = entity if entity is not None else rng.choice(self.world.entities)
        if kind == "vqa":
            key = key or (rng.choice(self.looks) if rng.random() < 0.15 else rng.choice(self.facts))
            return Ask(kind, key, e, None, W.QUESTIONS[key], e.get(key))
        if kind == "caption":
            return Ask(kind, "caption", e, None, W.CAPTION_PROMPTS, self.world.caption(e))
        if kind == "two_hop":
            key = key or rng.choice(list(self.two_hop))
            return Ask(kind, key, e, None, self.two_hop[key], self.world.two_hop(e, key))
        if key is None:  # every text fact equally often
            key, subj, truth = rng.choice(self.all_text)
        else:
            subj, truth = rng.choice(self.text_facts[key])
        return Ask("text", key, None, subj, tuple(q.format(subj) for q in self.text_questions[key]), truth)

    def alternatives(self, a: Ask) -> list[str]:
        """Answers `a` could be given instead of its truth (counterfactual values)."""
        if a.kind == "vqa":
            vals = self.world.answers(a.key)
        elif a.kind == "caption":
            vals = [self.world.caption(e) for e in self.world.entities]
        elif a.kind == "two_hop":
            vals = [self.world.two_hop(a.entity, a.key, v) for v in self.world.values(a.key)]
        else:
            vals = [ans for _, ans in self.text_facts[a.key]]
        return sorted(set(vals) - {a.truth})

    def example(self, rng: random.Random, a: Ask, question: str | None = None, answer: str | None = None,
                tag: str = "") -> Example:
        image = self.render(rng, a.entity) if a.kind in IMAGE_KINDS else None
        return Example(image, question or rng.choice(a.paraphrases), answer or a.truth,
                       aux=[self.aux(a.entity)] if image is not None else [], tag=tag or f"{a.kind}/{a.key}")

    # ------------------------------------------------------------------ training items
    def plain(self, rng: random.Random) -> Example:
        return self.example(rng, self.ask(rng))

    def distractor(self, rng: random.Random, a: Ask) -> str:
        """A demonstration about another fact (an image question) or another subject (a text fact), with a
        random answer: it must not change the answer to `a`."""
        while True:
            d = self.ask(rng, kind=rng.choice(("vqa", "vqa", "text")))
            # a text fact of the entity shown, or (two-hop) of the value the hop goes through
            about_it = a.entity is not None and d.subject in (
                a.entity.name, a.entity.get(a.key) if a.kind == "two_hop" else None)
            if not (d.topics & a.topics or about_it):
                return f"{rng.choice(d.paraphrases)} {rng.choice([d.truth, *self.alternatives(d)])}"

    def format_a(self, rng: random.Random, a: Ask | None = None, k: int | None = None,
                 counterfactual: bool | None = None, cf_rate: float = 0.4, other_paraphrase: bool = False,
                 tag: str = "") -> Example:
        """k (default 1-4) text demonstrations before the question of `a`; with `counterfactual` (default:
        with probability `cf_rate`) one of them, at a random place, asks `a` with another value, which is
        the label. `other_paraphrase`: the query's paraphrase differs from the demonstration's."""
        a = a or self.ask(rng)
        k = rng.randint(1, 4) if k is None else k
        counterfactual = rng.random() < cf_rate if counterfactual is None else counterfactual
        demos = [self.distractor(rng, a) for _ in range(k - counterfactual)]
        q, answer = rng.randrange(len(a.paraphrases)), a.truth
        if counterfactual:
            p = rng.choice([i for i in range(len(a.paraphrases)) if i != q] if other_paraphrase
                           else range(len(a.paraphrases)))
            answer = rng.choice(self.alternatives(a))
            demos.insert(rng.randint(0, len(demos)), f"{a.paraphrases[p]} {answer}")
        question = JOIN.join(demos + [a.paraphrases[q]])
        return self.example(rng, a, question, answer, tag or f"A/{'cf' if counterfactual else 'keep'}/{a.kind}")

    def format_b(self, rng: random.Random, case: str | None = None, other_paraphrase: bool = False) -> Example:
        """An image demonstration before the query. `case`: "update" (same entity and fact, counterfactual
        answer -> the label), "entity" (another entity, same fact -> the truth), "fact" (same entity,
        another fact -> the truth); by default 3:2:2."""
        case = case or rng.choices(("update", "entity", "fact"), (3, 2, 2))[0]
        a = self.ask(rng, kind="vqa", key=rng.choice(self.facts))
        if case == "entity":
            e = rng.choice([o for o in self.world.entities if o is not a.entity])
            d = self.ask(rng, kind="vqa", key=a.key, entity=e)
            value = rng.choice([v for v in self.alternatives(d) if v != a.truth])
        else:
            d = a if case == "update" else self.ask(rng, "vqa", rng.choice([f for f in self.facts if f != a.key]),
                                                    a.entity)
            value = rng.choice(self.alternatives(d))
        q = rng.randrange(len(a.paraphrases))
        p = rng.choice([i for i in range(len(d.paraphrases)) if i != q]) if other_paraphrase and case != "fact" \
            else rng.randrange(len(d.paraphrases))
        ex = self.example(rng, a, a.paraphrases[q], value if case == "update" else a.truth, f"B/{case}")
        ex.demo = (self.render(rng, d.entity), f"{d.paraphrases[p]} {value}")
        ex.aux = [self.aux(d.entity)] + ex.aux
        return ex

    # ------------------------------------------------------------------ evaluation items
    def in_context(self, n: int, seed: int = 0) -> dict[str, list[Example]]:
        """`n` items per group: format A update / retain (k = 4, the counterfactual queried with another
        paraphrase) on VQA facts and on text-only facts, and format B update / another entity / another fact."""
        rng = random.Random(f"icl-{self.world.seed}-{seed}")
        out: dict[str, list[Example]] = {}
        for name, kind in (("", "vqa"), ("text_", "text")):
            for group, cf in (("update", True), ("retain", False)):
                out[f"a_{name}{group}"] = [
                    self.format_a(rng, self.ask(rng, kind, rng.choice(self.facts) if kind == "vqa" else None), k=4,
                                  counterfactual=cf, other_paraphrase=True) for _ in range(n)]
        for case in ("update", "entity", "fact"):
            out[f"b_{case}"] = [self.format_b(rng, case, other_paraphrase=True) for _ in range(n)]
        return out


class Mix:
    """The stage-2 training mix: weights of plain, format A and format B items (normalised)."""

    def __init__(self, items: Items, plain: float = 0.5, a: float = 0.3, b: float = 0.2, cf_rate: float = 0.4):
        if min(plain, a, b) < 0 or plain + a + b <= 0 or not 0 <= cf_rate <= 1:
            raise ValueError(f"mix weights must be >= 0 with a positive sum and cf_rate in [0, 1]; got plain={plain}, "
                             f"a={a}, b={b}, cf_rate={cf_rate}")
        self.items, self.weights, self.cf_rate = items, (plain, a, b), cf_rate

    def __call__(self, rng: random.Random) -> Example:
        which = rng.choices((0, 1, 2), self.weights)[0]
        if which == 0:
            return self.items.plain(rng)
        return self.items.format_a(rng, cf_rate=self.cf_rate) if which == 1 else self.items.format_b(rng)
