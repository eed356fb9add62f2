"""The per-edit router (`unike.router`): its gate against values computed by hand, and on the tiny model
an edit that acts on its own question and its rephrasings but not on another entity's image, a state
saved before routing, and `route=False` as the paper's ungated neurons."""
import hashlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import unike
from unike.router import EditRouter, image_codes


def test_gate_by_hand():
    r = EditRouter(2, tau_question=0.9, tau_image=0.5)
    r.fit(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]),    # mean 0, std (0.82, 1.63)
          torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]),    # image mean 0 (two with images)
          torch.tensor([True, True, False, False]), torch.arange(4))
    r.add(torch.tensor([[1.0, 0.0]]), torch.tensor([2.0, 0.0]))               # edit 0: key (1, 0), image (1, 0)
    r.add(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), None)                      # edit 1: text only, two keys
    sd = torch.tensor([1.0, 2.0]).div(3 ** 0.5).mul(2 ** 0.5)                  # the unbiased std of the fit rows
    k1 = F.normalize(torch.tensor([1.0, 1.0]) / sd, dim=0)
    x = torch.tensor([[[3.0, -0.5], [0.0, 5.0], [1.0, 1.0]]])                # three positions
    # edit 0, key (1, 0): position 0 (cos 0.997 ≥ 0.9); not 2 (standardised it is k1: cos 0.894)
    # edit 1: position 1 matches (0, 1); position 2 is k1; position 0 is 0.854 from k1 and -0.08 from (0, 1)
    want = torch.tensor([[[True, False], [False, True], [False, True]]])
    assert torch.allclose(r.standardize(torch.tensor([1.0, 1.0])), k1)
    assert torch.equal(r(x, torch.tensor([[4.0, 3.0]]), torch.tensor([True])), want)       # image cos 0.8
    off = r(x, torch.tensor([[-1.0, 3.0]]), torch.tensor([True]))                           # image cos -0.32
    assert torch.equal(off, want & torch.tensor([False, True]))
    assert torch.equal(r(x, torch.zeros(1, 2), torch.tensor([False])), off)                 # no image: edit 0 off
    assert torch.equal(r(x, None, None), want)                                             # unknown: question only
    r.truncate(1)
    assert r.edits == 1 and len(r.keys) == 1 and torch.equal(r(x, None, None), want[..., :1])


def test_an_edit_trains_against_the_negatives_its_gate_reaches():
    """`reaches` before an edit is committed is exactly the gate the edit gets once it is: its neurons then
    train against the fit negatives, earlier edits' targets and own prompt positions it can meet."""
    gen = torch.Generator().manual_seed(0)
    questions, images = torch.randn(64, 8, generator=gen), torch.randn(64, 8, generator=gen)
    has, picks = torch.rand(64, generator=gen) > 0.3, torch.randperm(64, generator=gen)[:40]
    r = EditRouter(8, tau_question=0.2, tau_image=0.1)
    r.fit(questions, images, has, picks)
    r.add(questions[:2] + 0.1, images[0])                             # an earlier edit
    targets = questions[picks[:3]] + 0.3 * torch.randn(3, 8, generator=gen)
    image, prompt, extra = images[picks[0]], questions[5:9], questions[picks[:3]]     # extra: over its image
    scope = r.negative_scope(targets, image, 40, prompt, extra=extra)
    r.add(targets, image)
    fit = r(questions[picks][:, None], images[picks], has[picks])[:, 0, -1]
    same_image = r.image_code(images[0]) @ r.images[-1] >= 0.1
    earlier = r(r.keys[:2, None] * r.std + r.mean, None, None)[:, 0, -1] & same_image
    own = r(prompt[None], images[picks[0]][None], torch.tensor([True]))[0, :, -1]
    over = r(extra[None], images[picks[0]][None], torch.tensor([True]))[0, :, -1]
    assert torch.equal(scope, torch.cat([fit, earlier, own, over]))
    assert over.any(), "the extra questions over the edit's image near its targets are reached"
    assert 0 < int(fit.sum()) < len(fit), "the case must mix reached and unreached negatives"
    assert torch.equal(r.negative_scope(targets, image, 39, prompt)[:39], torch.ones(39, dtype=torch.bool))


