"""Exactness under edits on the tiny model: a batch of different cases, right-padded (teacher forcing, as
`evaluate` does) or left-padded (as `generate` does), gives each sample what it gets alone; generation
with and without the KV cache agrees; two editors on two models do not interfere.

Tolerance (docs/reliability.md): logits within ATOL of the sample alone and the same argmax everywhere;
generated tokens identical. Measured on this CPU over six batches of 3-4 edited cases: right padding at
most 1.2e-5 (often 0), left padding at most 3.9e-4 (7.6e-6 with the editor disabled). Padding changes the
shapes of the matrix products and, on the left, the real tokens' positions, so float rounding differs;
the memory's retrieval (standardised states, top-K softmax at temperature 0.1) magnifies that a little.
"""
import pytest
import torch

import unike
from guard import FAST, logits, tiny_probe
from unike.prompting import collate, encode, pad_id_of

ATOL = 1e-3


@pytest.fixture(scope="module", params=["shift", "heads"])
def edited(request):
    """Three edited cases, the memory read by the output shift or by the attention heads."""
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    cases = world.edit_cases("vqa", n=2, seed=5) + world.edit_cases("caption", n=1, seed=6)
    editor = unike.UniKE(model, processor, unike.UniKEConfig(**FAST, latent_read=request.param))
    editor.fit(world.triplets(n=32, seed=3), progress=False)
    for case in cases:
        editor.edit(case)
    yield model, processor, cases, editor
    editor.detach()


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_different_cases_matches_each_alone(edited, side):
    model, processor, cases, editor = edited
    encs = [encode(processor, c.image, c.prompt, c.target) for c in cases]
    batch = collate(encs, pad_id_of(processor), side=side)
    batch.pop("labels")
    together = logits(model, batch)
    with editor.disabled():
        assert not torch.equal(together, logits(model, batch))      # the edits are in play
    worst = 0.0
    for i, enc in enumerate(encs):
        alone = logits(model, {k: v for k, v in enc.items() if k != "labels"})[0]
        mine = together[i][batch["attention_mask"][i].bool()]
        worst = max(worst, float((mine - alone).abs().max()))
        assert torch.equal(mine.argmax(-1), alone.argmax(-1)), f"{side} padding, sample {i}"
    print(f"{side} padding: max |logit difference| {worst:.2e}")
    assert worst <= ATOL


def _until_eos(ids, eos):
    ids = ids.tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_generate_batched_cached_or_not_matches_each_alone(edited):
    model, processor, cases, editor = edited
    pad, eos = pad_id_of(processor), processor.tokenizer.eos_token_id
    encs = [encode(processor, c.image, c.prompt) for c in cases]
    batch = collate(encs, pad, side="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        runs = {cache: model.generate(**batch, use_cache=cache, **kw)[:, batch["input_ids"].shape[1]:]
                for cache in (True, False)}
        assert torch.equal(runs[True], runs[False])
        for i, enc in enumerate(encs):
            alone = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:]
            assert _until_eos(runs[True][i], eos) == _until_eos(alone, eos), f"sample {i}"
        with editor.disabled():
            assert not torch.equal(model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:], runs[True])


def test_two_editors_on_two_models_do_not_interfere():
    world = unike.SynthWorld(seed=0)
    (a, processor), (b, _) = unike.load_tiny(), unike.load_tiny()
    probe = tiny_probe(processor, world)
    base = logits(a, probe)
    cases = world.edit_cases("vqa", n=2, seed=7)
    config = unike.UniKEConfig(**FAST)
    alone = []
    for case in cases:                                  # each edit alone, on model a
        editor = unike.UniKE(a, processor, config)
        with pytest.warns(UserWarning):
            editor.edit(case)
        alone.append(logits(a, probe))
        editor.detach()
    first, second = unike.UniKE(a, processor, config), unike.UniKE(b, processor, config)
    with pytest.warns(UserWarning):
        first.edit(cases[0])
    with pytest.warns(UserWarning):
        second.edit(cases[1])
    assert torch.equal(logits(a, probe), alone[0]) and torch.equal(logits(b, probe), alone[1])
    second.detach()
    assert torch.equal(logits(a, probe), alone[0]) and torch.equal(logits(b, probe), base)
    first.detach()
    assert torch.equal(logits(a, probe), base)


def test_inference_mode_gives_what_no_grad_gives(edited):
    """Under `torch.inference_mode` (as the speed bench and many serving loops run), the edited model's
    logits are those under `torch.no_grad`, called twice (what one forward keeps must not outlive it)."""
    model, processor, cases, editor = edited
    batch = collate([encode(processor, c.image, c.prompt) for c in cases], pad_id_of(processor), side="left")
    with torch.no_grad():
        want = model(**batch).logits
    for _ in range(2):
        with torch.inference_mode():
            assert torch.equal(model(**batch).logits, want)
