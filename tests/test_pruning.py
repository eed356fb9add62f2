"""The shortcuts give what the full computation gives: retrieval pruned by the rank-r bound (and its
certified shortlist) against the full scan, and the split committed/pending neuron blocks against the
concatenated formula, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import unike
from unike.data.case import load_image
from unike.neurons import NeuronPatch
from unike.prompting import collate, encode, on_model, pad_id_of


@pytest.fixture(scope="module")
def tiny():
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(edit_steps=10))
    editor.fit(world.triplets(n=300, seed=3), progress=False)      # 300 entries > 4K: the bound prunes
    cases = world.edit_cases("vqa", n=6, seed=5)
    editor.edit(cases[0])
    encs = [encode(processor, load_image(c.image), c.prompt, c.target) for c in cases]
    batch = on_model(collate(encs, pad_id_of(processor), side="right"), model)
    batch.pop("labels")
    yield editor, batch
    editor.detach()


def _queries(editor, batch) -> dict:
    """Each edited layer's unit-norm standardised queries in one forward of `batch`."""
    seen, handles = {}, []
    for l, mem in editor.memory.items():
        hook = lambda mod, args, l=l: seen.__setitem__(l, args[1].reshape(-1, args[1].shape[-1]).float())  # noqa: E731
        handles.append(mem.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            editor.model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {l: F.normalize(editor.memory[l].spaces.standardize(x), dim=-1) for l, x in seen.items()}


def test_pruned_forward_equals_full_retrieval(tiny):
    editor, batch = tiny
    with torch.no_grad():
        pruned = editor.model(**batch).logits
        with editor.full_retrieval():
            assert not any(m.prune for m in editor.memory.values())
            full = editor.model(**batch).logits
    # the same computation on fewer rows: equal up to float rounding (BLAS sums a subset's rows in another order)
    assert (pruned - full).abs().max() < 1e-4
    assert torch.equal(pruned.argmax(-1), full.argmax(-1))
    assert all(m.prune for m in editor.memory.values())


def test_bound_never_prunes_a_token_the_full_scan_lets_through(tiny):
    editor, batch = tiny
    opened = 0
    for l, q in _queries(editor, batch).items():
        mem = editor.memory[l]
        rows = mem.open_rows(q)
        passing = (mem.retrieve(q)[0][:, 0] >= mem.min_similarity).nonzero().squeeze(1)
        assert set(passing.tolist()) <= set(rows.tolist()), f"layer {l}: the bound pruned a passing token"
        assert len(rows) < len(q) / 2, f"layer {l}: the bound pruned little ({len(rows)} of {len(q)} open)"
        opened += len(rows)
        assert mem.retrieved == (len(rows), len(q))           # what the last forward (in _queries) did
        coords = mem._open(q)[1]
        if coords is not None and len(rows):                 # the certified shortlist: the exact top-K set
            assert torch.equal(mem.top_indices(q[rows], coords), mem.retrieve(q[rows])[1].sort(1).values)
    assert opened > 0, "no token retrieved: the edit's own question should"


def test_full_retrieval_restores_pruning_after_an_error(tiny):
    editor, _ = tiny
    with pytest.raises(KeyError):
        with editor.full_retrieval():
            raise KeyError("boom")
    assert all(m.prune for m in editor.memory.values())


def test_shortlist_finds_the_exact_top_k_of_near_and_far_queries(tiny):
    editor, _ = tiny
    mem = editor.memory[editor.layer_ids[-1]]
    gen = torch.Generator().manual_seed(0)
    near = F.normalize(mem.keys[:20] + 0.05 * torch.randn(20, mem.keys.shape[1], generator=gen), dim=-1)
    far = F.normalize(torch.randn(20, mem.keys.shape[1], generator=gen), dim=-1)
    q = torch.cat([near, far])
    coords = mem._parts(q, mem._index()["basis"])
    assert torch.equal(mem.top_indices(q, coords), mem.retrieve(q)[1].sort(1).values)


def _patch(d=16, n=4, edits=3, seed=0):
    torch.manual_seed(seed)
    patch = NeuronPatch(d, n)
    for _ in range(edits):
        patch.begin(torch.randn(d, n), torch.randn(n) - 0.5, use_zeta=False)
        patch.pending["v"].data.normal_()
        patch.commit()
    patch.zeta = torch.randn_like(patch.zeta)
    return patch


def _reference(patch, x):
    keys, bias, values, zeta = patch.parts()
    a = torch.relu(x @ keys + bias)
    return a @ values + a.unflatten(-1, (-1, patch.n)).sum(-1) @ (patch.beta * zeta)


def test_neuron_blocks_match_the_concatenated_formula_with_gradients():
    patch = _patch()
    patch.begin(torch.randn(16, 4), torch.randn(4), use_zeta=False)
    patch.pending["v"].data.normal_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, ref = patch(x), _reference(patch, x)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    wrt = [x, patch.pending["k"], patch.pending["b"], patch.pending["v"]]
    for got, want in zip(torch.autograd.grad((out * g).sum(), wrt), torch.autograd.grad((ref * g).sum(), wrt)):
        assert torch.allclose(got, want, atol=1e-5)


def test_committed_neurons_alone_are_the_formula_exactly():
    patch = _patch()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(patch(x), _reference(patch, x))
