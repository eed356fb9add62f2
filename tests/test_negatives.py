"""`prompt_negatives`: FFN inputs at the image tokens of fit prompts (other images' patches), kept from
fit and trained against, so that an edit does not fire on unrelated images."""
import pytest
import torch

import unike
from unike.collect import FitStates
from unike.prompting import eos_id_of
from unike.roles import target_positions
from unike.training import targets


@pytest.fixture(scope="module")
def tiny(tiny_states):
    """The tiny model, the shared fit states (collected with q_other, see conftest) and four cases."""
    model, processor = unike.load_tiny()
    cases = unike.SynthWorld(seed=0).edit_cases("vqa", n=4, seed=5)
    yield model, processor, tiny_states, cases


def _editor(tiny, pool):
    model, processor, states, cases = tiny
    editor = unike.UniKE(model, processor, unike.UniKEConfig(prompt_negatives=pool))
    editor.fit_states(states, progress=False)
    for case in cases:
        editor.edit(case)
    return editor


def _firing(editor, pool):
    """Per layer: how many rows of `pool[l]` make some committed neuron fire."""
    return {l: int((editor.neurons[l].preactivation(pool[l]) > 0).any(1).sum()) for l in editor.layer_ids}


@pytest.mark.slow
def test_prompt_negatives_are_kept_and_trained_against(tiny, tmp_path):
    model, processor, states, _ = tiny
    editor = _editor(tiny, 256)
    try:
        pool = {l: layer.prompt_negatives for l, layer in editor.layers.items()}
        for l, rows in pool.items():
            assert rows.shape == (256, editor.stack.hidden_size)
            collected = states.layers[l]["q_other"]        # each row is a collected image token's FFN input
            assert (rows[:, None] == collected[None]).all(-1).any(1).all()
        assert not any(_firing(editor, pool).values()), "the edits fire on the negatives they were trained against"
        editor.save(tmp_path / "state")
        state = editor.state()
    finally:
        editor.detach()
    again = unike.UniKE.load(model, processor, tmp_path / "state")
    try:
        assert all(torch.equal(again.state()[k], v) for k, v in state.items())
    finally:
        again.detach()
    without = FitStates({l: {**st, "q_other": st["q_other"][:0]} for l, st in states.layers.items()})
    editor = unike.UniKE(model, processor, unike.UniKEConfig(prompt_negatives=256))
    try:
        with pytest.raises(ValueError, match="collect them with an editor whose config sets prompt_negatives"):
            editor.fit_states(without, progress=False)
        assert not editor.fitted and len(editor.memory[editor.layer_ids[0]]) == 0   # refused before any change
    finally:
        editor.detach()
    plain = _editor(tiny, 0)                                # the default keeps none, and its edits do fire there
    try:
        assert all(len(layer.prompt_negatives) == 0 for layer in plain.layers.values())
        assert sum(_firing(plain, pool).values()) > 0
    finally:
        plain.detach()


@pytest.mark.slow
def test_own_answer_positions_keep_a_caption_from_running_on(tiny):
    """`own_answer_negatives`: each neuron is silent at the edit's other answer positions (those that
    predict another token; on the unedited states, which it trains on), so a caption edit's name neuron
    does not fire again inside the caption, and the rephrased prompt's greedy caption is the target,
    where without it the caption runs on."""
    model, processor, fit, _ = tiny
    listed = unike.SynthWorld(seed=0).edit_cases("caption", n=20, seed=12, sequence_safe=True)
    cases = [listed[i] for i in (13, 19)]        # two that run on one-step without the option
    said, firing = {}, {}
    for on in (True, False):
        editor = unike.UniKE(model, processor, unike.UniKEConfig(own_answer_negatives=on))
        editor.fit_states(fit, progress=False)
        said[on], firing[on] = [], 0
        try:
            for case in cases:
                editor.edit(case)
                said[on] += [unike.answer(model, processor, case.image, case.rephrase_prompt),
                             unike.answer(model, processor, case.rephrase_image, case.prompt)]
                inputs = editor._inputs(case)       # teacher-forced: the unedited FFN inputs it trains on
                states = editor.collector.states(inputs)
                at = targets(inputs["labels"], eos_id_of(model, processor))[0].nonzero().squeeze(1)
                answer = target_positions(inputs["labels"])[0].nonzero().squeeze(1)
                token = inputs["labels"][0, 1:]
                keyed = at[torch.arange(editor.config.n_neurons) % len(at)]   # neuron j ↔ target position
                other = token[answer][:, None] != token[keyed][None]             # [A, n]
                for l in editor.layer_ids:
                    z = editor.neurons[l].preactivation(states[l].q[0, answer])
                    firing[on] += int((z[other] > 0).sum())
                editor.reset()
        finally:
            editor.detach()
    assert said[True] == [c.target for c in cases for _ in range(2)], said[True]
    assert said[False] != said[True]
    assert firing[True] == 0 < firing[False], firing
