"""SynthWorld: determinism, renderings, edit cases, triplets, vocabulary, MMEdit round trip."""
import hashlib
import json
from collections import defaultdict
from dataclasses import fields

import numpy as np
import pytest

from unike.data.case import EditCase, load_image
from unike.data.mmedit import load_mmedit
from unike.data.world import (
    ATTRIBUTES,
    CAPITALS,
    CAPTION_PROMPTS,
    CLIMATES,
    COLOURS,
    EVAL_SEED,
    FACTS,
    QUESTIONS,
    TWO_HOP_QUESTIONS,
    SynthWorld,
)
from unike.metrics import probes


@pytest.fixture(scope="module", params=[1, 2], ids=["v1", "v2"])
def world(request):
    return SynthWorld(seed=0, version=request.param)


@pytest.fixture(scope="module")
def vqa_cases(world):
    return world.edit_cases("vqa", n=40, seed=3)


@pytest.fixture(scope="module")
def caption_cases(world):
    return world.edit_cases("caption", n=20, seed=3)


def pix(im):
    return np.asarray(load_image(im), dtype=np.int16)


def text_probes(world) -> dict:
    """question -> (relation, subject, answer) over every text-only fact and paraphrase."""
    return {world.text_question(r, s, q): (r, s, a) for r, s, a in world.text_facts()
            for q in range(len(world.text_questions[r]))}


def test_entities_are_distinct_with_shared_fact_values(world):
    ents = world.entities
    assert len(ents) >= (100 if world.version == 1 else 512)
    assert len({(e.shape, e.colour, e.pattern) for e in ents}) == len(ents)
    assert len({e.name for e in ents}) == len(ents)
    assert len(FACTS) >= 4
    for fact in FACTS[1:]:
        assert 8 <= len({e.facts[fact] for e in ents}) <= 12
        by_colour = defaultdict(set)
        for e in ents:
            by_colour[e.colour].add(e.facts[fact])
        assert all(len(v) > 1 for v in by_colour.values()), f"{fact} readable from colour"
    for qs in [*QUESTIONS.values(), *world.text_questions.values(), *TWO_HOP_QUESTIONS.values(), CAPTION_PROMPTS]:
        assert len(set(qs)) >= 3
    classes = world.aux_classes()
    for e in ents[:50]:
        labels = world.aux_labels(e)
        assert labels["entity"] == e.index and set(labels) == {"entity", *ATTRIBUTES}
        assert all(0 <= labels[a] < classes[a] and world.values(a)[labels[a]] == e.get(a) for a in ATTRIBUTES)


def test_determinism(world):
    other = SynthWorld(seed=0, version=world.version)
    assert [(e.name, e.shape, e.colour, e.pattern, e.facts) for e in other.entities] == \
        [(e.name, e.shape, e.colour, e.pattern, e.facts) for e in world.entities]
    assert (pix(world.render(7, 123)) == pix(other.render(7, 123))).all()
    a, b = world.edit_cases("vqa", 5, seed=1), other.edit_cases("vqa", 5, seed=1)
    assert [(c.prompt, c.target, c.loc_prompt, c.ci_prompt) for c in a] == \
        [(c.prompt, c.target, c.loc_prompt, c.ci_prompt) for c in b]
    assert all((pix(x.image) == pix(y.image)).all() for x, y in zip(a, b))
    assert [c.target for c in world.edit_cases("vqa", 5, seed=2)] != [c.target for c in a] or \
        [c.prompt for c in world.edit_cases("vqa", 5, seed=2)] != [c.prompt for c in a]
    assert SynthWorld(seed=1, version=world.version).entities[0].facts != world.entities[0].facts


