"""The shortcuts give what the full computation gives: retrieval restricted to relevant tokens against
every token retrieving, the relevance match through the index against its definition, and the split
committed/pending neuron blocks against the concatenated formula, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import unike
from unike.data.case import load_image
from unike.neurons import NeuronPatch
from unike.prompting import collate, encode, on_model, pad_id_of


@pytest.fixture(scope="module")
def tiny(tiny_states):
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(edit_steps=10))
    editor.fit_states(tiny_states, progress=False)          # = fit(world.triplets(n=300, seed=3))
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_only_relevant_tokens_retrieve_and_relevance_is_the_index_match(tiny):
    """Where the memory acts is decided once, at the first edited layer: tokens whose best fitted match (in
    the index) reaches its gate, and tokens where an edit is open (its router gate); every layer retrieves
    for exactly those."""
    editor, batch = tiny
    spared = 0
    queries = _queries(editor, batch)
    decision = editor.edits.switch.decision
    acts = decision.relevant | decision.open.any(1)
    for l, q in queries.items():
        mem = editor.memory[l]
        n_fit = int(mem.n_fit)
        # the match by definition: fitted entries through the index, the edits' entries by exact cosine
        ix = mem.index
        want = torch.cat([(q @ ix.basis.T) @ ix.coords.T, q @ mem.keys[n_fit:].T], 1).amax(1)
        assert torch.allclose(ix.matches(q, 1, mem.keys, n_fit)[:, 0], want, atol=1e-6)
        fitted = (q @ ix.basis.T) @ ix.coords.T
        assert torch.equal(ix.relevant(q, mem.keys[:n_fit], n_fit, mem.min_similarity),
                           fitted.amax(1) >= mem.min_similarity)
        if l == editor.layer_ids[0]:
            assert torch.equal(decision.relevant, fitted.amax(1) >= mem.min_similarity)
        # the tokens whose fitted matches cannot reach the gate (|q_r|·max|k_r| below it) skip the index scan
        spared += int(((q @ ix.basis.T).norm(dim=1) * ix.coords.norm(dim=1).max() < mem.min_similarity).sum())
        assert mem.retrieved == (int(acts.sum()), len(q))       # what the last forward (in _queries) did
    assert 0 < acts.sum() < len(acts) / 2, f"{int(acts.sum())} of {len(acts)} tokens act"
    assert decision.open.any(), "the edit's own question should open its entry"
    assert spared > 0, "every token scanned the index: the norm bound spared none"


@pytest.mark.slow
def test_index_holds_the_fitted_keys_almost_whole(tiny):
    editor, _ = tiny
    for l, mem in editor.memory.items():
        ix = mem.index
        r = ix.basis.shape[0]
        assert r == min(editor.config.index_rank, int(mem.n_fit), mem.keys.shape[1])
        assert torch.allclose(ix.basis @ ix.basis.T, torch.eye(r), atol=1e-4)      # orthonormal
        assert torch.allclose(ix.coords, mem.keys[:int(mem.n_fit)] @ ix.basis.T)
        # the fitted keys' cosine with themselves, as the index sees it: most of it
        assert ix.coords.norm(dim=1).pow(2).median() > 0.9, f"layer {l}: the index misses the fitted keys"


@pytest.mark.slow
def test_fitted_entries_join_the_index_and_edits_are_refused_before_them(tiny):
    editor, _ = tiny
    mem = editor.memory[editor.layer_ids[0]]
    d, n_fit, n = mem.keys.shape[1], int(mem.n_fit), len(mem)
    assert n > n_fit                                              # the fixture's edit is in the memory
    with pytest.raises(RuntimeError, match="reset"):
        mem.add(*(torch.randn(2, d) for _ in range(3)), fitted=True)
    assert (len(mem), int(mem.n_fit)) == (n, n_fit)              # refused before anything changed


def _exact(mem, q):
    """Every entry's exact top-K (the scan), as sorted indices and similarities."""
    sims, idx = mem.index.scan(q, min(mem.top_k, len(mem)), mem.keys)
    return idx.sort(1).values, sims


