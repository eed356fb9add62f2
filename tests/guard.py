"""What a rejected or failed call must leave exactly as it was: a fixed probe's logits, the editor's
state tensors and counters, and the hooks on every module of the model."""
from __future__ import annotations

import torch

import unike
from unike.prompting import collate, encode, on_model, pad_id_of

# A small fit and fast edits on the shipped tiny model: enough to make every part of the state non-empty.
FAST = dict(encoder_steps=10, edit_steps=12, min_triplets=8)


def tiny_probe(processor, world: unike.SynthWorld) -> dict:
    """A batch of two prompts (a VQA question and a caption prompt), right-padded."""
    a = world.edit_cases("vqa", n=1, seed=101)[0]
    b = world.edit_cases("caption", n=1, seed=102)[0]
    return collate([encode(processor, a.image, a.prompt), encode(processor, b.image, b.prompt)],
                   pad_id_of(processor), side="right")


def logits(model, probe) -> torch.Tensor:
    with torch.no_grad():
        return model(**on_model(probe, model)).logits.clone()


def hooks_of(model) -> dict:
    """Every forward (pre-)hook on every module, by module and id."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def snapshot(model, probe, editor=None) -> dict:
    out = {"logits": logits(model, probe), "hooks": hooks_of(model), "keys": list(model.state_dict())}
    if editor is not None:
        out["state"] = {k: v.clone() for k, v in editor.state().items()}
        out["counters"] = (editor.n_edits, editor.fitted, list(editor.fit_questions))
    return out


def assert_same(before: dict, after: dict) -> int:
    """Bit-identical logits, the same hooks and parameter names, and the same editor state; returns how
    many quantities were compared."""
    assert torch.equal(before["logits"], after["logits"]), "the probe's logits changed"
    assert before["hooks"] == after["hooks"], "hooks were added or removed"
    assert before["keys"] == after["keys"], "the model's state_dict keys changed"
    checked = 3
    if "state" in before:
        assert before["counters"] == after["counters"], (before["counters"], after["counters"])
        assert before["state"].keys() == after["state"].keys()
        for k, v in before["state"].items():
            assert torch.equal(v, after["state"][k]), f"editor state {k} changed"
        checked += 1 + len(before["state"])
    return checked
