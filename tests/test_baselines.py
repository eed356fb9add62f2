"""Baselines on the shipped tiny VLM: each edits, reset / disabled() / detach() are exact, and
`evaluate` uses PromptIKE's rewritten prompts only for the edited scores."""
import warnings

import pytest
import torch

import unike
import unike.metrics
from unike.baselines import FTLast, LatentIKE, PromptIKE, TPatcher
from unike.data.case import load_image
from unike.prompting import encode, on_model


@pytest.fixture(scope="module")
def tiny():
    return unike.load_tiny()


@pytest.fixture(scope="module")
def world():
    return unike.SynthWorld(seed=0)


@pytest.fixture(scope="module")
def cases(world):
    return world.edit_cases("vqa", n=3, seed=11)


@pytest.fixture(scope="module")
def triplets(world):
    return world.triplets(n=48, seed=3)


@pytest.fixture(autouse=True)
def pristine(tiny):
    """Every test starts from the shipped weights, whatever the one before left behind."""
    weights = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    yield
    tiny[0].load_state_dict(weights)


def _inputs(processor, model, case, answer):
    enc = on_model(encode(processor, load_image(case.image), case.prompt, answer), model)
    return {k: v for k, v in enc.items() if k != "labels"}, enc["labels"]


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits


def _target_is_argmax(model, processor, case):
    inputs, labels = _inputs(processor, model, case, case.target)
    pred = _logits(model, inputs)[:, :-1].argmax(-1)
    return torch.equal(pred[labels[:, 1:] != -100], labels[labels != -100])


def _check_lifecycle(method, case, edited_check, keys):
    """Edit, then disabled() / reset() / detach() must give back the unedited logits bit for bit (and
    the state_dict `keys` of the model before the method was built)."""
    model, processor = method.model, method.processor
    inputs, _ = _inputs(processor, model, case, case.target)
    before = _logits(model, inputs)
    method.edit(case)
    edited_check()
    edited = _logits(model, inputs)
    assert not torch.equal(edited, before)
    with method.disabled():
        assert torch.equal(_logits(model, inputs), before)
    assert torch.equal(_logits(model, inputs), edited)
    method.reset()
    assert torch.equal(_logits(model, inputs), before)
    method.edit(case)
    method.detach()
    assert torch.equal(_logits(model, inputs), before)
    assert list(model.state_dict()) == keys


def test_ft_last(tiny, cases):
    model, processor = tiny
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ft = FTLast(model, processor)
    _check_lifecycle(ft, cases[0], lambda: _target_is_argmax(model, processor, cases[0]) or pytest.fail("no edit"),
                     list(weights))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    ft = FTLast(model, processor)
    ft.edit(cases[0])
    assert ft.edit(cases[0])["steps"] == 0          # sequential: continues from the edited weights
    ft.detach()
    with pytest.raises(RuntimeError, match="detached"):
        ft.edit(cases[0])


def test_tpatcher(tiny, cases, triplets):
    model, processor = tiny
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="TPatcher fixes layers=1"):
        TPatcher(model, processor, layers=4)
    assert list(model.state_dict()) == keys
    tp = TPatcher(model, processor).fit(triplets, progress=False)
    assert tp.layer_ids == [len(tp.stack) - 1] and tp.losses == []     # last layer; no spaces trained
    assert not tp.config.latent and tp.config.key_ridge is None and not tp.config.route     # ungated, as published
    assert len(tp.layers[tp.layer_ids[0]].negatives) == len(triplets)

    def check():
        assert _target_is_argmax(model, processor, cases[0])
        assert tp.neurons[tp.layer_ids[0]].edits == 1
    _check_lifecycle(tp, cases[0], check, keys)