def test_lookalike_radius_keeps_fit_lookalikes_out():
    """An edit's image threshold rises just above the fit look-alikes its question test passes (other
    knowledge, with an image); same-knowledge rows, rows its question test fails and rows without images
    leave it at τ_img; the gate then applies each edit's own threshold."""
    r = EditRouter(2, tau_question=0.9, tau_image=0.5)
    questions = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    images = torch.tensor([[1.0, 0.2], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    r.fit(questions, images, torch.tensor([True, True, True, True, False, True]), torch.arange(6))
    code = r.image_code(images[2])                  # the edit's image: that of row 2
    sims = r.negative_images @ code
    apart = torch.tensor([True, True, False, True, True, True])      # row 2 is the same knowledge
    radius = r.lookalike_radius(questions[:1], images[2], apart)   # question test passes rows 0-2
    assert radius == pytest.approx(max(float(sims[0]), float(sims[1])) + 1e-3) and radius > 0.5
    assert r.lookalike_radius(questions[:1], images[2], torch.tensor([False] * 6)) == 0.5
    # never above the fit renderings of the same knowledge: row 0 the same knowledge, row 2 a look-alike
    capped = r.lookalike_radius(questions[:1], images[2], torch.tensor([False, True, True, True, True, True]))
    assert capped == pytest.approx(float(sims[0])) and float(sims[2]) > capped
    r.tau_image_max = 0.6                           # and never above route_image_max
    assert r.lookalike_radius(questions[:1], images[2], apart) == 0.6
    r.tau_image_max = 0.8
    r.add(questions[:1], images[2], radius=radius)
    r.add(questions[:1], images[2])                # the same edit at τ_img
    gate = r(questions[:3, None], images[:3], torch.ones(3, dtype=torch.bool))[:, 0]
    assert gate[:, 1].tolist() == [True, False, True]         # row 0: the look-alike (0.64 ≥ 0.5), row 1: 0.0
    assert gate[:, 0].tolist() == [False, False, True]
    r.truncate(1)
    assert r.radius.tolist() == [pytest.approx(radius)]


def _two_by_two() -> tuple[EditRouter, torch.Tensor]:
    """A router fit on four 2-d prompts (τ_q 0.9, τ_img 0.5), and a question state."""
    r = EditRouter(2, tau_question=0.9, tau_image=0.5)
    r.fit(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]),
          torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]), torch.ones(4, dtype=torch.bool),
          torch.arange(4))
    return r, torch.tensor([[1.0, 0.0]])


def test_rivals_split_overlapping_scopes_by_hand():
    """Two edits of the same question on look-alike images (cos 0.92, both radii 0.5) that hold other
    knowledge become rivals: each then opens only where the image is closer to its own. Same knowledge, a
    text-only edit or another question makes none; truncating drops the pairs."""
    r, q = _two_by_two()
    r.add(q, torch.tensor([1.0, 0.2]))
    r.add(torch.tensor([[0.0, 1.0]]), torch.tensor([1.0, 0.1]))       # another question: no rival
    r.add(q, None)                                                      # text only: no rival
    r.add(q, torch.tensor([1.0, -0.2]))
    assert r.split(torch.tensor([False, True, True, True])).tolist() == []     # edit 0: the same knowledge
    assert r.split(torch.tensor([True, True, True, True])).tolist() == [[3, 0], [0, 3]]
    x = q[None].expand(2, 1, 2)
    gate = r(x, torch.tensor([[1.0, 0.1], [1.0, -0.1]]), torch.ones(2, dtype=torch.bool))[:, 0]
    assert gate[:, [0, 3]].tolist() == [[True, False], [False, True]]
    assert gate[:, 2].tolist() == [True, True] and not gate[:, 1].any()     # text only: no image test
    r.rivals = r.rivals[:0]
    assert r(x, torch.tensor([[1.0, 0.1], [1.0, -0.1]]), torch.ones(2, dtype=torch.bool))[:, 0, 3].all()
    r.rivals = torch.tensor([[3, 0], [0, 3]])
    r.truncate(3)
    assert r.rivals.shape == (0, 2)