@pytest.mark.slow
def test_retrieval_through_the_index_is_the_exact_top_k(tiny, monkeypatch):
    editor, batch = tiny
    for l, q in _queries(editor, batch).items():
        mem = editor.memory[l]
        n_fit = int(mem.n_fit)
        ix = mem.index
        assert torch.allclose(ix.residual, (mem.keys[:n_fit] - ix.coords @ ix.basis).norm(dim=1), atol=1e-6)
        want = [_exact(mem, row) for row in q.split(1)]
        with monkeypatch.context() as m:     # one token at a time, as a relevant token: shortlisted, never scanned
            m.setattr(type(mem.index), "scan", lambda *a: pytest.fail("the shortlist fell back to a scan"))
            got = [mem.retrieve(row) for row in q.split(1)]
        for (sims, idx), (want_idx, want_sims) in zip(got, want):
            assert torch.equal(idx.sort(1).values, want_idx)
            assert torch.allclose(sims, want_sims, atol=1e-6)
        sims, idx = mem.retrieve(q)          # the whole batch (shortlisted or scanned): the same
        assert torch.equal(idx.sort(1).values, torch.cat([i for i, _ in want]))


@pytest.mark.parametrize("outside", [0.05, 1.0], ids=["near-the-index", "far-from-it"])
def test_shortlist_is_exact_whatever_lies_outside_the_index(outside):
    """Keys of rank 8 plus noise of norm ~`outside`, edits' entries appended, queries near and far from
    the keys: the shortlisted top-K is the scan's."""
    from unike.memory import LatentMemory
    from unike.spaces import Spaces

    torch.manual_seed(0)
    d, n = 64, 3000
    mem = LatentMemory(d, Spaces(d, hidden=8, truth_dim=4), top_k=10, index_rank=8)
    mem.spaces.standardize.fit(torch.randn(100, d))
    low = torch.randn(n, 8) @ torch.randn(8, d)
    mem.add(low + outside * low.norm(dim=1, keepdim=True) / d ** 0.5 * torch.randn(n, d), *torch.randn(2, n, d),
            fitted=True)
    mem.reindex()
    mem.add(*torch.randn(3, 20, d))
    q = mem.unit(torch.cat([low[:50] + 0.1 * torch.randn(50, d), torch.randn(50, d)]))
    for block in (q, *q.split(1)):
        idx = mem.retrieve(block)[1]
        assert torch.equal(idx.sort(1).values, _exact(mem, block)[0])


def test_what_a_decision_opens_is_kept_for_that_decision():
    """`LatentMemory.select` keeps where a decision has it act (`_acting`) for that very decision, as an
    edit's steps and deeper layers share one: a repeat reuses it and retrieves the same; an equal decision in
    other tensors, or masked entries, make it anew."""
    from unike.memory import Decision, LatentMemory
    from unike.spaces import Spaces

    torch.manual_seed(0)
    d, n = 16, 12
    mem = LatentMemory(d, Spaces(d, hidden=8, truth_dim=4), top_k=3)
    mem.spaces.standardize.fit(torch.randn(100, d))
    mem.add(*torch.randn(3, 200, d), fitted=True)
    mem.reindex()
    for e in range(3):
        mem.add(*torch.randn(3, 2, d), edit=e)
    x = torch.randn(n, d)
    decision = mem.decide(mem.unit(x), torch.rand(n, 3) > 0.6)
    first = mem.select(x, decision)
    kept = mem._acting_cache[3]
    again = mem.select(x, decision)
    assert mem._acting_cache[3] is kept
    copied = mem.select(x, Decision(decision.relevant.clone(), decision.open.clone()))
    assert mem._acting_cache[3] is not kept
    for a, b, c in zip(first, again, copied):
        assert torch.equal(a, b) and torch.equal(a, c)
    mem.mask(torch.tensor([0, 1]))
    masked = mem._acting_cache[3]
    mem.select(x, decision)
    assert mem._acting_cache[3] is not masked


