"""SynthWorld: determinism, renderings, edit cases, triplets, vocabulary, MMEdit round trip."""
import hashlib
import json
from collections import defaultdict
from dataclasses import fields

import numpy as np
import pytest

from unike.data.case import EditCase, load_image
from unike.data.mmedit import load_mmedit
from unike.data.world import (CAPTION_PROMPTS, COLOURS, EVAL_SEED, FACTS, QUESTIONS, TEXT_QUESTIONS, SynthWorld)


@pytest.fixture(scope="module")
def world():
    return SynthWorld(seed=0)


@pytest.fixture(scope="module")
def vqa_cases(world):
    return world.edit_cases("vqa", n=40, seed=3)


@pytest.fixture(scope="module")
def caption_cases(world):
    return world.edit_cases("caption", n=20, seed=3)


def pix(im):
    return np.asarray(load_image(im), dtype=np.int16)


def test_entities_are_distinct_with_shared_fact_values(world):
    ents = world.entities
    assert len(ents) >= 100
    assert len({(e.shape, e.colour, e.pattern) for e in ents}) == len(ents)
    assert len({e.name for e in ents}) == len(ents)
    assert len(FACTS) >= 4
    for fact in FACTS[1:]:
        assert 8 <= len({e.facts[fact] for e in ents}) <= 12
        by_colour = defaultdict(set)
        for e in ents:
            by_colour[e.colour].add(e.facts[fact])
        assert all(len(v) > 1 for v in by_colour.values()), f"{fact} readable from colour"
    for qs in list(QUESTIONS.values()) + list(TEXT_QUESTIONS.values()) + [CAPTION_PROMPTS]:
        assert len(set(qs)) >= 3


def test_determinism(world):
    other = SynthWorld(seed=0)
    assert [(e.name, e.shape, e.colour, e.pattern, e.facts) for e in other.entities] == \
        [(e.name, e.shape, e.colour, e.pattern, e.facts) for e in world.entities]
    assert (pix(world.render(7, 123)) == pix(other.render(7, 123))).all()
    a, b = world.edit_cases("vqa", 5, seed=1), other.edit_cases("vqa", 5, seed=1)
    assert [(c.prompt, c.target, c.loc_prompt, c.ci_prompt) for c in a] == \
        [(c.prompt, c.target, c.loc_prompt, c.ci_prompt) for c in b]
    assert all((pix(x.image) == pix(y.image)).all() for x, y in zip(a, b))
    assert [c.target for c in world.edit_cases("vqa", 5, seed=2)] != [c.target for c in a] or \
        [c.prompt for c in world.edit_cases("vqa", 5, seed=2)] != [c.prompt for c in a]
    assert SynthWorld(seed=1).entities[0].facts != world.entities[0].facts


def test_renderings_vary_but_keep_the_entity(world):
    for e in world.entities[:12]:
        a, b = world.render(e, 1), world.render(e, 2)
        assert a.size == (64, 64) and a.mode == "RGB"
        assert np.abs(pix(a) - pix(b)).mean() > 5  # different pose, background, noise
        for im in (a, b):  # the entity's colour covers a good part of both pictures
            near = np.linalg.norm(pix(im) - np.array(COLOURS[e.colour]), axis=-1) < 60
            assert near.mean() > 0.02


def test_edit_case_fields_filled_and_consistent(world, vqa_cases, caption_cases):
    for c in vqa_cases + caption_cases:
        assert isinstance(c, EditCase)
        for f in fields(EditCase):
            if f.name != "meta":
                assert getattr(c, f.name) not in (None, ""), f.name
        e = world.entities[c.meta["entity"]]
        assert min(c.meta["render_seeds"]) >= EVAL_SEED  # held out from training
        assert c.target != c.ground_truth and c.rephrase_prompt != c.prompt
        assert np.abs(pix(c.image) - pix(c.rephrase_image)).mean() > 5
        assert c.meta["mloc_entity"] != e.index and c.meta["ri_entity"] != e.index
        ri = world.entities[c.meta["ri_entity"]]
        assert c.ri_answer not in (c.ground_truth, c.target)
        assert c.ci_answer != c.ground_truth
        ci_fact = next(f for f in FACTS if c.ci_prompt in QUESTIONS[f])
        assert ci_fact != c.meta["fact"] and c.ci_answer == e.get(ci_fact)
        mloc = world.entities[c.meta["mloc_entity"]]
        mfact = next(f for f in FACTS if c.mloc_prompt in QUESTIONS[f])
        assert c.mloc_answer == mloc.get(mfact)
        rel = "capital" if "capital" in c.loc_prompt else "diet_by_name"
        assert (rel, c.loc_prompt, c.loc_answer) in {
            (r, world.text_question(r, s, q), a) for r, s, a in world.text_facts() for q in range(3)}
        if c.task == "vqa":
            fact = c.meta["fact"]
            assert c.prompt in QUESTIONS[fact] and c.rephrase_prompt in QUESTIONS[fact]
            assert c.ground_truth == e.get(fact) and c.target in world.answers(fact)
            assert c.ri_answer == ri.get(fact)
        else:
            assert c.prompt in CAPTION_PROMPTS and c.rephrase_prompt in CAPTION_PROMPTS
            assert c.ground_truth == world.caption(e) and c.ri_answer == world.caption(ri)
    assert len({(c.meta["entity"], c.meta["fact"]) for c in vqa_cases}) == len(vqa_cases)
    with pytest.raises(ValueError):
        world.edit_cases("retrieval", 1)