def test_a_later_edit_takes_precedence_over_the_edits_it_updates_by_hand():
    """`neighbours` finds the earlier edits within an image radius of a new one and which of them its question
    test overlaps; an edit that yields to a later one closes wherever that one opens, and only there."""
    r, q = _two_by_two()
    r.add(q, torch.tensor([1.0, 0.2]))
    r.add(torch.tensor([[0.0, 1.0]]), torch.tensor([1.0, 0.1]))       # another question
    r.add(q, torch.tensor([-1.0, 0.0]))                                 # another image
    js, overlap = r.neighbours(q, torch.tensor([1.0, -0.2]))
    assert js.tolist() == [0, 1] and overlap.tolist() == [True, False]
    r.add(q, torch.tensor([1.0, -0.2]))
    r.precede(3, torch.tensor([0]))
    x = q[None].expand(3, 1, 2)
    gate = r(x, torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 1.7]]), torch.ones(3, dtype=torch.bool))[:, 0]
    assert gate[:, [0, 3]].tolist() == [[False, True], [False, True], [True, False]]   # the later one's scope
    r.truncate(3)
    assert r.yields.shape == (0, 2)


def test_asked_questions_are_checked_on_load():
    from unike.persist import _asked
    assert _asked({}, 2) == [None, None]                         # saved before they were kept
    assert _asked({"asked": [["what ?", "moss"], None]}, 2) == [["what ?", "moss"], None]
    assert _asked({"asked": [None], "n_edits": 1}, 0) == []       # a router saved before routing: none kept
    for bad in ([["what ?"]], [None, None, None], [["what ?", 3]], "what ?"):
        with pytest.raises(ValueError, match="'asked' must list"):
            _asked({"asked": bad, "n_edits": 2}, 2)


def test_image_codes_mean_over_image_tokens():
    x = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    codes, has = image_codes(x, mask)
    assert torch.equal(codes, torch.tensor([[2.0, 3.0], [0.0, 0.0]])) and has.tolist() == [True, False]


@pytest.fixture(scope="module")
def tiny(tiny_states):
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor)
    editor.fit_states(tiny_states, progress=False)          # = fit(world.triplets(n=300, seed=3))
    yield model, processor, world, editor
    editor.detach()


