"""The subject test of edits without an image (`unike.subject`, docs/method.md "Text-only edits"): the
rarest word of the prompt is its subject; the edit opens only where it has occurred, in cached and uncached
generation alike; on the shipped tiny model a text-only diet edit keeps to its subject, where the question
test alone leaks to subjects of the same diet, and a later edit of the same subject updates it."""
import pytest
import torch

import unike
from unike.metrics import Probe, generations, normalize
from unike.prompting import collate, encode, pad_id_of
from unike.subject import WIDTH, named, occurred, prompt_words, rarest


def test_occurred_is_causal_and_carries_what_an_earlier_call_saw():
    ids = torch.tensor([[5, 7, 9, 7], [1, 2, 3, 4]])
    seen = occurred(ids, torch.tensor([7, 4, 8]))
    assert seen[0, :, 0].tolist() == [False, True, True, True]
    assert seen[1, :, 1].tolist() == [False, False, False, True]
    assert not seen[..., 2].any()
    carried = occurred(ids[:, 3:], torch.tensor([7, 4, 8]), before=seen[:, 2])   # a cached step sees one token
    assert torch.equal(carried[:, 0], seen[:, 3])


def test_rarest_takes_the_words_missing_from_the_lookalikes_then_the_rarest_and_all_that_tie():
    # four fit prompts' words: 1 = "what", 2 = "eat", 3..5 = names
    words = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), torch.tensor([1, 5]), torch.tensor([1, 2, 3])]
    flat, rows = torch.cat(words), torch.arange(4).repeat_interleave(torch.tensor([len(w) for w in words]))
    every = torch.ones(4, dtype=torch.bool)

    def subject(ws, lookalike=every):
        return rarest(torch.tensor(ws, dtype=torch.long), flat, rows, lookalike).tolist()
    assert subject([1, 2, 6]) == [6, -1, -1, -1]                                    # in no fit prompt
    assert subject([1, 2, 3], torch.tensor([False, True, True, False])) == [3, -1, -1, -1]   # in no look-alike
    assert subject([1, 2]) == [2, -1, -1, -1]
    assert subject([1, 7, 8]) == [7, 8, -1, -1]                 # a fit set that saw neither: both, each needed
    assert subject([7, 8, 9, 10, 11]) == [7, 8, 9, 10] and WIDTH == 4
    assert subject([]) == [-1] * 4
    assert rarest(torch.tensor([1]), flat[:0], rows[:0], every[:0]).tolist() == [-1] * 4


def test_named_needs_every_word_of_a_subject():
    subjects = torch.tensor([[7, 8, -1, -1], [7, -1, -1, -1], [-1, -1, -1, -1]])
    seen = occurred(torch.tensor([[7, 1, 8]]), subjects.flatten())
    assert named(seen, subjects)[0].tolist() == [[False, True, True], [False, True, True], [True, True, True]]


def test_prompt_words_leave_out_the_answer_and_the_tokens_to_skip():
    inputs = {"input_ids": torch.tensor([[0, 0, 5, 6, 5, 9]]), "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, -100, -100, -100, -100, 9]])}
    assert prompt_words(inputs, torch.tensor([6]))[0].tolist() == [0, 5]


@pytest.fixture(scope="module")
def text(tiny_states):
    """A fitted tiny editor, the world, diet subjects grouped by their diet, and a greedy `ask`."""
    model, processor = unike.load_tiny()
    editor = unike.UniKE(model, processor, unike.UniKEConfig(seed=0))
    editor.fit_states(tiny_states, progress=False)
    world = unike.SynthWorld(seed=0)
    by_diet = {}
    for _, subject, diet in sorted(f for f in world.text_facts() if f[0] == "diet_by_name"):
        by_diet.setdefault(diet, []).append(subject)

    def ask(prompts):
        return [normalize(a) for a in generations(model, processor, [Probe("x", None, q, "") for q in prompts])]
    yield editor, world, by_diet, ask
    editor.detach()


def _question(world, subject, wording=0):
    return world.text_question("diet_by_name", subject, wording)


@pytest.mark.parametrize("route_subject", [True, False])
def test_a_text_edit_keeps_to_its_subject(text, route_subject):
    """A diet edit of one subject: its three wordings answer the target; the subjects of the same diet,
    whose question-final states the tiny model barely tells apart, keep their answers with the subject
    test, and some do not without it (the leak it mends)."""
    editor, world, by_diet, ask = text
    diet = max(by_diet, key=lambda d: len(by_diet[d]))
    subject, others = by_diet[diet][0], by_diet[diet][1:]
    target = next(d for d in sorted(by_diet) if d != diet)
    prompts = [_question(world, s, w) for s in others for w in range(3)]
    with editor.disabled():
        before = ask(prompts)
    editor.config = editor.config.__class__(**{**editor.config.__dict__, "route_subject": route_subject})
    editor.reset()
    try:
        editor.edit(unike.EditCase(image=None, prompt=_question(world, subject), target=target))
        kept = editor.router.subject[-1].tolist()
        assert kept[1:] == [-1] * 3 and (kept[0] >= 0) == route_subject
        if route_subject:
            assert editor.processor.tokenizer.convert_ids_to_tokens(kept[0]) == subject
        assert ask([_question(world, subject, w) for w in range(3)]) == [target] * 3
        changed = sum(a != b for a, b in zip(ask(prompts), before))
        assert (changed == 0) if route_subject else (changed > 0), f"{changed} of {len(prompts)} changed"
    finally:
        editor.reset()
        editor.config = editor.config.__class__(**{**editor.config.__dict__, "route_subject": True})


def test_a_later_text_edit_of_the_same_subject_updates_it(text):
    editor, world, by_diet, ask = text
    subject = by_diet[sorted(by_diet)[0]][0]
    first, second = sorted(by_diet)[1:3]
    editor.reset()
    try:
        editor.edit(unike.EditCase(image=None, prompt=_question(world, subject, 0), target=first))
        editor.edit(unike.EditCase(image=None, prompt=_question(world, subject, 1), target=second))
        assert editor.router.yields.tolist() == [[0, 1]]
        assert ask([_question(world, subject, w) for w in range(3)]) == [second] * 3
    finally:
        editor.reset()


def test_cached_generation_carries_the_subject(text):
    """The subject occurs in the prompt, not in the generated tokens: generation with the KV cache (which
    sees one token per step) gives what generation without it gives."""
    editor, world, by_diet, ask = text
    subject, other = by_diet[sorted(by_diet)[0]][:2]
    editor.reset()
    try:
        editor.edit(unike.EditCase(image=None, prompt=_question(world, subject), target=sorted(by_diet)[1]))
        processor = editor.processor
        batch = collate([encode(processor, None, _question(world, s, w)) for s in (subject, other) for w in range(3)],
                        pad_id_of(processor), side="left")
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=pad_id_of(processor))
        with torch.no_grad():
            cached, uncached = (editor.model.generate(**batch, use_cache=c, **kw) for c in (True, False))
        assert torch.equal(cached, uncached)
    finally:
        editor.reset()
