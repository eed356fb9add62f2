"""UniKE on the shipped tiny VLM, on a fixed seed (held-out renderings): one-step VQA and captions,
sequential K=20, one edit end to end, the base row."""
import time
import warnings

import pytest

import unike

pytestmark = pytest.mark.slow
FIVE = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


@pytest.fixture(scope="module")
def setup():
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor)
    editor.fit(world.triplets(n=2000, seed=3), progress=False)
    yield model, processor, world, editor
    editor.detach()


def _evaluate(editor, cases, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unike.evaluate(editor, cases, progress=False, **kw)


# Measured on this fixed seed (n=50 held-out cases each, token_acc); a score may fall 3 points below it
# (float rounding differs between CPUs, and one case is 2 points). Where two machines gave different scores
# for the same code, the lower is kept: captions' ci_loc was 94 on one and 88 on another (3 cases of 50
# flip with the rounding of 60 training steps). The targets are rel 97 / t_gen 95 / m_gen 93 /
# t_loc 97 / m_loc 95 / ci 90 / ri 90.
MEASURED = {   # with the router (route=True); unrouted: vqa 100/100/98/98/98, ci 90, ri 98
    "vqa": dict(rel=100, t_gen=100, m_gen=96, t_loc=100, m_loc=100, ci_loc=100, ri_loc=98),
    "caption": dict(rel=99.7, t_gen=94.9, m_gen=93.4, t_loc=100, m_loc=100, ci_loc=100, ri_loc=100),
}


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_one_step_scores(setup, task):
    _, _, world, editor = setup
    s = _evaluate(editor, world.edit_cases(task, n=50, seed=11))
    print(task, {k: round(v, 1) for k, v in s.items()}, flush=True)
    low = {k: v for k, v in s.items() if v < MEASURED[task][k] - 3}
    assert not low, f"{task}: {low} fell more than 3 points below the measured {MEASURED[task]}"


def test_sequential_k20_mean_of_five(setup):
    _, _, world, editor = setup
    s = _evaluate(editor, world.edit_cases("vqa", n=20, seed=12), mode="sequential", k=20)
    print("sequential", {k: round(v, 1) for k, v in s.items()}, flush=True)
    assert sum(s[k] for k in FIVE) / 5 >= 91, s   # target 90; measured 94.0 (91.0 unrouted; 3-point allowance)


def test_edit_answers_target_and_detach_restores(setup):
    model, processor, world, editor = setup
    case = world.edit_cases("vqa", n=1, seed=13)[0]
    editor.reset()
    with editor.disabled():
        before = unike.answer(model, processor, case.image, case.prompt)
    t = time.perf_counter()
    editor.edit(case)
    seconds = time.perf_counter() - t
    assert unike.answer(model, processor, case.image, case.prompt) == case.target
    assert unike.answer(model, processor, case.rephrase_image, case.rephrase_prompt) == case.target
    editor.reset()
    assert unike.answer(model, processor, case.image, case.prompt) == before
    print(f"one edit: {seconds:.2f} s")


def test_base_row(setup):
    model, processor, world, _ = setup
    s = unike.evaluate(model, world.edit_cases("vqa", n=10, seed=11), processor=processor, progress=False)
    assert s["rel"] <= 10 and s["t_loc"] == 100 and s["m_loc"] == 100


def _greedy(model, processor, probes):
    return [unike.answer(model, processor, image, prompt) for image, prompt in probes]


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_unrelated_answers_after_20_edits(setup, task):
    """What a user sees: the greedy answers of 30 never-edited cases' questions (text-only, another image,
    their own image) after 20 sequential edits. No answer may run on past where it stopped before (the
    defect was edits' answer-internal neurons firing at every answer's end: "moss" -> "moss the desert
    the ..."). Measured with the router: 2/90 answers changed after 20 caption edits, 6/90 after 20 VQA
    edits, 3 of which ask the very entity and fact an edit changed (this world's lists are not
    sequence-safe); no edited answer runs on. Unrouted: 3/90 and 11/90, and 2 of the 20 edited captions
    ran on (later caption edits firing inside earlier ones' answers)."""
    model, processor, world, editor = setup
    cases = world.edit_cases("vqa", n=30, seed=77)
    probes = [p for c in cases for p in ((None, c.loc_prompt), (c.mloc_image, c.mloc_prompt), (c.image, c.prompt))]
    editor.reset()
    with editor.disabled():
        before = _greedy(model, processor, probes)
    edits = world.edit_cases(task, n=20, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in edits:
            editor.edit(case)
    after = _greedy(model, processor, probes)
    edited = _greedy(model, processor, [(c.image, c.prompt) for c in edits])
    editor.reset()
    longer = [(b, a) for b, a in zip(before, after) if len(a.split()) > len(b.split())]
    changed = sum(a != b for a, b in zip(before, after))
    ran_on = [e for e, c in zip(edited, edits) if len(e.split()) > len(c.target.split())]
    print(task, f"changed {changed}/90, edited answers run on {len(ran_on)}/20", flush=True)
    assert not longer, f"answers ran on after {task} edits: {longer[:5]}"
    assert changed <= {"caption": 5, "vqa": 9}[task], f"{changed}/90 unrelated answers changed"
    assert len(ran_on) <= 1, ran_on