def _edit_all(editor, cases, **config):
    """Edit `cases` in order from no edits, under `UniKEConfig(**config)`."""
    editor.reset()
    editor.config = unike.UniKEConfig(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            editor.edit(case)


def _gate_last(editor, image, prompt):
    """The router's gate of every committed edit at the prompt's last token."""
    from unike.prompting import encode, on_model
    with torch.no_grad():
        editor.model(**on_model(encode(editor.processor, image, prompt), editor.model))
    return editor.edits.switch.gate[0, -1]


@pytest.mark.slow
def test_edit_routes_to_its_scope_only(tiny):
    model, processor, world, editor = tiny
    cases = world.edit_cases("vqa", n=6, seed=21)
    editor.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            editor.edit(case)
    inside = outside = 0
    for e, c in enumerate(cases):
        inside += int(_gate_last(editor, c.image, c.prompt)[e]) + int(_gate_last(editor, c.image, c.rephrase_prompt)[e])
        outside += int(_gate_last(editor, c.ri_image, c.prompt)[e]) + int(_gate_last(editor, c.image, c.ci_prompt)[e])
        outside += int(_gate_last(editor, None, c.loc_prompt)[e])
    assert inside == 12 and outside <= 1, (inside, outside)
    assert unike.answer(model, processor, cases[0].image, cases[0].prompt) == cases[0].target
    editor.reset()
    assert editor.router.edits == 0 and editor.scope.route(torch.zeros(1, 1, 1)) is None


@pytest.mark.slow
def test_training_steps_reuse_the_gate_exactly(tiny, monkeypatch):
    """The steps of one edit repeat one call, whose first edited layer's input no edit moves: the router
    runs once per edit (`Scope.hold`), and the edits are bit-identical to routing at every step."""
    model, processor, world, editor = tiny
    cases = world.edit_cases("vqa", n=3, seed=2)
    calls = []
    forward = EditRouter.forward
    monkeypatch.setattr(EditRouter, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    _edit_all(editor, cases, stop_prob=2.0, edit_steps=8)
    held = {k: v.clone() for k, v in editor.state().items()}
    assert len(calls) == 2                     # edits 2 and 3 (edit 1 has no committed edit to route)
    monkeypatch.setattr(type(editor.scope), "hold", lambda self, pending: setattr(self, "pending", pending))
    calls.clear()
    _edit_all(editor, cases, stop_prob=2.0, edit_steps=8)
    assert len(calls) == 2 * 9                 # 8 steps and the last forward, each routed again
    assert all(torch.equal(held[k], v) for k, v in editor.state().items())


@pytest.mark.slow
@pytest.mark.parametrize("pair", [(2, 13), (69, 84)])
def test_rivals_keep_an_earlier_lookalike_edit(tiny, pair):
    """Two edits of the same fact of look-alike entities (a pair found in the sequence-safe K = 100 list of
    seed 14): without rivals the later one's gate opens on the earlier one's prompt and its answer becomes
    the later target; with them each edit holds on its own image."""
    model, processor, world, editor = tiny
    cases = [world.edit_cases("vqa", n=100, seed=14, sequence_safe=True)[i] for i in pair]
    held = {}
    for rivals in (False, True):
        _edit_all(editor, cases, route_rivals=rivals)
        held[rivals] = [unike.answer(model, processor, c.image, c.prompt) == c.target for c in cases]
        assert len(editor.router.rivals) == (2 if rivals else 0)
    editor.config = unike.UniKEConfig()
    editor.reset()
    assert held == {False: [False, True], True: [True, True]}


@pytest.mark.slow
@pytest.mark.parametrize("pair, probed", [((15, 19), 19), ((66, 83), 66)])
def test_asked_rivals_keep_an_edit_off_a_lookalike_edited_image(tiny, pair, probed, tmp_path):
    """Two edits of different facts of look-alike entities (pairs of seed 14's K = 100 list): one edit's gate
    opens on the other's image asked about its fact, so that image's other-fact (CI) answer changes. Asked
    its question over the new image, the base model answers otherwise: the edits become rivals both ways and
    the CI answer holds. The asked questions are saved with the editor."""
    model, processor, world, editor = tiny
    cases = world.edit_cases("vqa", n=100, seed=14, sequence_safe=True)
    probe = cases[probed]
    with editor.disabled():
        before = unike.answer(model, processor, probe.image, probe.ci_prompt)
    held = {}
    for asked in (False, True):
        _edit_all(editor, [cases[i] for i in pair], route_asked=asked)
        held[asked] = unike.answer(model, processor, probe.image, probe.ci_prompt) == before
        assert sorted(editor.router.rivals.tolist()) == ([[0, 1], [1, 0]] if asked else [])
        assert all(unike.answer(model, processor, cases[i].image, cases[i].prompt) == cases[i].target for i in pair)
    assert held == {False: False, True: True}
    assert [a[0] for a in editor.asked] == [cases[i].prompt for i in pair]
    editor.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "unike.json").read_text())
    assert meta["asked"] == editor.asked
    editor.config = unike.UniKEConfig()
    editor.reset()