def test_a_gate_that_lets_no_edit_through_leaves_the_committed_block_out():
    """While an edit trains, a gate that lets no committed edit through (the common case at deeper layers
    after many edits) computes the pending edit's block only, what it lets through kept for that gate."""
    patch, x = _dense()
    patch.begin(torch.randn(16, 4), torch.randn(4))
    patch.pending["v"].data.normal_()
    shut = torch.zeros(*x.shape[:-1], patch.edits, dtype=torch.bool)
    blocks = []
    block = patch._block
    patch._block = lambda *a, **k: blocks.append(a[1].shape[1]) or block(*a, **k)
    out = patch(x, shut)
    p = patch.pending
    a = torch.relu(x @ p["k"] + p["b"])
    want = a @ p["v"] + a.sum(-1, keepdim=True) * patch.pending_zeta()
    assert torch.allclose(out, want, atol=1e-5) and blocks == [4]            # the pending edit's 4 neurons only
    through = patch._through_cache[3]
    patch(x, shut)
    assert patch._through_cache[3] is through and not len(through)
    patch.discard()
    assert torch.equal(patch(x, shut), torch.zeros_like(x))
    assert blocks[-1] == patch.keys.shape[1]    # outside training the block runs: `activation` sees every neuron


def _patch(d=16, n=4, edits=3, seed=0, sparse=False):
    """Committed random edits; `sparse`: each edit's neurons lie close to one key (a small ρ_e) and fire
    only near it (a high threshold)."""
    torch.manual_seed(seed)
    patch = NeuronPatch(d, n)
    for _ in range(edits):
        if sparse:
            patch.begin(torch.randn(d, 1) + 0.05 * torch.randn(d, n), -12.0 + 0.1 * torch.randn(n))
        else:
            patch.begin(torch.randn(d, n), torch.randn(n) - 0.5)
        patch.pending["v"].data.normal_()
        patch.commit()
    patch.zeta = torch.randn_like(patch.zeta)
    return patch


def _reference(patch, x):
    keys, bias, values, zeta = patch.parts()
    a = torch.relu(x @ keys + bias)
    return a @ values + a.unflatten(-1, (-1, patch.n)).sum(-1) @ (patch.beta * zeta)


def _dense():
    """Random neurons: every committed edit may fire, all run."""
    return _patch(), torch.randn(2, 5, 16)


def _sparse():
    """Silent edits and one input row that fires edit 5: only the reachable edits run."""
    patch = _patch(edits=12, sparse=True)
    x = torch.randn(2, 5, 16) * 0.3
    x[0, 2] = 2 * patch.keys[:, 5 * patch.n]
    return patch, x


@pytest.mark.parametrize("case", [_dense, _sparse], ids=["every-edit", "reachable-edits"])
def test_neuron_blocks_match_the_concatenated_formula_with_gradients(case):
    patch, x = case()
    patch.begin(torch.randn(16, 4), torch.randn(4))
    patch.pending["v"].data.normal_()
    x.requires_grad_(True)
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


def _firing_edits(patch, x):
    keys, bias, _, _ = patch.parts()
    return ((x.reshape(-1, x.shape[-1]) @ keys + bias > 0).unflatten(1, (-1, patch.n)).any(2).any(0)
            .nonzero().squeeze(1).tolist())


