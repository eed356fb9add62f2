"""Where the latent memory acts (docs/method.md, "Relevance and α"): decided once at the first edited layer,
whose states no edit has moved, and reused by the deeper ones. On the shipped tiny model, after one edit:
the edit's question opens its entry with α ≥ 0.5 at every edited layer, unrelated probes get α = 0 on every
token, the fit entries of the fact the edit changed leave retrieval until `reset`, and a fixed α (Fig. 4b)
is applied to every token as given."""
import pytest
import torch

import unike
from unike.data.case import load_image
from unike.hooks import Hooks
from unike.metrics import EDIT_METRICS, LOC_METRICS, probes
from unike.prompting import encode, on_model


@pytest.fixture(scope="module")
def tiny(tiny_states):
    model, processor = unike.load_tiny()
    editor = unike.UniKE(model, processor, unike.UniKEConfig(edit_steps=10))
    editor.fit_states(tiny_states, progress=False)           # = fit(world.triplets(n=300, seed=3))
    yield editor, unike.SynthWorld(seed=0)
    editor.detach()


def _alphas(editor, image, prompt) -> dict[int, torch.Tensor]:
    """α of every token of one prompt, per edited layer (the output of `unike_memory.alpha`)."""
    seen = {}
    with Hooks() as hooks, torch.no_grad():
        for l in editor.layer_ids:
            hooks.forward(editor.stack[l].block.unike_memory.alpha, lambda m, a, out, l=l: seen.__setitem__(l, out))
        editor.model(**on_model(encode(editor.processor, load_image(image), prompt), editor.model))
    return seen


@pytest.mark.parametrize("seed", [7, 8])
def test_alpha_opens_on_the_edit_and_stays_shut_elsewhere(tiny, seed):
    editor, world = tiny
    case = world.edit_cases("vqa", n=1, seed=seed)[0]
    editor.reset().edit(case)
    try:
        for p in probes(case):
            alphas = _alphas(editor, p.image, p.prompt)
            first = alphas[editor.layer_ids[0]]
            for l, a in alphas.items():
                assert torch.equal(a, first), f"layer {l}: α is decided at the first edited layer"
            if p.metric == "rel":
                assert first[-1] >= 0.5, f"the edit's own question: α = {first[-1]:.3f}"
            elif p.metric in LOC_METRICS:
                assert first.mean() <= 0.1, f"{p.metric}: mean α {first.mean():.3f} over its tokens"
            assert p.metric in EDIT_METRICS or p.metric in LOC_METRICS
    finally:
        editor.reset()


def test_the_fit_entries_of_a_changed_fact_leave_retrieval_until_reset(tiny):
    editor, world = tiny
    t = world.triplets(n=300, seed=3)[5]                 # a fit triplet's own fact, edited to its wrong answer
    inputs = encode(editor.processor, load_image(t.image), t.question, t.wrong)
    editor.reset().edit(inputs)
    try:
        for l, mem in editor.memory.items():
            masked = mem.masked.nonzero().squeeze(1)
            assert 5 in masked.tolist(), f"layer {l}: the edited fit row is masked"
            assert len(masked) < int(mem.n_fit) // 20, f"layer {l}: {len(masked)} rows masked"
            q = mem.unit(torch.randn(64, mem.keys.shape[1]) * mem.spaces.standardize.std + mem.spaces.standardize.mean)
            q = torch.cat([q, mem.keys[masked]])         # queries at the masked entries themselves
            idx = mem.fitted_top(q)
            assert not mem.masked[idx].any() and idx.shape[1] == mem.top_k
    finally:
        editor.reset()
    assert not any(mem.masked.any() for mem in editor.memory.values())


def test_fixed_alpha_is_applied_to_every_token(tiny_states):
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    with unike.UniKE(model, processor, unike.UniKEConfig(fixed_alpha=0.4)) as editor:
        editor.fit_states(tiny_states, progress=False)
        case = world.edit_cases("vqa", n=1, seed=9)[0]
        for l, a in _alphas(editor, case.image, case.prompt).items():
            assert torch.equal(a, torch.full_like(a, 0.4)), f"layer {l}"


def test_an_edit_in_training_opens_where_its_gate_will(tiny):
    """While an edit is trained its memory entry opens where the router will let the edit through once it is
    committed (`Scope.pending_gate`), so the neurons learn beside the shift they will meet."""
    editor, world = tiny
    case = world.edit_cases("vqa", n=1, seed=11)[0]
    editor.reset()
    block, switch, seen = editor.stack[editor.layer_ids[0]].block, editor.edits.switch, []
    try:
        with Hooks() as hooks:
            hooks.forward(block, lambda m, a, o: seen.append(switch.pending))
            editor.edit(case)
        during = next(p for p in seen if p is not None)
        inputs = {k: v for k, v in editor._inputs(case).items() if k != "labels"}
        with torch.no_grad():
            editor.model(**inputs)
        after = switch.gate[..., -1]
        assert during.any() and not during.all()
        assert torch.equal(during, after)
    finally:
        editor.reset()