@pytest.mark.slow
@pytest.mark.parametrize("pair", [(6, 625), (11, 599)])
def test_an_update_of_an_edited_fact_wins(tiny, pair, tmp_path):
    """The same fact edited twice, with other renderings and wordings (a pair of seed 0's VQA list without
    sequence safety, where every fact is edited twice). Without updates the two edits become rivals and
    the first edit's prompts keep its answer; with them (the base model answers the first edit's question
    over the second's image as over its own) the second takes precedence wherever it opens, and the first
    edit's prompt, rephrasing and other image answer the newest value. The precedence is saved."""
    model, processor, world, editor = tiny
    old, new = [world.edit_cases("vqa", n=1000, seed=0)[i] for i in pair]
    assert (old.meta["entity"], old.meta["fact"]) == (new.meta["entity"], new.meta["fact"])
    said = {}
    for updates in (False, True):
        _edit_all(editor, [old, new], route_updates=updates)
        said[updates] = {unike.answer(model, processor, image, prompt) for image, prompt in
                         ((old.image, old.prompt), (old.image, old.rephrase_prompt), (old.rephrase_image, old.prompt))}
        assert unike.answer(model, processor, new.image, new.prompt) == new.target
        assert editor.router.yields.tolist() == ([[0, 1]] if updates else [])
        assert (len(editor.router.rivals) == 0) == updates
    assert said == {False: {old.target}, True: {new.target}}
    editor.save(tmp_path / "s")
    loaded = unike.UniKE.load(*unike.load_tiny(), tmp_path / "s")
    assert torch.equal(loaded.router.yields, editor.router.yields)
    editor.config = unike.UniKEConfig()
    editor.reset()


@pytest.mark.slow
def test_route_false_is_ungated_and_old_states_load_ungated(tmp_path):
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    case = world.edit_cases("vqa", n=1, seed=22)[0]
    editor = unike.UniKE(model, processor, unike.UniKEConfig(route=False))
    editor.fit(world.triplets(n=32, seed=3), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor.edit(case)
    assert editor.scope.route(torch.zeros(1, 1, 1)) is None       # entered in the router all the same
    editor.config = unike.UniKEConfig()                   # as an editor of a version before routing saved it
    editor.save(tmp_path / "s")
    editor.detach()
    _as_older(tmp_path / "s", "router.", ("route", "route_question", "route_image", "scoped_negatives"))
    with pytest.warns(UserWarning, match="before edits were routed"):
        old = unike.UniKE.load(model, processor, tmp_path / "s")
    assert old.config.route is False and old.n_edits == 1 and old.scope.route(torch.zeros(1, 1, 1)) is None
    assert unike.answer(model, processor, case.image, case.prompt) == case.target
    old.detach()


def _as_older(folder, prefix: str, fields=()) -> None:
    """Rewrite a saved editor as an older version wrote it: without the tensors named `prefix...` and
    without the config `fields`."""
    saved = load_file(str(folder / "unike.safetensors"))
    save_file({k: v for k, v in saved.items() if not k.startswith(prefix)}, str(folder / "unike.safetensors"))
    meta = json.loads((folder / "unike.json").read_text())
    meta["sha256"] = hashlib.sha256((folder / "unike.safetensors").read_bytes()).hexdigest()
    for name in fields:
        meta["config"].pop(name)
    (folder / "unike.json").write_text(json.dumps(meta))


@pytest.mark.slow
def test_router_saved_without_negative_features_loads(tmp_path):
    """A router saved before it kept its fit negatives' features loads; new edits then train against every
    fit negative (counted as reached), as before."""
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    cases = world.edit_cases("vqa", n=2, seed=22)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(scoped_negatives=True))
    editor.fit(world.triplets(n=32, seed=3), progress=False)
    assert len(editor.router.negatives) == len(editor.layers[editor.layer_ids[0]].negatives) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor.edit(cases[0])
    editor.save(tmp_path / "s")
    editor.detach()
    _as_older(tmp_path / "s", "router.negative", ("scoped_negatives",))
    old = unike.UniKE.load(model, processor, tmp_path / "s")
    try:
        assert len(old.router.negatives) == 0 and old.router.edits == 1
        scope = old.router.negative_scope(torch.ones(1, old.stack.hidden_size), None, 32,
                                          torch.zeros(0, old.stack.hidden_size))
        assert scope[:32].all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old.edit(cases[1])
        assert unike.answer(model, processor, cases[1].image, cases[1].prompt) == cases[1].target
    finally:
        old.detach()