def test_vocabulary_covers_everything_and_the_tokenizer(world, vqa_cases, caption_cases):
    from unike.tiny.build import build_tokenizer

    vocab = set(world.vocabulary())
    texts = [t for c in vqa_cases + caption_cases for t in (c.prompt, c.target, c.ground_truth, c.rephrase_prompt,
                                                          c.loc_prompt, c.loc_answer, c.mloc_prompt, c.mloc_answer,
                                                          c.ci_prompt, c.ci_answer, c.ri_answer)]
    assert {w for t in texts for w in t.split()} <= vocab
    tok = build_tokenizer(world)
    assert vocab <= set(tok.get_vocab())
    ids = tok(" ".join(sorted(vocab)), add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(ids) == len(vocab)


def test_triplets(world):
    trip = world.triplets(n=2000, seed=0)
    assert len(trip) == 2000
    assert all(t.wrong != t.right and t.wrong and t.right for t in trip)
    assert len({(t.question, t.right) for t in trip}) > 300
    kinds = {("text" if t.image is None else "caption" if t.question in CAPTION_PROMPTS else "image") for t in trip}
    assert kinds == {"text", "caption", "image"}
    some = world.triplets(n=3, seed=0)
    assert [t.question for t in some] == [t.question for t in trip[:3]]


def test_mmedit_round_trip(world, tmp_path):
    for task in ("vqa", "caption"):
        path = world.export_mmedit(tmp_path / task, task=task, n=4, seed=5)
        records = json.loads(path.read_text())
        assert {"src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q",
                "m_loc_a"} <= set(records[0])
        loaded = load_mmedit(path, tmp_path / task)
        original = world.edit_cases(task, 4, seed=5)
        assert len(loaded) == 4
        for a, b in zip(loaded, original):
            assert isinstance(a.image, str)  # lazily loaded
            r = a.resolved()
            for name in ("image", "rephrase_image", "mloc_image", "ri_image"):
                assert (pix(getattr(r, name)) == pix(getattr(b, name))).all()
            for name in ("prompt", "target", "ground_truth", "rephrase_prompt", "loc_prompt", "loc_answer",
                         "mloc_prompt", "mloc_answer", "ci_prompt", "ci_answer", "ri_answer", "task"):
                assert getattr(a, name) == getattr(b, name), name


def test_mmedit_errors(world, tmp_path):
    path = world.export_mmedit(tmp_path, task="vqa", n=2, seed=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_mmedit(path, tmp_path / "images")  # wrong root
    records = json.loads(path.read_text())
    records.append(dict(records[0], alt=""))
    path.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_mmedit(path, tmp_path)) == 2
    path.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(ValueError, match="lacks"):
        load_mmedit(path, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_mmedit(tmp_path / "nope.json", tmp_path)


V1_FIELDS = ("image", "prompt", "target", "ground_truth", "rephrase_prompt", "rephrase_image", "loc_prompt", "loc_answer",
             "mloc_image", "mloc_prompt", "mloc_answer", "ci_prompt", "ci_answer", "ri_image", "ri_answer", "task", "meta")


def v1_digest(world) -> str:
    """sha256 over entities, vocabulary, text facts, renderings, edit cases (past the pool's end) and triplets."""
    h = hashlib.sha256()

    def put(x):
        h.update(x.tobytes() if hasattr(x, "tobytes") else json.dumps(x, sort_keys=True).encode())

    put([(e.index, e.shape, e.colour, e.pattern, e.facts) for e in world.entities])
    put(world.vocabulary())
    put(world.text_facts())
    for e in world.entities:
        put(world.render(e, 5))
    for task, n in (("vqa", 520), ("caption", 110)):
        for c in world.edit_cases(task, n, seed=3):
            for f in V1_FIELDS:
                put(getattr(c, f))
    for t in world.triplets(300, seed=1):
        put(t.image)
        put([t.question, t.right, t.wrong])
    return h.hexdigest()


def test_version_1_is_unchanged():
    """Pinned on the code the shipped tiny model was trained with (before version 2 existed)."""
    assert v1_digest(SynthWorld(seed=0)) == "eddb7f4e2702d87e41b5d7682ceaf9a4f8d7061c09e75b34b50ef5662eda0aef"
    assert v1_digest(SynthWorld(seed=1, n_entities=40)) == \
        "945fd9cfd05cd69e0d16d33241b9a8d945375b601f92db889fa4d7c072e0118d"
