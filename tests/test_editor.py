"""Editor mechanics on a random tiny LLaVA: save/load, KV cache, reset, other hooks, nnsight names (detach's
and disabled()'s exactness on every architecture: test_conformance_edit.py)."""
import warnings

import pytest
import torch

import unike
from archs import ARCHS
from labelled import fit_pairs, with_answer

CFG = dict(layers=2, encoder_steps=5, min_triplets=8, edit_steps=30)


@pytest.fixture
def arch():
    arch = ARCHS["llava"]()
    with torch.no_grad():  # a random lm_head is nearly flat after the final norm; make its argmax decisive
        arch.model.get_output_embeddings().weight.mul_(30)
    return arch


def _edited(arch, fit=True, **over):
    editor = unike.UniKE(arch.model, None, unike.UniKEConfig(**{**CFG, **over}))
    if fit:
        editor.fit_inputs(fit_pairs(arch.inputs, 12), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor.edit(with_answer(arch.inputs, [7, 9]))
    return editor


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_edit_before_fit_warns_once(arch):
    editor = unike.UniKE(arch.model, None, unike.UniKEConfig(**CFG))
    with pytest.warns(UserWarning, match="external memory is empty"):
        editor.edit(with_answer(arch.inputs, [7, 9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        editor.edit(with_answer(arch.inputs, [5, 6]))
    assert editor.n_edits == 2


def test_save_load_is_bit_identical(arch, tmp_path):
    editor = _edited(arch)
    edited = _logits(arch.model, arch.inputs)
    editor.save(tmp_path / "state")
    editor.detach()
    again = unike.UniKE.load(arch.model, None, tmp_path / "state")
    assert torch.equal(_logits(arch.model, arch.inputs), edited)
    assert again.n_edits == 1 and again.fitted


def test_generate_same_with_and_without_cache(arch):
    _edited(arch)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = arch.model.generate(**arch.inputs, use_cache=True, **kw)
        fresh = arch.model.generate(**arch.inputs, use_cache=False, **kw)
    assert torch.equal(cached, fresh)


def test_reset_restores_unedited_outputs_and_keeps_memory(arch):
    editor = unike.UniKE(arch.model, None, unike.UniKEConfig(**CFG))
    editor.fit_inputs(fit_pairs(arch.inputs, 12), progress=False)
    fitted = _logits(arch.model, arch.inputs)
    n_fit = len(editor.memory[1])
    editor.edit(with_answer(arch.inputs, [7, 9]))
    assert len(editor.memory[1]) == n_fit + 1
    editor.reset()
    assert len(editor.memory[1]) == n_fit
    assert torch.equal(_logits(arch.model, arch.inputs), fitted)


def test_other_hooks_survive(arch):
    """A plain torch hook registered before attaching, one registered while attached, and an nnsight
    wrapper built before attaching all keep working through attach and detach."""
    from nnsight import NNsight

    before = _logits(arch.model, arch.inputs)
    mlp = arch.model.model.language_model.layers[-1].mlp
    calls = []
    early = mlp.register_forward_hook(lambda m, a, o: calls.append("early"))
    traced = NNsight(arch.model)
    with traced.trace(**arch.inputs):
        plain = traced.model.language_model.layers[-1].mlp.output.save()
    editor = _edited(arch)
    late = mlp.register_forward_pre_hook(lambda m, a: calls.append("late"))
    with traced.trace(**arch.inputs):
        during = traced.model.language_model.layers[-1].mlp.output.save()
        edited = traced.output.logits.save()
    assert torch.equal(edited, _logits(arch.model, arch.inputs)) and not torch.equal(edited, before)
    editor.detach()
    calls.clear()
    with traced.trace(**arch.inputs):
        after = traced.model.language_model.layers[-1].mlp.output.save()
        logits = traced.output.logits.save()
    assert calls == ["late", "early"]
    assert torch.equal(logits, before) and torch.equal(after, plain) and during.shape == plain.shape
    early.remove()
    late.remove()


def test_nnsight_reads_and_steers_alpha_and_neurons(arch):
    from nnsight import NNsight

    editor = _edited(arch)
    layer = editor.layer_ids[-1]
    traced = NNsight(arch.model)
    with traced.trace(**arch.inputs):
        blk = traced.model.language_model.layers[layer]
        alpha = blk.unike_memory.alpha.output.save()
        acts = blk.unike_neurons.activation.output.save()
        logits = traced.output.logits.save()
    assert alpha.shape[0] == arch.inputs["input_ids"].numel()
    assert acts.shape[-1] == editor.neurons[layer].keys.shape[1]
    with traced.trace(**arch.inputs):
        blk = traced.model.language_model.layers[layer]
        blk.unike_memory.alpha.output[:] = 0
        blk.unike_neurons.activation.output[:] = 0
        steered = traced.output.logits.save()
    assert not torch.equal(steered, logits)


def test_bad_layers_and_labels_raise_before_changes(arch):
    before = _logits(arch.model, arch.inputs)
    with pytest.raises(ValueError, match="out of range"):
        unike.UniKE(arch.model, None, unike.UniKEConfig(layers=[0, 99]))
    editor = unike.UniKE(arch.model, None, unike.UniKEConfig(**CFG))
    bad = with_answer(arch.inputs, [7])
    bad["labels"][:] = -100
    with pytest.raises(ValueError, match="no target token"):
        editor.edit(bad)
    with pytest.raises(ValueError, match="at least"):
        editor.fit_inputs(fit_pairs(arch.inputs, 2), progress=False)
    assert torch.equal(_logits(arch.model, arch.inputs), before)


def test_collect_then_fit_states_equals_fit_and_is_reusable(arch):
    editor = unike.UniKE(arch.model, None, unike.UniKEConfig(**CFG))
    editor.fit_inputs(fit_pairs(arch.inputs, 12), progress=False)
    fitted, losses = _logits(arch.model, arch.inputs), editor.losses
    states = editor.collect_inputs(fit_pairs(arch.inputs, 12), progress=False)
    assert len(states) == 12 and set(states.layers) == set(editor.layer_ids)
    editor.detach()
    other = unike.UniKE(arch.model, None, unike.UniKEConfig(**CFG)).fit_states(states, progress=False)
    assert torch.equal(_logits(arch.model, arch.inputs), fitted) and other.losses == losses
    l = other.layer_ids[0]
    query = states.layers[l]["h_sem"][:3]
    sims, idx = other.memory[l].nearest(query)          # each finds an entry with its own key (entries share a prompt)
    assert torch.allclose(states.layers[l]["h_sem"][idx[:, 0]], query) and torch.allclose(sims[:, 0], torch.ones(3))
    other.detach()
    again = unike.UniKE(arch.model, None, unike.UniKEConfig(**CFG, latent=False)).fit_states(states, progress=False)
    assert len(states.trained) == 1 and again.losses == losses     # the spaces were reused, not retrained
    assert all(torch.equal(v, other.spaces[l].state_dict()[k]) for k, v in again.spaces[l].state_dict().items())
    again.detach()
    with pytest.raises(ValueError, match="collected at layers"):
        unike.UniKE(arch.model, None, unike.UniKEConfig(**{**CFG, "layers": 1})).fit_states(states, progress=False)
