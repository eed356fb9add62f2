"""`SynthWorld`: a small procedural multimodal knowledge world (entities, renderings, facts, questions).

Every entity has a visual identity (shape x colour x pattern, drawn with Pillow under random pose,
background and noise) and facts (name, kind, habitat, diet, country) whose values are shared across
entities and assigned independently of the looks, so no answer can be read off one pixel colour.
Rendering seeds below `EVAL_SEED` are for training; everything this module hands out for evaluation
(`edit_cases`, `triplets`, `export_mmedit`) uses seeds at or above it, so it is held out. The fixed
tables (looks, values, question templates) live in `tables`, the drawing in `render`.

Two versions: 1 (100 entities of one colour; the world the shipped tiny model knows, kept exactly as it
was) and 2 (512 entities, one colour or two-tone "red and blue"; the climate of each habitat as a text
fact; two-hop questions for portability; edit-case lists that can be edited as one sequence).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .case import EditCase, Triplet
from .mmedit import write_mmedit
from .render import COLOURS, draw_creature
from .tables import (
    ATTRIBUTES,
    CAPITALS,
    CAPTION_PROMPTS,
    CLIMATES,
    FACTS,
    HOPS,
    PATTERNS,
    QUESTIONS,
    SHAPES,
    TEXT_QUESTIONS,
    TEXT_QUESTIONS_V2,
    TWO_HOP_QUESTIONS,
    TWO_TONES,
    VALUES,
    VERSIONS,
    Version,
)

__all__ = ["ATTRIBUTES", "CAPITALS", "CAPTION_PROMPTS", "CLIMATES", "COLOURS", "DEFAULT_VERSION", "EVAL_SEED", "FACTS",
           "HOPS", "PATTERNS", "QUESTIONS", "SHAPES", "TEXT_QUESTIONS", "TEXT_QUESTIONS_V2", "TWO_HOP_QUESTIONS",
           "TWO_TONES", "VALUES", "VERSIONS", "Entity", "SynthWorld", "Version"]

EVAL_SEED = 10**6  # rendering seeds >= this are never used in training
DEFAULT_VERSION = 1  # the shipped tiny model knows version 1; set 2 here once a model trained on version 2 ships

TASKS = ("vqa", "caption", "cross", "text")  # a fact, a caption, a list of both, or a text-only fact
WRITES = {"caption": ("name", "kind")}  # the facts an edit changes (a fact edit: that fact)
READS = {"caption": ("name", "kind", "habitat")}  # the facts a question's answer depends on


def _invent_names(n: int, taken: set[str]) -> list[str]:
    """`n` unique invented words not in `taken`; a fixed generator, so names never depend on the world seed."""
    rng = random.Random(1234)
    onsets, vowels, codas = "b d f g k l m n p r s t v z br dr gr kr pl st tr".split(), "a e i o u".split(), \
        ["", "", "n", "r", "l", "s", "x"]
    taken, names = set(taken), []
    while len(names) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3))))
        word += rng.choice(codas)
        if word not in taken and 4 <= len(word) <= 9:
            taken.add(word)
            names.append(word)
    return names


@dataclass(frozen=True)
class Entity:
    """One creature: its looks (shape, colour, pattern) and its facts (name, kind, habitat, diet, country)."""

    index: int
    shape: str
    colour: str
    pattern: str
    facts: dict

    @property
    def name(self) -> str:
        return self.facts["name"]

    def get(self, key: str) -> str:
        """Answer to a fact or an attribute."""
        return self.facts[key] if key in self.facts else getattr(self, key)


class SynthWorld:
    """A seeded world of `n_entities` creatures (distinct looks) with facts, questions, captions and text facts.

    `version` 1 (the default, what the shipped tiny model knows) or 2 (see the module docstring);
    `n_entities` defaults to 100 (version 1) or 512 (version 2).
    """

    def __init__(self, seed: int = 0, n_entities: int | None = None, version: int | None = None):
        version = DEFAULT_VERSION if version is None else version
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
        self.version, self.seed, spec = version, seed, VERSIONS[version]
        self.colours, self.text_questions, self.two_hop_facts = spec.colours, spec.text_questions, spec.two_hop
        n_entities = spec.n_entities if n_entities is None else n_entities
        looks = [(s, c, p) for s in SHAPES for c in self.colours for p in PATTERNS]
        if not 8 <= n_entities <= len(looks):
            raise ValueError(f"n_entities must be in [8, {len(looks)}] in version {version}, got {n_entities}")
        rng = random.Random(seed)
        rng.shuffle(looks)
        names = _invent_names(n_entities, self._words())
        rng.shuffle(names)
        values = {}
        for fact, vocab in VALUES.items():  # balanced: every value used about equally, independent of looks
            pool = [vocab[i % len(vocab)] for i in range(n_entities)]
            rng.shuffle(pool)
            values[fact] = pool
        self.entities = [Entity(i, *looks[i], facts={"name": names[i], **{f: values[f][i] for f in VALUES}})
                         for i in range(n_entities)]
        self.by_name = {e.name: e for e in self.entities}

    # ----------------------------------------------------------------------------- knowledge
    def values(self, key: str) -> tuple[str, ...]:
        """The answer vocabulary of a fact or attribute (names: this world's names)."""
        if key == "name":
            return tuple(e.name for e in self.entities)
        return {"colour": self.colours, "shape": SHAPES, "pattern": PATTERNS, **VALUES}[key]

    def answers(self, key: str) -> list[str]:
        """Possible answers of `key` in this world (names included)."""
        return list(self.values(key))

    def aux_labels(self, entity) -> dict[str, int]:
        """Class indices of an entity for classifier heads on the vision tower: entity and each attribute."""
        e = self.entity(entity)
        return {"entity": e.index, **{a: self.values(a).index(e.get(a)) for a in ATTRIBUTES}}

    def aux_classes(self) -> dict[str, int]:
        """Number of classes of each `aux_labels` head."""
        return {"entity": len(self.entities), **{a: len(self.values(a)) for a in ATTRIBUTES}}

    @staticmethod
    def caption(entity: Entity) -> str:
        """A short caption built from the entity's name, colour, kind and habitat."""
        return f"{entity.name} the {entity.colour} {entity.facts['kind']} of the {entity.facts['habitat']}"

    def text_facts(self) -> list[tuple[str, str, str]]:
        """Every text-only fact as (relation, subject, answer): capitals of countries, diet by name and
        (version 2) the climate of each habitat."""
        climates = [("climate", h, c) for h, c in CLIMATES.items()] if "climate" in self.text_questions else []
        return [("capital", c, cap) for c, cap in CAPITALS.items()] + \
            [("diet_by_name", e.name, e.facts["diet"]) for e in self.entities] + climates

    def text_question(self, relation: str, subject: str, paraphrase: int = 0) -> str:
        return self.text_questions[relation][paraphrase].format(subject)

    def two_hop(self, entity, fact: str, value: str | None = None) -> str:
        """The answer to the two-hop question about `fact` (`TWO_HOP_QUESTIONS`): the capital of the entity's
        country, the climate of its habitat; of `value` instead of the entity's own, if given."""
        if fact not in self.two_hop_facts:
            raise ValueError(f"version {self.version} has two-hop questions about {list(self.two_hop_facts)} only, "
                             f"not {fact!r}" + ("; use SynthWorld(version=2)" if self.version == 1 else ""))
        return HOPS[fact][self.entity(entity).facts[fact] if value is None else value]

    def _words(self) -> set[str]:
        """Every word of the world's texts but the names (a template's "{}" included)."""
        texts = [q for qs in [*QUESTIONS.values(), CAPTION_PROMPTS, *self.text_questions.values()] for q in qs]
        texts += [q for f in self.two_hop_facts for q in TWO_HOP_QUESTIONS[f]]
        texts += [" ".join(HOPS[f].values()) for f in self.two_hop_facts]
        texts += [" ".join(v) for v in (SHAPES, self.colours, PATTERNS, CAPITALS, CAPITALS.values(), *VALUES.values())]
        return {w for t in texts for w in t.split()}

    def vocabulary(self) -> list[str]:
        """Every word this world can emit in prompts, answers and captions (sorted)."""
        return sorted((self._words() - {"{}"}) | {e.name for e in self.entities})

    # ----------------------------------------------------------------------------- rendering
    def entity(self, entity) -> Entity:
        return entity if isinstance(entity, Entity) else self.entities[int(entity)]

    def render(self, entity, seed: int) -> Image.Image:
        """A 64x64 RGB picture of `entity` (Entity or index) under a random pose/background/noise from `seed`."""
        e = self.entity(entity)
        return draw_creature(e.shape, tuple(e.colour.split(" and ")), e.pattern, [self.seed, e.index, int(seed)])

    # ----------------------------------------------------------------------------- edit cases
    def _other(self, rng: random.Random, e: Entity, key: str | None = None, avoid=()) -> Entity:
        """Another entity; if `key` is given, one whose `key` answer is not in `avoid`."""
        while True:
            o = rng.choice(self.entities)
            if o is not e and (key is None or o.get(key) not in avoid):
                return o

    def _seed(self, rng: random.Random) -> int:
        return rng.randrange(EVAL_SEED, 2**31)

    def max_cases(self, task: str = "vqa", sequence_safe: bool | None = None) -> int | None:
        """The most cases one sequence-safe `edit_cases(task, n)` list can hold: two per entity for VQA (at
        most half the entities per fact, one fact per entity left for CI-Loc), every entity but one for
        captions (one left for RI-Loc), half the entities for a cross-task list (so every RI and locality
        probe still finds an entity no edit touched); None for the version-1 lists, which repeat (entity,
        fact) pairs past the pool's end; half the text facts for text-only cases (the rest for T-Loc).
        `sequence_safe`: as in `edit_cases`."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if not (self.version >= 2 if sequence_safe is None else sequence_safe):
            return None
        n = len(self.entities)
        return {"vqa": n * (len(FACTS) - 1) // 2, "caption": n - 1, "cross": n // 2,
                "text": len(self.text_facts()) // 2}[task]

    def edit_cases(self, task: str = "vqa", n: int = 100, seed: int = 0, sequence_safe: bool | None = None,
                   vqa: int | None = None) -> list[EditCase]:
        """`n` held-out edit cases with every probe filled; task "vqa" (a fact), "caption", "cross": `vqa`
        VQA cases (default n // 2), then the captions, or "text" (a text-only fact, `_text_cases`). A
        sequence-safe cross list is safe across the two tasks too: no entity is edited by both, and no probe
        reads a fact that any case of the list writes.

        Sequence-safe lists (version 2's default; `sequence_safe=True` in version 1 too) can be edited as
        one sequence: no two cases edit the same entity fact, and no probe asks about a fact another case
        edits (a caption edit renames its entity and changes its kind); in version 2 a country or habitat
        edit carries a two-hop probe. Version 1's default lists are the ones the shipped tiny model was
        measured on: pairs repeat past the pool's end and probes may touch other cases' facts, so a long
        sequence scores some probes against a fact that another edit of it changed.
        """
        sequence_safe = self.version >= 2 if sequence_safe is None else sequence_safe
        limit = self.max_cases(task, sequence_safe)
        if limit is not None and not 0 <= n <= limit:
            raise ValueError(f"n = {n}, but this world holds at most {limit} sequence-safe {task} cases; ask for "
                             f"fewer or build a bigger world (SynthWorld(version=2, n_entities=...), at most "
                             f"{len(SHAPES) * len(self.colours) * len(PATTERNS)} entities)")
        vqa = n // 2 if vqa is None else vqa
        if task == "cross" and not 0 <= vqa <= n:
            raise ValueError(f"vqa = {vqa}: a cross list of n = {n} holds between 0 and {n} VQA cases")
        if task == "cross" and not sequence_safe:    # the two lists as they are drawn alone
            return self.edit_cases("vqa", vqa, seed, False) + self.edit_cases("caption", n - vqa, seed, False)
        rng = random.Random(f"edit-{task}-{self.seed}-{seed}")
        if task == "text":
            return self._text_cases(rng, n, sequence_safe)
        return self._safe_cases(rng, task, n, vqa) if sequence_safe else self._cases_v1(rng, task, n)

    def _text_cases(self, rng: random.Random, n: int, safe: bool) -> list[EditCase]:
        """Text-only cases (ZsRE-like; no image): a text fact asked in one wording, edited to another value of
        its relation; T-Gen another wording; T-Loc the same relation about another subject; M-Loc a question
        about a rendered entity. In a sequence-safe list no two cases edit one fact, T-Loc asks about facts no
        case edits, and M-Loc shows entities whose name no case's subject is; otherwise facts repeat past
        the pool's end and probes may touch edited facts."""
        facts, values = self.text_facts(), {}
        for relation, _, answer in facts:
            values.setdefault(relation, set()).add(answer)
        order: list = []
        while len(order) < n:
            order += rng.sample(facts, len(facts))
        edits = order[:n]
        spare = [f for f in facts if f not in edits] if safe else facts
        names = {subject for _, subject, _ in edits} if safe else set()
        shown = [e for e in self.entities if e.name not in names]
        cases = []
        for relation, subject, truth in edits:
            i, j = rng.sample(range(3), 2)
            others = [f for f in spare if f[0] == relation and f[1] != subject] or [f for f in spare if f[1] != subject]
            _, other, loc_answer = rng.choice(others)
            m, fact = rng.choice(shown), rng.choice(FACTS)
            cases.append(EditCase(
                image=None, prompt=self.text_question(relation, subject, i), ground_truth=truth,
                target=rng.choice(sorted(values[relation] - {truth})),
                rephrase_prompt=self.text_question(relation, subject, j),
                loc_prompt=self.text_question(relation, other, rng.randrange(3)), loc_answer=loc_answer,
                mloc_image=self.render(m, self._seed(rng)), mloc_prompt=rng.choice(QUESTIONS[fact]),
                mloc_answer=m.get(fact), task="text", meta={"relation": relation, "subject": subject,
                                                            "mloc_entity": m.index}))
        return cases

    def _case(self, rng: random.Random, e: Entity, ri: Entity, mloc: Entity, meta: dict, **fields) -> EditCase:
        """Draw the four rendering seeds and build the case."""
        seeds = [self._seed(rng) for _ in range(4)]
        return EditCase(image=self.render(e, seeds[0]), rephrase_image=self.render(e, seeds[1]),
                        mloc_image=self.render(mloc, seeds[2]), ri_image=self.render(ri, seeds[3]), **fields,
                        meta={"entity": e.index, **meta, "mloc_entity": mloc.index, "ri_entity": ri.index,
                              "render_seeds": seeds})

    def _cases_v1(self, rng: random.Random, task: str, n: int) -> list[EditCase]:
        pool = [(e, f) for e in self.entities for f in FACTS] if task == "vqa" else [(e, "caption") for e in
                                                                                      self.entities]
        order: list = []
        while len(order) < n:  # distinct (entity, fact) pairs as long as the pool lasts
            chunk = pool[:]
            rng.shuffle(chunk)
            order += chunk
        cases = []
        for e, key in order[:n]:
            if task == "vqa":
                i, j = rng.sample(range(3), 2)
                prompt, rephrase = QUESTIONS[key][i], QUESTIONS[key][j]
                truth = e.get(key)
                target = rng.choice([v for v in self.answers(key) if v != truth])
                ri = self._other(rng, e, key, avoid=(truth, target))
                ri_answer = ri.get(key)
            else:
                prompt, rephrase = rng.sample(CAPTION_PROMPTS, 2)
                truth = self.caption(e)
                o1, o2 = self._other(rng, e), self._other(rng, e, "kind", avoid=(e.facts["kind"],))
                target = f"{o1.name} the {e.colour} {o2.facts['kind']} of the {e.facts['habitat']}"
                ri = self._other(rng, e, "name", avoid=(o1.name,))
                ri_answer = self.caption(ri)
            facts = [t for t in self.text_facts() if t[1] != e.name]
            rel, subj, loc_answer = rng.choice(facts)
            loc_prompt = self.text_question(rel, subj, rng.randrange(3))
            mloc = self._other(rng, e)
            fact = rng.choice(FACTS)
            mloc_prompt, mloc_answer = rng.choice(QUESTIONS[fact]), mloc.get(fact)
            # same image, a fact the edit leaves alone (a caption edit renames the entity and changes its kind);
            # a fact in WRITES is swapped for another one drawn from a side stream
            fact = rng.choice([f for f in FACTS if f != key])
            if fact in WRITES.get(key, ()):
                fact = random.Random(f"{self.seed}-{e.index}-{fact}").choice([f for f in FACTS
                                                                              if f not in WRITES[key]])
            ci_prompt, ci_answer = rng.choice(QUESTIONS[fact]), e.get(fact)
            cases.append(self._case(
                rng, e, ri, mloc, {"fact": key}, prompt=prompt, target=target, ground_truth=truth,
                rephrase_prompt=rephrase, loc_prompt=loc_prompt, loc_answer=loc_answer, mloc_prompt=mloc_prompt,
                mloc_answer=mloc_answer, ci_prompt=ci_prompt, ci_answer=ci_answer, ri_answer=ri_answer, task=task))
        return cases

    def _pick_edits(self, rng: random.Random, task: str, n: int, vqa: int = 0) -> list[tuple[Entity, str]]:
        """`n` distinct (entity, key) edits: captions of `n` entities; VQA facts, at most half the entities per
        fact and one fact left per entity; cross: `vqa` facts of entities that no caption edit renames."""
        if task == "caption":
            return [(e, "caption") for e in rng.sample(self.entities, n)]
        if task == "vqa":
            return self._pick_facts(rng, self.entities, n)
        captions = [(e, "caption") for e in rng.sample(self.entities, n - vqa)]
        renamed = {e.index for e, _ in captions}
        return self._pick_facts(rng, [e for e in self.entities if e.index not in renamed], vqa) + captions

    @staticmethod
    def _pick_facts(rng: random.Random, entities: list[Entity], n: int) -> list[tuple[Entity, str]]:
        pool = [(e, f) for e in entities for f in FACTS]
        rng.shuffle(pool)
        per_entity, per_fact, picked = dict.fromkeys((e.index for e in entities), 0), dict.fromkeys(FACTS, 0), []
        # greedy under both caps; it reaches max_cases: if a fact ends below its cap, each entity it skipped
        # already had 4 edits, and over half the entities were skipped: at least 2 edits per entity
        for e, f in pool:
            if len(picked) == n:
                break
            if per_entity[e.index] < len(FACTS) - 1 and per_fact[f] < len(entities) // 2:
                per_entity[e.index] += 1
                per_fact[f] += 1
                picked.append((e, f))
        return picked

    def _safe_cases(self, rng: random.Random, task: str, n: int, vqa: int = 0) -> list[EditCase]:
        edits = self._pick_edits(rng, task, n, vqa)
        edited = {(e.index, f) for e, key in edits for f in WRITES.get(key, (key,))}

        def safe(o: Entity, key: str) -> bool:  # no fact this question about `o` reads is edited in the list
            return not any((o.index, f) in edited for f in READS.get(key, (key,)))

        unedited = {key: [o for o in self.entities if safe(o, key)] for key in {k for _, k in edits}}

        firsts, new_names = [], set()  # the edits and their RI probes first: the other probes avoid new names
        for e, key in edits:
            if key != "caption":
                i, j = rng.sample(range(3), 2)
                prompt, rephrase, truth = QUESTIONS[key][i], QUESTIONS[key][j], e.get(key)
                target = rng.choice([v for v in self.answers(key) if v != truth])
                ri = rng.choice([o for o in unedited[key] if o.get(key) not in (truth, target)])
                meta, ri_answer, kind = {"fact": key}, ri.get(key), "vqa"
                new_names |= {target} if key == "name" else set()
            else:
                prompt, rephrase = rng.sample(CAPTION_PROMPTS, 2)
                truth = self.caption(e)
                ri = rng.choice(unedited[key])
                o1 = rng.choice([o for o in self.entities if o is not e and o is not ri])
                o2 = self._other(rng, e, "kind", avoid=(e.facts["kind"],))
                target = f"{o1.name} the {e.colour} {o2.facts['kind']} of the {e.facts['habitat']}"
                meta, ri_answer, kind = ({"fact": key, "name_from": o1.index, "kind_from": o2.index},
                                         self.caption(ri), "caption")
                new_names.add(o1.name)
            firsts.append((e, key, ri, meta, dict(prompt=prompt, rephrase_prompt=rephrase, ground_truth=truth,
                                                  target=target, ri_answer=ri_answer, task=kind)))
        text_facts = self.text_facts()
        cases = []
        for e, key, ri, meta, fields in firsts:
            while True:  # text locality: capitals and climates are never edited; diet by name may be
                rel, subj, loc_answer = rng.choice(text_facts)
                y = self.by_name.get(subj) if rel == "diet_by_name" else None
                if y is None or (y is not e and safe(y, "diet") and safe(y, "name") and subj not in new_names):
                    break
            while True:
                mloc, mfact = rng.choice(self.entities), rng.choice(FACTS)
                if mloc is not e and safe(mloc, mfact):
                    break
            cfact = rng.choice([f for f in FACTS if f not in WRITES.get(key, (key,)) and safe(e, f)])
            port = {}
            if key in self.two_hop_facts:
                port = dict(port_prompt=rng.choice(TWO_HOP_QUESTIONS[key]),
                            port_answer=self.two_hop(e, key, fields["target"]))
            cases.append(self._case(
                rng, e, ri, mloc, {**meta, "edits": list(WRITES.get(key, (key,))), "mloc_fact": mfact,
                                   "ci_fact": cfact, "loc": [rel, subj], "port_fact": key if port else None},
                loc_prompt=self.text_question(rel, subj, rng.randrange(3)), loc_answer=loc_answer,
                mloc_prompt=rng.choice(QUESTIONS[mfact]), mloc_answer=mloc.get(mfact),
                ci_prompt=rng.choice(QUESTIONS[cfact]), ci_answer=e.get(cfact), **fields, **port))
        return cases

    # ----------------------------------------------------------------------------- triplets
    def triplets(self, n: int = 2000, seed: int = 0, model=None, processor=None) -> list[Triplet]:
        """`n` held-out (image, question, right, wrong) triplets over every kind of question the world asks:
        facts and attributes of a rendered entity, captions, text-only facts (image None) and (version 2)
        two-hop questions.

        The wrong answer is the model's own greedy answer where a model is given and it errs, else a
        distractor from the same fact's vocabulary.
        """
        rng = random.Random(f"triplets-{self.seed}-{seed}")
        pool = [("image", e, k, q) for e in self.entities for k in FACTS + ATTRIBUTES for q in range(3)]
        pool += [("caption", e, "caption", q) for e in self.entities for q in range(len(CAPTION_PROMPTS))]
        pool += [("text", fact, None, q) for fact in self.text_facts() for q in range(3)]
        pool += [("two_hop", e, f, q) for e in self.entities for f in self.two_hop_facts for q in range(3)]
        order: list = []
        while len(order) < n:
            chunk = pool[:]
            rng.shuffle(chunk)
            order += chunk
        out = []
        for kind, item, key, q in order[:n]:
            if kind == "text":
                rel, subj, right = item
                image, question = None, self.text_question(rel, subj, q)
                wrong = rng.choice(sorted({a for r, _, a in self.text_facts() if r == rel} - {right}))
            elif kind == "two_hop":
                image, question, right = self.render(item, self._seed(rng)), TWO_HOP_QUESTIONS[key][q], \
                    self.two_hop(item, key)
                wrong = rng.choice(sorted(set(HOPS[key].values()) - {right}))
            elif kind == "caption":
                image, question, right = self.render(item, self._seed(rng)), CAPTION_PROMPTS[q], self.caption(item)
                wrong = self.caption(self._other(rng, item))
            else:
                image, question, right = self.render(item, self._seed(rng)), QUESTIONS[key][q], item.get(key)
                wrong = rng.choice([v for v in self.answers(key) if v != right])
            if model is not None:
                from ..answer import answer

                said = answer(model, processor, image, question)
                if said and said != right:
                    wrong = said
            out.append(Triplet(image=image, question=question, right=right, wrong=wrong))
        return out

    # ----------------------------------------------------------------------------- MMEdit export
    def export_mmedit(self, directory, task: str = "vqa", n: int = 100, seed: int = 0) -> Path:
        """Write `n` edit cases as an MMEdit (E-VQA / E-IC) JSON file plus PNGs; return the JSON path.

        Images lie under `directory/images/`; paths in the JSON are relative to `directory`. The extra keys
        `ci`, `ci_ans`, `ri_image`, `ri_ans` carry the harder locality probes and `port`, `port_ans` the
        two-hop probe (empty where a case has none; real MMEdit files lack them).
        """
        return write_mmedit(self.edit_cases(task, n, seed), directory, f"{task}_{seed}", f"{task}_eval.json")
