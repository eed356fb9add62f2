"""Every architecture of the conformance matrix: fit → edit (inputs dict with labels) → generate, and
disabled() / detach() give back the unedited model bit for bit (logits, hooks, state_dict keys): the one
test of detach's exactness for UniKE (the baselines, dtypes and device maps have their own)."""
import dataclasses
import warnings

import pytest
import torch

import unike
from archs import ARCHS
from guard import hooks_of
from labelled import fit_pairs, with_answer

ENCODER_DECODER = {"florence2"}  # the answer lives in decoder_input_ids: refused with a clear error


def test_encoder_decoder_is_refused_clearly():
    for name in ENCODER_DECODER:
        with pytest.raises(NotImplementedError, match="encoder-decoder"):
            unike.UniKE(ARCHS[name]().model)


@pytest.mark.parametrize("name", sorted(set(ARCHS) - ENCODER_DECODER))
def test_fit_edit_generate_detach(name):
    arch = ARCHS[name]()
    model, inputs = arch.model, arch.inputs
    with torch.no_grad():
        out = model.get_output_embeddings()
        if out is not None:  # make the random lm_head's argmax decisive (it is nearly flat after the final norm);
            out.weight = torch.nn.Parameter(out.weight * 30)  # a copy: tied input embeddings stay as they are
        before = model(**inputs).logits.clone()
    hooks, keys = hooks_of(model), list(model.state_dict())
    n = len(unike.locate(model))
    editor = unike.UniKE(model, None, unike.UniKEConfig(layers=min(2, n), encoder_steps=3, min_triplets=8,
                                                          edit_steps=150))
    editor.fit_inputs(fit_pairs(inputs, 8), progress=False)
    batch = with_answer(inputs, [7, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor.edit(batch)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, -labels.shape[1]:]
        assert logits[:, :-1].argmax(-1)[labels[:, 1:] != -100].tolist() == [7, 9]
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert any("unike_" in k for k in model.state_dict())
        with editor.disabled():
            assert torch.equal(model(**inputs).logits, before)
    editor.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert hooks_of(model) == hooks and list(model.state_dict()) == keys
    editor.detach()                                      # idempotent


@pytest.mark.parametrize("name", sorted(set(ARCHS) - ENCODER_DECODER))
def test_training_steps_replay_what_comes_before_the_edited_layers_exactly(name):
    """An edit's steps after the first replay the outputs of what runs before the first edited block
    (`unike.replay`), and the first edited layer holds its memory shift and its committed edits' neurons
    (`EditedLayer._hold`): the editor's state after two edits is bit-identical to running every step in
    full (`replay=False`), at least the decoder blocks below the edited ones were replayed, and the first
    edited layer's memory ran fewer times."""
    arch = ARCHS[name]()
    model, inputs = arch.model, arch.inputs
    n = len(unike.locate(model))
    editor = unike.UniKE(model, None, unike.UniKEConfig(layers=min(2, n), encoder_steps=3, min_triplets=8,
                                                          edit_steps=3, stop_prob=2.0))
    editor.fit_inputs(fit_pairs(inputs, 8), progress=False)
    replay, states, shifts = editor.replay, [], []
    editor.memory[editor.layer_ids[0]].register_forward_hook(lambda *args: shifts.append(1))
    for on in (True, False):
        editor.config = dataclasses.replace(editor.config, replay=on)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            editor.edit(with_answer(inputs, [7, 9]))
            editor.edit(with_answer(inputs, [5, 6]))
        states.append({k: v.clone() for k, v in editor.state().items()})
        shifts.append(None)
        editor.reset()
    assert replay.replayed >= n - 2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[1])
    held_calls, full_calls = shifts.index(None), len(shifts) - shifts.index(None) - 2
    assert held_calls < full_calls, (held_calls, full_calls)
    editor.config = dataclasses.replace(editor.config, replay=True)
    model.train()                          # dropout: other outputs at every step, so nothing is replayed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor.edit(with_answer(inputs, [7, 9]))
    model.eval()
    assert replay.replayed == 0
    editor.detach()


@pytest.mark.parametrize("name", sorted(set(ARCHS) - ENCODER_DECODER))
def test_heads_reading_acts_and_detaches(name):
    """`latent_read="heads"`: where the attention module dispatches through transformers' AttentionInterface,
    the fitted entries keep the layer's key and value per key head and a fixed α reads them in every head;
    disabled() and detach() give the unedited logits back bit for bit and the module its config. Elsewhere
    a warning says the output shift reads them."""
    arch = ARCHS[name]()
    model, inputs = arch.model, arch.inputs
    with torch.no_grad():
        before = model(**inputs).logits.clone()
    stack = unike.locate(model)
    n = len(stack)
    configs = [stack[i].attn.config if hasattr(stack[i].attn, "config") else None for i in range(n)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor = unike.UniKE(model, None, unike.UniKEConfig(layers=min(2, n), encoder_steps=3, min_triplets=8,
                                                              latent_read="heads", fixed_alpha=0.5))
    reads = [editor.layers[l].reads_heads for l in editor.layer_ids]
    assert all(reads) or any("AttentionInterface" in str(w.message) for w in caught)
    editor.fit_inputs(fit_pairs(inputs, 8), progress=False)
    with torch.no_grad():
        for l in editor.layer_ids:
            width = editor.memory[l].head_keys.shape[1]
            assert (width > 0) == editor.layers[l].reads_heads
        assert not torch.equal(model(**inputs).logits, before)          # read in every head (or shifted)
        with editor.disabled():
            assert torch.equal(model(**inputs).logits, before)
    editor.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert all(getattr(stack[i].attn, "config", None) is c for i, c in enumerate(configs))