def test_latent_ike(tiny, cases, triplets):
    model, processor = tiny
    keys = list(model.state_dict())
    ike = LatentIKE(model, processor, encoder_steps=50)
    with pytest.raises(RuntimeError, match="call fit"):
        ike.edit(cases[0])
    ike.fit(triplets, progress=False)
    alphas = {}
    for l in ike.layer_ids:
        ike.stack[l].block.unike_memory.alpha.register_forward_hook(
            lambda mod, args, out, l=l: alphas.__setitem__(l, out.detach()))

    def check():
        assert all(len(ike.memory[l]) == len(triplets) + 1 for l in ike.layer_ids)
        assert not any(ike.neurons[l].edits for l in ike.layer_ids)
        _logits(model, _inputs(processor, model, cases[0], cases[0].target)[0])
        assert max(a.max() for a in alphas.values()) > 0      # the memory acts on the edit input
    _check_lifecycle(ike, cases[0], check, keys)


def test_prompt_ike_rewrites_and_retrieves(tiny, cases):
    model, processor = tiny
    a, b = cases[0], next(c for c in cases if c.prompt != cases[0].prompt)
    demo_a, demo_b = f"{a.prompt} {a.target}", f"{b.prompt} {b.target}"
    ike, two = PromptIKE(model, processor, k=1), PromptIKE(model, processor, k=2)
    assert ike.rewrite(a.prompt) == a.prompt
    with pytest.raises(TypeError, match="EditCase"):
        ike.edit({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    for method in (ike, two):
        method.edit(a)
        method.edit(b)
    assert ike.sep == " ; "                                           # a word the tiny vocabulary has
    assert ike.rewrite(a.prompt) == f"{demo_a} ; {a.prompt}"          # the most similar edit only
    assert ike.rewrite(b.prompt) == f"{demo_b} ; {b.prompt}"
    assert two.rewrite(a.prompt) == f"{demo_b} ; {demo_a} ; {a.prompt}"  # the most similar one last
    with ike.disabled():
        assert ike.rewrite(a.prompt) == a.prompt
    ike.reset()
    assert ike.rewrite(a.prompt) == a.prompt


def test_evaluate_rewrites_only_edited_scores(tiny, cases, monkeypatch):
    model, processor = tiny
    ike = PromptIKE(model, processor)
    seen = []
    real = unike.metrics.encode
    monkeypatch.setattr(unike.metrics, "encode", lambda proc, image, prompt, *a, **kw: (
        seen.append((ike._enabled, prompt)), real(proc, image, prompt, *a, **kw))[1])
    unike.evaluate(ike, cases, progress=False)
    base = [p for enabled, p in seen if not enabled]
    edited = [p for enabled, p in seen if enabled]
    assert base and not any(ike.sep in p for p in base)
    demos = {f"{c.prompt} {c.target}{ike.sep}" for c in cases}
    assert edited and all(any(p.startswith(d) for d in demos) for p in edited)
    assert len(edited) == sum(len(unike.metrics.probes(c)) for c in cases)


def test_prompt_ike_with_inner_method(tiny, cases):
    model, processor = tiny
    keys = list(model.state_dict())
    inner = unike.UniKE(model, processor, unike.UniKEConfig(layers=1, latent=False, collaboration=False, zeta="none"))
    ike = PromptIKE(model, processor, inner=inner)
    with pytest.raises(ValueError, match="another model"):
        PromptIKE(unike.load_tiny()[0], processor, inner=inner)

    def check():
        assert inner.n_edits == 1 and ike.n_edits == 1
        with ike.disabled():
            assert ike.rewrite(cases[0].prompt) == cases[0].prompt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the inner editor is not fitted: neurons alone
        _check_lifecycle(ike, cases[0], check, keys)
    assert inner.hooks is None and ike.n_edits == 0


@pytest.mark.parametrize("make", [unike.UniKE, FTLast, TPatcher, LatentIKE, PromptIKE, unike.baselines.GRACE],
                         ids=lambda m: m.__name__)
def test_every_method_is_an_edit_method(tiny, make):
    """UniKE and every baseline satisfy `unike.method.EditMethod`, with the protocol's keywords."""
    import inspect

    from unike.method import EditMethod

    method = make(*tiny)
    try:
        assert isinstance(method, EditMethod)
        for name in ("fit", "edit"):
            params = inspect.signature(getattr(method, name)).parameters
            assert "progress" in params and params["progress"].kind is inspect.Parameter.KEYWORD_ONLY, name
    finally:
        method.detach()