def test_renderings_vary_but_keep_the_entity(world):
    for e in world.entities[:12]:
        a, b = world.render(e, 1), world.render(e, 2)
        assert a.size == (64, 64) and a.mode == "RGB"
        assert np.abs(pix(a) - pix(b)).mean() > 5  # different pose, background, noise
        for im in (a, b):  # the entity's colour(s) cover a good part of both pictures
            for colour in e.colour.split(" and "):
                near = np.linalg.norm(pix(im) - np.array(COLOURS[colour]), axis=-1) < 60
                assert near.mean() > 0.015, (e, colour)


def test_edit_case_fields_filled_and_consistent(world, vqa_cases, caption_cases):
    for c in vqa_cases + caption_cases:
        assert isinstance(c, EditCase)
        for f in fields(EditCase):
            if f.name not in ("meta", "port_prompt", "port_answer"):
                assert getattr(c, f.name) not in (None, ""), f.name
        has_port = c.task == "vqa" and c.meta["fact"] in world.two_hop_facts
        assert bool(c.port_prompt) == bool(c.port_answer) == has_port
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
        assert text_probes(world)[c.loc_prompt][2] == c.loc_answer
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
                                                          c.ci_prompt, c.ci_answer, c.ri_answer, c.port_prompt,
                                                          c.port_answer)]
    texts += [t.question + " " + t.right + " " + t.wrong for t in world.triplets(n=1000, seed=0)]
    texts += [*text_probes(world), *(a for *_, a in text_probes(world).values())]
    texts += [q + " " + world.two_hop(e, f) for e in world.entities for f in world.two_hop_facts
              for q in TWO_HOP_QUESTIONS[f]]
    texts += [world.caption(e) for e in world.entities] + [" ".join(world.values(a)) for a in ATTRIBUTES]
    assert {w for t in texts for w in t.split()} <= vocab
    assert not any(w.startswith("<") or "{" in w for w in vocab)  # no special tokens, no template holes
    tok = build_tokenizer(world)
    assert vocab <= set(tok.get_vocab())
    ids = tok(" ".join(sorted(vocab)), add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(ids) == len(vocab)


def test_triplets(world):
    trip = world.triplets(n=2000, seed=0)
    assert len(trip) == 2000
    assert all(t.wrong != t.right and t.wrong and t.right for t in trip)
    assert len({(t.question, t.right) for t in trip}) > 300
    kinds = {("text" if t.image is None else "caption" if t.question in CAPTION_PROMPTS else "two_hop"
              if any(t.question in qs for qs in TWO_HOP_QUESTIONS.values()) else "image") for t in trip}
    assert kinds == ({"text", "caption", "image"} | ({"two_hop"} if world.version == 2 else set()))
    if world.version == 2:
        assert {t.right for t in trip if t.question in TWO_HOP_QUESTIONS["habitat"]} <= set(CLIMATES.values())
        assert {t.right for t in trip if t.question in TWO_HOP_QUESTIONS["country"]} <= set(CAPITALS.values())
    some = world.triplets(n=3, seed=0)
    assert [t.question for t in some] == [t.question for t in trip[:3]]


def test_mmedit_round_trip(world, tmp_path):
    for task in ("vqa", "caption"):
        path = world.export_mmedit(tmp_path / task, task=task, n=8, seed=5)
        records = json.loads(path.read_text())
        assert {"src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q",
                "m_loc_a"} <= set(records[0])
        loaded = load_mmedit(path, tmp_path / task)
        original = world.edit_cases(task, 8, seed=5)
        assert len(loaded) == 8
        assert any(c.port_prompt for c in loaded) == (world.version == 2 and task == "vqa")
        for a, b in zip(loaded, original):
            assert isinstance(a.image, str)  # lazily loaded
            r = a.resolved()
            for name in ("image", "rephrase_image", "mloc_image", "ri_image"):
                assert (pix(getattr(r, name)) == pix(getattr(b, name))).all()
            for name in ("prompt", "target", "ground_truth", "rephrase_prompt", "loc_prompt", "loc_answer",
                         "mloc_prompt", "mloc_answer", "ci_prompt", "ci_answer", "ri_answer", "port_prompt",
                         "port_answer", "task"):
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


V1_FIELDS = ("image", "prompt", "target", "ground_truth", "rephrase_prompt", "rephrase_image", "loc_prompt",
             "loc_answer", "mloc_image", "mloc_prompt", "mloc_answer", "ci_prompt", "ci_answer", "ri_image",
             "ri_answer", "task", "meta")


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


# ----------------------------------------------------------------------------- version 2
@pytest.fixture(scope="module")
def world2():
    return SynthWorld(seed=0, version=2)


def probe_reads(world, c) -> dict[str, set]:
    """Which (entity, fact) pairs each probe of `c` asks about, checked against its prompt and answer."""
    e, ri, mloc = (world.entities[c.meta[k]] for k in ("entity", "ri_entity", "mloc_entity"))
    fact, mfact, cfact = c.meta["fact"], c.meta["mloc_fact"], c.meta["ci_fact"]
    assert c.mloc_prompt in QUESTIONS[mfact] and c.mloc_answer == mloc.get(mfact) and mloc is not e
    assert c.ci_prompt in QUESTIONS[cfact] and c.ci_answer == e.get(cfact)
    rel, subj, answer = text_probes(world)[c.loc_prompt]
    assert [rel, subj] == c.meta["loc"] and answer == c.loc_answer
    reads = {"ci": {(e.index, cfact)}, "m_loc": {(mloc.index, mfact)}, "t_loc": set()}
    if rel == "diet_by_name":
        y = world.by_name[subj]
        assert y is not e
        reads["t_loc"] = {(y.index, "diet"), (y.index, "name")}
    if c.task == "vqa":
        assert c.ri_answer == ri.get(fact) and ri is not e
        reads["ri"] = {(ri.index, fact)}
    else:
        assert c.ri_answer == world.caption(ri) and ri is not e
        reads["ri"] = {(ri.index, f) for f in ("name", "kind", "habitat")}
    return reads


LONG = pytest.mark.slow       # the longest lists: about 20 s each


@pytest.mark.parametrize("task,n,seed", [("vqa", 10, 0), ("vqa", 10, 1), ("vqa", 100, 2), ("vqa", 100, 3),
                                         pytest.param("vqa", 1000, 4, marks=LONG),
                                         pytest.param("vqa", 1000, 5, marks=LONG), ("caption", 10, 0),
                                         ("caption", 100, 1), pytest.param("caption", "max", 2, marks=LONG),
                                         ("cross", 40, 0), ("cross", "max", 1)])
def test_v2_lists_are_sequence_safe(world2, task, n, seed):
    n = world2.max_cases(task) if n == "max" else n
    _check_sequence_safe(world2, world2.edit_cases(task, n, seed=seed), task, n)


@pytest.mark.parametrize("task,n", [("vqa", 100), ("vqa", 200), ("caption", 99), ("cross", 40), ("cross", 50)])
def test_v1_sequence_safe_lists(task, n):
    """The shipped model's world gives sequence-safe lists on request (its default lists are the measured ones)."""
    world = SynthWorld(seed=0)
    assert world.max_cases(task, sequence_safe=True) == {"vqa": 200, "caption": 99, "cross": 50}[task]
    _check_sequence_safe(world, world.edit_cases(task, n, seed=1, sequence_safe=True), task, n)
    with pytest.raises(ValueError, match=f"at most {world.max_cases(task, True)} sequence-safe"):
        world.edit_cases(task, world.max_cases(task, True) + 1, sequence_safe=True)


def _check_sequence_safe(world2, cases, task, n):
    assert len(cases) == n
    edits = [(c.meta["entity"], f) for c in cases for f in c.meta["edits"]]
    assert len(edits) == len(set(edits)), "two cases edit the same entity fact"
    edited = set(edits)
    new_names = {c.target for c in cases if c.meta["fact"] == "name"} | \
        {world2.entities[c.meta["name_from"]].name for c in cases if c.task == "caption"}
    for c in cases:
        assert c.meta["edits"] == (["name", "kind"] if c.task == "caption" else [c.meta["fact"]])
        for probe, reads in probe_reads(world2, c).items():
            assert not reads & edited, f"{probe} asks about an edited fact: {reads & edited}"
        if c.meta["loc"][0] == "diet_by_name":
            assert c.meta["loc"][1] not in new_names  # no text probe names a creature some edit renamed another to
    if task == "caption":
        assert {f for _, f in edits} == {"name", "kind"}
        assert len({c.meta["entity"] for c in cases}) == n
    if task == "cross":   # VQA first, then captions; no entity edited by both
        tasks = [c.task for c in cases]
        assert tasks == sorted(tasks, reverse=True) and tasks.count("vqa") == n // 2
        assert not {c.meta["entity"] for c in cases if c.task == "vqa"} & \
            {c.meta["entity"] for c in cases if c.task == "caption"}


def test_cross_lists():
    """The bench's cross-task lists: as drawn alone unless sequence-safe; the VQA share; errors."""
    world = SynthWorld(seed=0)
    alone = world.edit_cases("vqa", 3, seed=5) + world.edit_cases("caption", 7, seed=5)
    assert [c.prompt for c in world.edit_cases("cross", 10, seed=5, vqa=3)] == [c.prompt for c in alone]
    assert [c.task for c in world.edit_cases("cross", 10, seed=5, sequence_safe=True, vqa=3)] == \
        ["vqa"] * 3 + ["caption"] * 7
    with pytest.raises(ValueError, match="between 0 and 10 VQA"):
        world.edit_cases("cross", 10, vqa=11)


def test_v2_list_sizes_and_errors(world2):
    assert world2.max_cases("vqa") >= 1000 and world2.max_cases("caption") == len(world2.entities) - 1
    with pytest.raises(ValueError, match="at most 1024 sequence-safe vqa"):
        world2.edit_cases("vqa", 1025)
    with pytest.raises(ValueError, match="at most 511 sequence-safe caption"):
        world2.edit_cases("caption", 512)
    with pytest.raises(ValueError, match="task must be"):
        world2.max_cases("retrieval")
    small = SynthWorld(seed=3, n_entities=8, version=2)  # the caps hold on the smallest world too
    assert len(small.edit_cases("vqa", small.max_cases("vqa"))) == 16
    assert len(small.edit_cases("caption", small.max_cases("caption"))) == 7
    assert SynthWorld(seed=0).max_cases("vqa") is None and len(SynthWorld(seed=0).edit_cases("vqa", 600)) == 600
    with pytest.raises(ValueError, match="version must be one of"):
        SynthWorld(version=3)
    with pytest.raises(ValueError, match=r"n_entities must be in \[8, 1152\]"):
        SynthWorld(n_entities=2000, version=2)
    with pytest.raises(ValueError, match="version=2"):
        SynthWorld(seed=0).two_hop(0, "country")


def test_v2_port_answers_follow_the_edited_fact(world2):
    cases = world2.edit_cases("vqa", 300, seed=9)
    ported = [c for c in cases if c.port_prompt]
    assert {c.meta["fact"] for c in ported} == {"country", "habitat"} == set(world2.two_hop_facts)
    assert len(ported) == sum(c.meta["fact"] in ("country", "habitat") for c in cases)
    for c in ported:
        e, fact = world2.entities[c.meta["entity"]], c.meta["fact"]
        hop = CAPITALS if fact == "country" else CLIMATES
        assert c.port_prompt in TWO_HOP_QUESTIONS[fact] and c.meta["port_fact"] == fact
        assert c.port_answer == hop[c.target] == world2.two_hop(e, fact, c.target)
        assert c.port_answer != world2.two_hop(e, fact) == hop[c.ground_truth]  # the edit changes the answer
        relation = "capital" if fact == "country" else "climate"
        assert (relation, c.target, c.port_answer) in world2.text_facts()  # its premise is a text fact
    assert all(c.port_prompt == c.port_answer == "" for c in world2.edit_cases("caption", 20, seed=9))


def test_v2_looks(world2):
    looks = [(e.shape, e.colour, e.pattern) for e in world2.entities]
    assert len(looks) >= 512 and len(set(looks)) == len(looks)
    assert {len(e.colour.split(" and ")) for e in world2.entities} == {1, 2}
    assert world2.aux_classes() == {"entity": len(looks), "colour": 36, "shape": 8, "pattern": 4}
    assert {len(world2.values(k)) for k in ("kind", "habitat", "diet", "country")} <= set(range(8, 13))
    # the same pattern and shape, one colour or two: the pictures differ where the second colour lies
    two = next(e for e in world2.entities if " and " in e.colour)
    a, b = two.colour.split(" and ")
    im = pix(world2.render(two, 3))
    assert all((np.linalg.norm(im - np.array(COLOURS[c]), axis=-1) < 60).mean() > 0.015 for c in (a, b))


def test_edit_case_port_fields():
    with pytest.raises(ValueError, match="port_prompt is given without port_answer"):
        EditCase(image="a.png", prompt="what ?", target="x", port_prompt="what is the capital ?")
    with pytest.raises(ValueError, match="port_prompt needs the edit's image"):
        EditCase(image=None, prompt="what ?", target="x", port_prompt="what is the capital ?", port_answer="y")
    assert EditCase(image="a.png", prompt="what ?", target="x").port_prompt == ""


@pytest.mark.parametrize("version,n,sequence_safe", [(1, 30, True), (1, 55, True), (1, 200, False), (2, 40, None)])
def test_text_lists(version, n, sequence_safe):
    """Text-only cases (task "text"): no image, the probes Rel, T-Gen (another wording), T-Loc (the same
    relation, another subject) and M-Loc; sequence-safe lists edit each fact once, ask T-Loc about facts
    no case edits and show M-Loc entities whose name no case edits."""
    world = SynthWorld(seed=0, version=version)
    cases = world.edit_cases("text", n, seed=2, sequence_safe=sequence_safe)
    facts = {(r, s): a for r, s, a in world.text_facts()}
    wordings = {world.text_question(r, s, w): (r, s) for r, s in facts for w in range(3)}
    assert len(cases) == n
    for c in cases:
        fact = wordings[c.prompt]
        assert c.image is None and c.task == "text" and (c.meta["relation"], c.meta["subject"]) == fact
        assert c.ground_truth == facts[fact] and c.target != c.ground_truth
        assert wordings[c.rephrase_prompt] == fact and c.rephrase_prompt != c.prompt
        assert wordings[c.loc_prompt][0] == fact[0] and wordings[c.loc_prompt] != fact
        assert c.loc_answer == facts[wordings[c.loc_prompt]]
        m = world.entities[c.meta["mloc_entity"]]
        assert any(c.mloc_prompt in qs and c.mloc_answer == m.get(f) for f, qs in QUESTIONS.items())
        assert [p.metric for p in probes(c)] == ["rel", "t_gen", "t_loc", "m_loc"]
    if sequence_safe or version == 2:
        edited = [(c.meta["relation"], c.meta["subject"]) for c in cases]
        assert len(set(edited)) == n
        assert not {wordings[c.loc_prompt] for c in cases} & set(edited)
        assert not {world.entities[c.meta["mloc_entity"]].name for c in cases} & {s for _, s in edited}
        assert world.max_cases("text", True) == len(facts) // 2
        with pytest.raises(ValueError, match="sequence-safe text"):
            world.edit_cases("text", len(facts) // 2 + 1, sequence_safe=True)
