"""GRACE on the shipped tiny VLM: an edit makes the greedy answer the target and leaves unrelated answers
alone, the codebook follows GRACE's rules (new, split, expand, relabel), generation with and without the
KV cache agree, and disabled() / reset() / detach() give back the unedited model bit for bit."""
import pytest
import torch

import unike
from unike.baselines import GRACE
from unike.bench import methods
from unike.data.case import load_image
from unike.prompting import encode, on_model, pad_id_of


@pytest.fixture(scope="module")
def tiny():
    return unike.load_tiny()


@pytest.fixture(scope="module")
def cases():
    return unike.SynthWorld(seed=0).edit_cases("vqa", n=4)


@pytest.fixture
def grace(tiny):
    g = GRACE(*tiny)
    yield g
    g.detach()


def _answer(model, processor, image, prompt):
    return unike.answer(model, processor, image, prompt)


def _unrelated(case):
    return [(None, case.loc_prompt), (case.mloc_image, case.mloc_prompt), (case.image, case.ci_prompt),
            (case.ri_image, case.prompt)]


def _query(g, image, prompt):
    return g._query(on_model(encode(g.processor, load_image(image), prompt), g.model), 1)[0]


def test_edit_reaches_target_and_keeps_unrelated_answers(tiny, cases, grace):
    model, processor = tiny
    probes = [q for c in cases for q in _unrelated(c)] + [(c.image, c.prompt) for c in cases[1:]]
    before = [_answer(model, processor, *q) for q in probes]
    assert _answer(model, processor, cases[0].image, cases[0].prompt) != cases[0].target
    info = grace.edit(cases[0])
    assert info["rule"] == "new" and info["keys"] == 1 and grace.layer == 4
    assert _answer(model, processor, cases[0].image, cases[0].prompt) == cases[0].target
    assert [_answer(model, processor, *q) for q in probes] == before


def test_codebook_rules(tiny, cases):
    model, processor = tiny
    a = cases[0]
    probe = GRACE(model, processor)
    d = (_query(probe, a.image, a.rephrase_prompt) - _query(probe, a.image, a.prompt)).norm().item()
    probe.detach()
    other = "tundra" if a.target != "tundra" else "desert"
    rephrased = unike.EditCase(image=a.image, prompt=a.rephrase_prompt, target=a.target)
    # ε_init < d ≤ 2 ε_init: the rephrase lies beyond the first key's radius but within reach
    g = GRACE(model, processor, eps=0.75 * d)
    g.edit(a)
    assert g.edit(rephrased)["rule"] == "expand" and g.n_edits == 1
    assert g.eps[0].item() == pytest.approx(d, rel=1e-4)
    g.detach()
    g = GRACE(model, processor, eps=0.75 * d)
    g.edit(a)
    assert g.edit(unike.EditCase(image=a.image, prompt=a.rephrase_prompt, target=other))["rule"] == "split"
    assert g.n_edits == 2 and g.eps.tolist() == pytest.approx([d / 2 - 1e-5, d / 2], rel=1e-4)
    assert _answer(model, processor, a.image, a.prompt) == a.target
    assert _answer(model, processor, a.image, a.rephrase_prompt) == other
    # the same question again with another label: the same key, relabelled (newest wins)
    assert g.edit(unike.EditCase(image=a.image, prompt=a.prompt, target=other))["rule"] == "relabel"
    assert g.n_edits == 2 and _answer(model, processor, a.image, a.prompt) == other
    g.detach()


def test_generation_with_and_without_cache_agree(tiny, cases, grace):
    model, processor = tiny
    for c in cases[:3]:
        grace.edit(c)
    probes = [(c.image, p) for c in cases for p in (c.prompt, c.rephrase_prompt)] + _unrelated(cases[0])
    for image, prompt in probes:
        inputs = on_model(encode(processor, load_image(image), prompt), model)
        ids = [model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=cache,
                              pad_token_id=pad_id_of(processor)) for cache in (True, False)]
        assert torch.equal(*ids), prompt


def test_a_generated_position_defers_with_and_without_cache(tiny, cases, grace):
    """An edit keyed on "<question> <its answer>": the answer's position is a generated one, which a
    cached step sees alone and an uncached step sees inside the whole sequence; both defer there."""
    model, processor = tiny
    c = cases[0]
    first = _answer(model, processor, c.image, c.prompt)
    new = "tundra" if first != "tundra" else "desert"
    grace.edit(unike.EditCase(image=c.image, prompt=f"{c.prompt} {first}", target=new))
    inputs = on_model(encode(processor, load_image(c.image), c.prompt), model)
    outs = [model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=cache,
                           pad_token_id=pad_id_of(processor)) for cache in (True, False)]
    assert torch.equal(*outs)
    assert _answer(model, processor, c.image, c.prompt) == f"{first} {new}"


def test_lifecycle_is_exact(tiny, cases):
    model, processor = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    enc = on_model(encode(processor, load_image(cases[0].image), cases[0].prompt, cases[0].target), model)
    labels = enc.pop("labels")
    with torch.no_grad():
        before = model(**enc).logits
    g = GRACE(model, processor)
    with pytest.raises(ValueError, match="one fact at a time"):
        g.edit({k: torch.cat([v, v]) for k, v in {**enc, "labels": labels}.items()})
    assert g.n_edits == 0
    g.edit({**enc, "labels": labels})                  # an HF inputs dict with labels
    with torch.no_grad():
        edited = model(**enc).logits
        assert not torch.equal(edited, before)
        with g.disabled():
            assert torch.equal(model(**enc).logits, before)
        assert torch.equal(model(**enc).logits, edited)
        g.reset()
        assert torch.equal(model(**enc).logits, before)
    g.edit(cases[0])
    g.detach()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="detached"):
        g.edit(cases[0])


def test_bad_settings_and_registry(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="eps > 0"):
        GRACE(model, processor, eps=0)
    with pytest.raises(ValueError, match="outside the decoder"):
        GRACE(model, processor, layer=6)
    assert "grace" in methods.MAIN
    g = methods.build("grace", model, processor)
    assert isinstance(g, GRACE)
    methods.release(g)
    assert g.hooks is None
