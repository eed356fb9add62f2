"""`SynthWorld`: a small procedural multimodal knowledge world (entities, renderings, facts, questions).

Every entity has a visual identity (shape x colour x pattern, drawn with Pillow under random pose,
background and noise) and facts (name, kind, habitat, diet, country) whose values are shared across
entities and assigned independently of the looks, so no answer can be read off one pixel colour.
Rendering seeds below `EVAL_SEED` are for training; everything this module hands out for evaluation
(`edit_cases`, `triplets`, `export_mmedit`) uses seeds at or above it, so it is held out.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .case import EditCase, Triplet

EVAL_SEED = 10**6  # rendering seeds >= this are never used in training

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "crescent", "arrow")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (50, 180, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (150, 60, 200), "pink": (245, 120, 190),
}
PATTERNS = ("solid", "stripes", "dots", "ring")
VALUES = {
    "kind": ("dragon", "beetle", "spirit", "golem", "fairy", "serpent", "moth", "troll", "phoenix", "goblin"),
    "habitat": ("forest", "desert", "ocean", "mountain", "swamp", "cave", "river", "tundra", "jungle", "volcano"),
    "diet": ("berries", "fish", "honey", "mushrooms", "seeds", "insects", "moss", "crystals"),
    "country": ("zarnia", "velmora", "quentor", "olbrith", "drosk", "pellavia", "yundor", "kastrel",
                "morvane", "theskar"),
}
CAPITALS = dict(zip(VALUES["country"], ("aldrun", "bexmoor", "corvale", "dunhelm", "estrid", "falkor",
                                        "grenby", "holmvik", "istra", "jorvel")))
FACTS = ("name", "kind", "habitat", "diet", "country")
ATTRIBUTES = ("colour", "shape", "pattern")
QUESTIONS = {
    "name": ("what is the name of this creature ?", "what is this creature called ?",
             "who is shown in the picture ?"),
    "kind": ("what kind of creature is this ?", "what type of creature is shown here ?",
             "which species does this creature belong to ?"),
    "habitat": ("where does this creature live ?", "what is the habitat of this creature ?",
                "in which place can this creature be found ?"),
    "diet": ("what does this creature eat ?", "what is the diet of this creature ?",
             "what food does this creature like ?"),
    "country": ("which country is this creature from ?", "where does this creature come from ?",
                "what is the home country of this creature ?"),
    "colour": ("what colour is this creature ?", "what is the colour of the creature ?",
               "which colour does this creature have ?"),
    "shape": ("what shape is this creature ?", "what is the shape of the creature ?",
              "which shape does this creature have ?"),
    "pattern": ("what pattern does this creature have ?", "what is the pattern on the creature ?",
                "which pattern is drawn on this creature ?"),
}
CAPTION_PROMPTS = ("describe the image .", "write a caption for this picture .", "what does this image show ?",
                   "give a short description of the picture .")
TEXT_QUESTIONS = {  # text-only facts: no image
    "capital": ("what is the capital of {} ?", "which city is the capital of {} ?", "name the capital city of {} ."),
    "diet_by_name": ("what does {} eat ?", "what is the diet of {} ?", "what food does {} like ?"),
}


def _invent_names(n: int) -> list[str]:
    """`n` unique invented words; a fixed generator, so the first 100 never depend on the world seed."""
    rng = random.Random(1234)
    onsets, vowels, codas = "b d f g k l m n p r s t v z br dr gr kr pl st tr".split(), "a e i o u".split(), \
        ["", "", "n", "r", "l", "s", "x"]
    taken = {w for text in [*QUESTIONS.values(), CAPTION_PROMPTS, *TEXT_QUESTIONS.values()] for q in text
             for w in q.split()} | set(SHAPES) | set(COLOURS) | set(PATTERNS) | set(CAPITALS.values()) \
        | {v for vs in VALUES.values() for v in vs}
    names: list[str] = []
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


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        return [(-.78, -.78), (.78, -.78), (.78, .78), (-.78, .78)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [((1 if k % 2 == 0 else .42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1 if k % 2 == 0 else .42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = .3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "diamond":
        return [(0, -1), (.55, 0), (0, 1), (-.55, 0)]
    if shape == "arrow":
        return [(-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22), (-1, .22)]
    raise ValueError(shape)


class SynthWorld:
    """A seeded world of `n_entities` creatures (distinct looks) with facts, questions, captions and text facts."""

    def __init__(self, seed: int = 0, n_entities: int = 100):
        if not 8 <= n_entities <= len(SHAPES) * len(COLOURS) * len(PATTERNS):
            raise ValueError(f"n_entities must be in [8, 256], got {n_entities}")
        self.seed = seed
        rng = random.Random(seed)
        looks = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
        rng.shuffle(looks)
        names = _invent_names(n_entities)
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
    @staticmethod
    def values(key: str) -> tuple[str, ...]:
        """The answer vocabulary of a fact or attribute (names: this world's names)."""
        return {"colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS, **VALUES}[key]

    def answers(self, key: str) -> list[str]:
        """Possible answers of `key` in this world (names included)."""
        return [e.name for e in self.entities] if key == "name" else list(self.values(key))

    @staticmethod
    def caption(entity: Entity) -> str:
        """A short caption built from the entity's name, colour, kind and habitat."""
        return f"{entity.name} the {entity.colour} {entity.facts['kind']} of the {entity.facts['habitat']}"

    def text_facts(self) -> list[tuple[str, str, str]]:
        """Every text-only fact as (relation, subject, answer): capitals of countries, diet by name."""
        return [("capital", c, cap) for c, cap in CAPITALS.items()] + \
            [("diet_by_name", e.name, e.facts["diet"]) for e in self.entities]

    @staticmethod
    def text_question(relation: str, subject: str, paraphrase: int = 0) -> str:
        return TEXT_QUESTIONS[relation][paraphrase].format(subject)

    def vocabulary(self) -> list[str]:
        """Every word this world can emit in prompts, answers and captions (sorted)."""
        texts = [q for qs in [*QUESTIONS.values(), CAPTION_PROMPTS] for q in qs]
        texts += [q.format("") for qs in TEXT_QUESTIONS.values() for q in qs]
        texts += [self.caption(e) for e in self.entities] + [" ".join(e.facts.values()) for e in self.entities]
        texts += [" ".join(v) for v in (SHAPES, COLOURS, PATTERNS, CAPITALS, CAPITALS.values(), *VALUES.values())]
        return sorted({w for t in texts for w in t.split()})

    # ----------------------------------------------------------------------------- rendering
    def entity(self, entity) -> Entity:
        return entity if isinstance(entity, Entity) else self.entities[int(entity)]

    def render(self, entity, seed: int) -> Image.Image:
        """A 64x64 RGB picture of `entity` (Entity or index) under a random pose/background/noise from `seed`."""
        e = self.entity(entity)
        rng = np.random.default_rng([self.seed, e.index, int(seed)])
        S = 128  # drawn at 2x, reduced to 64 for anti-aliasing
        r = S / 2 * rng.uniform(0.6, 0.9)  # object scale: radius 0.6-0.9 of half the picture, fully inside
        cx, cy = (rng.uniform(r * 1.1, S - r * 1.1) for _ in range(2))
        theta = rng.uniform(0, 2 * math.pi)
        mask = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(mask)
        rc = r * .9
        if e.shape in ("circle", "crescent"):
            draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=255)
            if e.shape == "crescent":
                ox, oy, ri = cx + .5 * r * math.cos(theta), cy + .5 * r * math.sin(theta), r * .75
                draw.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)
        else:
            c, s = math.cos(theta), math.sin(theta)
            points = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _unit_polygon(e.shape)]
            draw.polygon(points, fill=255)
        pat = Image.new("L", (S, S), 0)
        pdraw = ImageDraw.Draw(pat)
        if e.pattern == "stripes":  # bands across the shape, turned with it
            a, period = theta + math.pi / 4, r * .45
            u, v = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
            for k in range(-6, 7):
                o0, o1 = k * period, k * period + period * .35
                pdraw.polygon([(cx + u[0] * o + v[0] * t, cy + u[1] * o + v[1] * t)
                               for o, t in ((o0, -2 * r), (o1, -2 * r), (o1, 2 * r), (o0, 2 * r))], fill=255)
        elif e.pattern == "dots":  # a grid of dots, turned with the shape
            p, rd = r * .5, r * .5 * .24
            c, s = math.cos(theta), math.sin(theta)
            for i in range(-4, 5):
                for j in range(-4, 5):
                    x, y = cx + p * (i + .5) * c - p * (j + .5) * s, cy + p * (i + .5) * s + p * (j + .5) * c
                    pdraw.ellipse((x - rd, y - rd, x + rd, y + rd), fill=255)
        elif e.pattern == "ring":  # a dark border along the outline
            w = max(2, int(r * .14))
            if e.shape in ("circle", "crescent"):
                pdraw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), outline=255, width=w)
                if e.shape == "crescent":
                    pdraw.ellipse((ox - ri - w, oy - ri - w, ox + ri + w, oy + ri + w), outline=255, width=w)
            else:
                pdraw.polygon(points, outline=255, width=w)
        pat = ImageChops.multiply(pat, mask)
        # background: a gradient between two muted colours in a random direction
        c0, c1 = (rng.uniform(70, 190) + rng.uniform(-25, 25, 3) for _ in range(2))
        a = rng.uniform(0, 2 * math.pi)
        g = np.linspace(-1, 1, 8, dtype=np.float32)
        t = ((g[None, :] * math.cos(a) + g[:, None] * math.sin(a)) * .35 + .5)[..., None]
        bg = Image.fromarray((c0 * (1 - t) + c1 * t).clip(0, 255).astype(np.uint8), "RGB").resize((S, S),
                                                                                                   Image.BILINEAR)
        fg = tuple(int(v) for v in np.clip(np.array(COLOURS[e.colour]) + rng.uniform(-15, 15, 3), 0, 255))
        dark = (int(25 + rng.uniform(0, 15)),) * 3
        img = Image.composite(Image.new("RGB", (S, S), fg), bg, mask)
        img = Image.composite(Image.new("RGB", (S, S), dark), img, pat).reduce(2)
        img = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (64, 64, 3)).astype(np.float32)
        return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")

    # ----------------------------------------------------------------------------- edit cases
    def _other(self, rng: random.Random, e: Entity, key: str | None = None, avoid=()) -> Entity:
        """Another entity; if `key` is given, one whose `key` answer is not in `avoid`."""
        while True:
            o = rng.choice(self.entities)
            if o is not e and (key is None or o.get(key) not in avoid):
                return o

    def _seed(self, rng: random.Random) -> int:
        return rng.randrange(EVAL_SEED, 2**31)

    def _probe(self, rng: random.Random, e: Entity, exclude: str | None = None,
               changed: tuple[str, ...] = ()) -> tuple[str, str]:
        """A question about a fact of `e` other than `exclude`; a fact in `changed` is swapped for another
        one drawn from a side stream, so that the cases' random stream stays the same."""
        fact = rng.choice([f for f in FACTS if f != exclude])
        if fact in changed:
            fact = random.Random(f"{self.seed}-{e.index}-{fact}").choice([f for f in FACTS if f not in changed])
        return rng.choice(QUESTIONS[fact]), e.get(fact)

    def _text_probe(self, rng: random.Random, avoid: Entity) -> tuple[str, str]:
        facts = [t for t in self.text_facts() if t[1] != avoid.name]
        rel, subj, ans = rng.choice(facts)
        return self.text_question(rel, subj, rng.randrange(3)), ans

    def edit_cases(self, task: str = "vqa", n: int = 100, seed: int = 0) -> list[EditCase]:
        """`n` held-out edit cases with every probe filled; task "vqa" (a fact) or "caption"."""
        if task not in ("vqa", "caption"):
            raise ValueError(f"task must be 'vqa' or 'caption', got {task!r}")
        rng = random.Random(f"edit-{task}-{self.seed}-{seed}")
        if task == "vqa":
            pool = [(e, f) for e in self.entities for f in FACTS]
        else:
            pool = [(e, "caption") for e in self.entities]
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
            loc_prompt, loc_answer = self._text_probe(rng, e)
            mloc = self._other(rng, e)
            mloc_prompt, mloc_answer = self._probe(rng, mloc)
            # same image, a fact the edit leaves alone (a caption edit renames the entity and changes its kind)
            ci_prompt, ci_answer = self._probe(rng, e, exclude=key, changed=("name", "kind") if task == "caption" else ())
            seeds = [self._seed(rng) for _ in range(4)]
            cases.append(EditCase(
                image=self.render(e, seeds[0]), prompt=prompt, target=target, ground_truth=truth,
                rephrase_prompt=rephrase, rephrase_image=self.render(e, seeds[1]),
                loc_prompt=loc_prompt, loc_answer=loc_answer,
                mloc_image=self.render(mloc, seeds[2]), mloc_prompt=mloc_prompt, mloc_answer=mloc_answer,
                ci_prompt=ci_prompt, ci_answer=ci_answer, ri_image=self.render(ri, seeds[3]), ri_answer=ri_answer,
                task=task,
                meta={"entity": e.index, "fact": key, "mloc_entity": mloc.index, "ri_entity": ri.index,
                      "render_seeds": seeds}))
        return cases

    # ----------------------------------------------------------------------------- triplets
    def triplets(self, n: int = 2000, seed: int = 0, model=None, processor=None) -> list[Triplet]:
        """`n` held-out (image, question, right, wrong) triplets over every kind of question the world asks:
        facts and attributes of a rendered entity, captions, and text-only facts (image None).

        The wrong answer is the model's own greedy answer where a model is given and it errs, else a
        distractor from the same fact's vocabulary.
        """
        rng = random.Random(f"triplets-{self.seed}-{seed}")
        pool = [("image", e, k, q) for e in self.entities for k in FACTS + ATTRIBUTES for q in range(3)]
        pool += [("caption", e, "caption", q) for e in self.entities for q in range(len(CAPTION_PROMPTS))]
        pool += [("text", fact, None, q) for fact in self.text_facts() for q in range(3)]
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
        `ci`, `ci_ans`, `ri_image`, `ri_ans` carry the harder locality probes (real MMEdit files lack them).
        """
        root = Path(directory)
        (root / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for k, c in enumerate(self.edit_cases(task, n, seed)):
            paths = {}
            for field in ("image", "rephrase_image", "mloc_image", "ri_image"):
                rel = f"images/{task}_{seed}_{k:05d}_{field}.png"
                getattr(c, field).save(root / rel)
                paths[field] = rel
            records.append({
                "src": c.prompt, "pred": c.ground_truth, "alt": c.target, "rephrase": c.rephrase_prompt,
                "image": paths["image"], "image_rephrase": paths["rephrase_image"],
                "loc": c.loc_prompt, "loc_ans": c.loc_answer,
                "m_loc": paths["mloc_image"], "m_loc_q": c.mloc_prompt, "m_loc_a": c.mloc_answer,
                "ci": c.ci_prompt, "ci_ans": c.ci_answer, "ri_image": paths["ri_image"], "ri_ans": c.ri_answer,
            })
        path = root / f"{task}_eval.json"
        path.write_text(json.dumps(records, indent=1))
        return path
