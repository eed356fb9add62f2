"""The latent memory read by the attention heads (`latent_read="heads"`, `unike.reading`): each head's
attention over the retrieved entries by hand (grouped key heads included); on the tiny model, a token with
one open entry gets exactly what the output shift gives it (one entry: each head reads its value, and
o_proj of the heads' values is the entry's Attn(h_pos, h_pos, h_pos)); the entries keep the layer's own
key and value at position 0; and detach gives the attention module its config and function back."""
import math

import pytest
import torch

import unike
from guard import FAST
from unike.reading import NAME, dispatches, read_heads


def test_read_heads_by_hand():
    """Two query heads sharing one key head; entries 0 and 1 of 3 count."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])                         # [m=1, h=2, e=2]
    k = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]], [[5.0, 5.0]]]])        # [m, k=3, g=1, e]
    v = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]], [[9.0, 9.0]]]])
    use = torch.tensor([[True, True, False]])
    out = read_heads(q, k, v, use, scaling=0.5)
    for h, (a, b) in enumerate([(1.0 * 0.5, 0.0), (2.0 * 0.5, 2.0 * 0.5)]):   # q_h·k_0·s, q_h·k_1·s
        w0 = math.exp(a) / (math.exp(a) + math.exp(b))
        want = [w0 * 1.0, (1 - w0) * 3.0]
        assert torch.allclose(out[0, h], torch.tensor(want), atol=1e-6), (h, out[0, h], want)


@pytest.fixture(scope="module")
def pair():
    """Two editors on two copies of the tiny model, one edit each: shift and heads."""
    world = unike.SynthWorld(seed=0)
    case = world.edit_cases("vqa", n=1, seed=5)[0]
    triplets = world.triplets(n=32, seed=3)
    out = {}
    for read in ("shift", "heads"):
        model, processor = unike.load_tiny()
        editor = unike.UniKE(model, processor, unike.UniKEConfig(**FAST, latent_read=read))
        editor.fit(triplets, progress=False)
        editor.edit(case)
        out[read] = editor
    yield out, case
    for editor in out.values():
        editor.detach()


def test_one_open_entry_reads_as_the_shift(pair):
    editors, case = pair
    shift, heads = editors["shift"], editors["heads"]
    assert heads.layers[heads.layer_ids[0]].reads_heads and not shift.layers[shift.layer_ids[0]].reads_heads
    for l in heads.layer_ids:
        assert heads.memory[l].head_keys.shape == (33, 128) and shift.memory[l].head_keys.shape == (33, 0)
        assert torch.equal(heads.memory[l].attn_values, shift.memory[l].attn_values)
    # the same neurons, so that only the reading differs
    for l in heads.layer_ids:
        for name in ("keys", "bias", "values"):
            getattr(heads.neurons[l], name).data.copy_(getattr(shift.neurons[l], name).data)
    inputs = {k: v for k, v in heads._inputs(case).items() if k != "labels"}
    with torch.no_grad():
        a, b = shift.model(**inputs).logits, heads.model(**inputs).logits
        decision = heads.edits.switch.decision
        with heads.disabled():
            base = heads.model(**inputs).logits
    assert decision.open.any() and (decision.alpha > 0).any()          # the memory acted
    assert not torch.allclose(a, base, atol=1e-3)
    assert (a - b).abs().max() < 1e-4, float((a - b).abs().max())


def test_detach_gives_the_attention_back(pair):
    editors, _ = pair
    editor = editors["heads"]
    attn = editor.stack[editor.layer_ids[0]].attn
    assert dispatches(attn) and attn.config._attn_implementation == NAME
    model = unike.load_tiny()[0]
    other = model.model.language_model.layers[editor.layer_ids[0]].self_attn
    assert other.config._attn_implementation != NAME            # another model is untouched
    config = editor.model.model.language_model.config
    editor.detach()
    assert attn.config is config and attn.config._attn_implementation != NAME