def test_only_reachable_edits_run_and_the_output_is_the_formula():
    patch = _patch(edits=12, sparse=True)
    x = torch.randn(2, 5, 16) * 0.3
    x[0, 1] = 2 * patch.keys[:, 3 * patch.n]                  # fires edit 3
    x[1, 4] = 2 * patch.keys[:, 7 * patch.n + 1]              # fires edit 7
    reach = patch.reachable(x)
    firing = set(_firing_edits(patch, x))
    assert {3, 7} <= firing <= set(reach.tolist()) and len(reach) < patch.edits / 2
    seen = []
    handle = patch.activation.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        out = patch(x)
    handle.remove()
    assert seen == [torch.Size([2, 5, patch.keys.shape[1]])]      # nnsight still reads every neuron
    assert torch.allclose(out, _reference(patch, x), atol=1e-5)
    assert patch.reachable(torch.zeros(3, 16)).numel() == 0
    assert torch.equal(patch(torch.zeros(3, 16)), torch.zeros(3, 16))


def test_the_bound_follows_new_edits_and_keys_changed_in_place():
    patch = _patch(edits=12, sparse=True)
    x = 2 * patch.keys[:, :1].T.clone()                    # fires edit 0 only
    assert 0 in patch.reachable(x).tolist()
    with torch.no_grad():
        patch.keys[:, :patch.n] *= -1                      # in place: edit 0 now points away
    assert 0 not in patch.reachable(x).tolist()
    assert torch.allclose(patch(x), _reference(patch, x), atol=1e-5)
    patch.begin(x.T.repeat(1, patch.n) / x.pow(2).sum(), torch.zeros(patch.n))
    patch.commit()                                         # a new edit that fires on x
    assert patch.edits - 1 in patch.reachable(x).tolist()


def test_a_commit_carries_the_kept_bound_over_and_it_equals_the_bound_made_anew():
    patch, x = _sparse()
    patch.reachable(x)                                     # the bound is kept
    patch.begin(torch.randn(16, patch.n), torch.randn(patch.n))
    patch.commit()
    carried = patch._bound_cache[3]
    assert carried[0].shape[1] == patch.edits              # carried over, the new edit's part appended
    assert all(torch.equal(a, b) for a, b in zip(carried, patch._bounds(patch.keys, patch.bias)))
    assert patch._bound() is carried
    with torch.no_grad():
        patch.bias[0] += 1.0                               # changed in place: made anew
    assert patch._bound() is not carried


def test_gathered_neurons_are_reused_between_steps_and_follow_changes():
    patch, x = _sparse()
    patch.begin(torch.randn(16, 4), torch.randn(4))      # training: the compact path
    out = patch(x)
    kept = patch._gather_cache[3]
    assert torch.equal(patch(x), out) and patch._gather_cache[3] is kept     # the next step reuses the copies
    with torch.no_grad():
        patch.values.mul_(2)                                                 # in place: copied again
    assert torch.allclose(patch(x), _reference(patch, x), atol=1e-5) and patch._gather_cache[3] is not kept
    patch.commit()
    assert torch.allclose(patch(x), _reference(patch, x), atol=1e-5)


@pytest.mark.parametrize("case", [_dense, _sparse], ids=["every-edit", "reachable-edits"])
def test_gated_neurons_are_the_formula_with_gated_activations(case):
    """NeuronPatch(q, gate): each committed edit's activations times its gate (the router's g_e), the
    edits gated off everywhere left out of the computation; the pending edit is never gated."""
    patch, x = case()
    gate = torch.rand(*x.shape[:-1], patch.edits) > 0.5
    gate[0, 2, 5 % patch.edits] = True
    keys, bias, values, zeta = patch.parts()
    a = torch.relu(x @ keys + bias) * gate.repeat_interleave(patch.n, -1)
    want = a @ values + a.unflatten(-1, (-1, patch.n)).sum(-1) @ (patch.beta * zeta)
    assert torch.allclose(patch(x, gate), want, atol=1e-5)
    assert torch.equal(patch(x, torch.zeros_like(gate)), torch.zeros_like(x))
    live = patch.reachable(x, gate)
    assert live is None or set(live.tolist()) <= set(gate.flatten(0, 1).any(0).nonzero().flatten().tolist())
