"""The shipped tiny VLM: loading, sequence format, held-out accuracy, image dependence, greedy answers, training."""
import json

import pytest
import torch

from unike.answer import answer
from unike.data.world import SynthWorld
from unike.tiny import WEIGHTS, load_tiny
from unike.tiny.batch import Encoder, Example
from unike.tiny.evaluate import evaluate_tiny

# Measured on 3x100 held-out renderings per cell (weights/metrics.json: VQA 96.0, attributes 98.5, text 100,
# caption 95.8, image dependence 91.9) minus a margin for the 12-entity sample used here.
MIN = {"vqa": 92.0, "attributes": 94.0, "text": 97.0, "caption": 90.0, "image_dependence": 86.0}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_tiny()


@pytest.fixture(scope="module")
def world():
    return SynthWorld(seed=0)


@pytest.fixture(scope="module")
def scores(tiny, world):
    return evaluate_tiny(*tiny, world, per_cell=12, seed=7)


def chat(processor, question, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def test_load_tiny(tiny):
    model, processor = tiny
    assert not model.training
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert sum(f.stat().st_size for f in WEIGHTS.iterdir()) < 20_000_000
    assert chat(processor, "what colour is this creature ?") == "<image> what colour is this creature ?"
    assert chat(processor, "what is the capital of zarnia ?", image=False) == "what is the capital of zarnia ?"
    with pytest.raises(FileNotFoundError, match="train"):
        load_tiny(path=WEIGHTS / "missing")


def test_vocabulary_in_shipped_tokenizer(tiny, world):
    vocab = tiny[1].tokenizer.get_vocab()
    assert all(w in vocab for w in world.vocabulary())


def test_fast_batches_match_the_processor(tiny, world):
    model, processor = tiny
    tok = processor.tokenizer
    enc = Encoder(tok)
    for ex in (Example(world.render(3, 10**6), "what does this creature eat ?", "honey"),
               Example(None, "what is the capital of zarnia ?", "aldrun")):
        inputs = processor(text=chat(processor, ex.question, ex.image is not None),
                           images=[ex.image] if ex.image is not None else None, return_tensors="pt")
        answer_ids = tok(" " + ex.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        b = enc.batch([ex])
        assert b["input_ids"][0].tolist() == inputs["input_ids"][0].tolist() + answer_ids
        assert (b["labels"][0] != -100).sum() == len(answer_ids)
        if ex.image is not None:
            assert torch.allclose(b["pixel_values"], inputs["pixel_values"], atol=1e-6)


def test_heldout_accuracy(scores):
    for key, floor in MIN.items():
        assert scores[key] >= floor, (key, scores[key], scores)
    assert min(scores["per_key"].values()) >= 85.0, scores["per_key"]


def test_image_dependence(tiny, world):
    """The same question over two entities' images (different true answers) gets each entity's own answer."""
    model, processor = tiny
    cases = world.edit_cases("vqa", 60, seed=5)  # ri_image: another entity, same question, another answer
    both = [answer(model, processor, c.image, c.prompt) == c.ground_truth
            and answer(model, processor, c.ri_image, c.prompt) == c.ri_answer for c in cases]
    assert sum(both) / len(both) >= 0.82, both  # measured: 92% of 4,500 held-out pairs (weights/metrics.json)


def test_greedy_answers_match_ground_truth(tiny, world):
    model, processor = tiny
    cases = world.edit_cases("vqa", 6, seed=11) + world.edit_cases("caption", 2, seed=11)
    hits = [answer(model, processor, c.image, c.prompt) == c.ground_truth for c in cases]
    hits += [answer(model, processor, None, c.loc_prompt) == c.loc_answer for c in cases]
    hits += [answer(model, processor, c.mloc_image, c.mloc_prompt) == c.mloc_answer for c in cases]
    assert sum(hits) >= len(hits) - 1, hits


def test_train_a_few_steps(tmp_path):
    from unike.tiny.train import train_tiny

    m = train_tiny(tmp_path, stage1_steps=3, stage2_steps=3, freeze_steps=1, eval_per_cell=0, progress=False,
                   batch_size=12, mix=(1, 1, 1), eval_every=2, eval_n=2)
    assert m["stage2_steps"] == 3 and (tmp_path / "metrics.json").is_file()
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2, 3] and "b_update" in curve[0]
    with pytest.raises(ValueError, match="icl_start.*hide_layers"):
        train_tiny(tmp_path / "bad", stage2_steps=3, icl_start=5, hide_layers=(6,), progress=False)
    assert not (tmp_path / "bad").exists()
    model, processor = load_tiny(path=tmp_path)
    assert not any("heads" in k for k in model.state_dict())
    assert isinstance(answer(model, processor, SynthWorld(0).render(0, 10**6), "what colour is this creature ?"), str)


# ---------------------------------------------------------------- v2 training code: in-context items, layer mask
@pytest.fixture(scope="module")
def fresh(world):
    """An untrained model and processor as `train_tiny` builds them (vocabulary with the separator)."""
    from unike.tiny.build import build_tiny

    torch.set_num_threads(1)
    model, processor = build_tiny(world, seed=0)
    return model.eval(), processor


def test_separator_survives_tokenizer_and_decoding(fresh, world):
    from unike.tiny.build import JOIN, SEP

    tok = fresh[1].tokenizer
    assert SEP not in world.vocabulary() and SEP in tok.get_vocab()
    text = JOIN.join(["what does this creature eat ? honey", "what is the diet of this creature ?"])
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and ids.count(tok.convert_tokens_to_ids(SEP)) == 1
    assert tok.decode(ids) == text
    assert Encoder(tok).ids(text) == ids


def test_shipped_model_keeps_its_own_tokenizer(tiny):
    """`load_tiny` reads the tokenizer saved with the weights, whatever `build_tokenizer` now makes."""
    model, processor = tiny
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert answer(model, processor, None, "what is the capital of zarnia ?") == "aldrun"


def test_format_a_is_what_prompt_ike_writes(fresh, world):
    from unike.baselines import PromptIKE
    from unike.prompting import encode
    from unike.tiny.build import JOIN

    model, processor = fresh
    ike = PromptIKE(model, processor)
    assert ike.sep == JOIN
    cases = world.edit_cases("vqa", 4, seed=3)
    for c in cases:
        ike.edit(c)
    text = ike.rewrite(cases[0].rephrase_prompt)
    demos = [d for d in ike.demos if d in text]
    assert len(demos) == 4 and text == JOIN.join(sorted(demos, key=text.index) + [cases[0].rephrase_prompt])
    ex = Example(cases[0].rephrase_image, text, cases[0].target)
    expected = encode(processor, ex.image, text, ex.answer, eos=True)
    b = Encoder(processor.tokenizer).batch([ex])
    assert b["input_ids"][0].tolist() == expected["input_ids"][0].tolist()
    assert b["labels"][0].tolist() == expected["labels"][0].tolist()


def test_format_a_items(world):
    import random

    from unike.tiny.build import JOIN, SEP
    from unike.tiny.items import Items

    items, rng = Items(world), random.Random(0)
    vocabulary = set(world.vocabulary()) | {SEP}
    cf = 0
    for _ in range(300):
        a = items.ask(rng)
        ex = items.format_a(rng, a)
        *demos, question = ex.question.split(JOIN)
        assert 1 <= len(demos) <= 4 and question in a.paraphrases
        assert set(ex.question.split()) <= vocabulary, ex.question   # no word the tokenizer maps to <unk>
        assert all(len(d.split()) > 1 for d in demos), demos           # each one "question answer"
        own = [d for d in demos if any(d.startswith(q + " ") for q in a.paraphrases)]
        assert len(own) <= 1  # at most one demonstration asks the queried fact
        if own:
            cf += 1
            assert ex.answer == own[0][len(next(q for q in a.paraphrases if own[0].startswith(q + " "))) + 1:]
            assert ex.answer != a.truth
        else:
            assert ex.answer == a.truth
    assert 0.3 <= cf / 300 <= 0.5, cf  # about 40% of the items carry a counterfactual demonstration


def test_format_b_matches_processor_with_two_images(fresh, world):
    import random

    from unike.tiny.build import N_IMAGE_TOKENS, SEP
    from unike.tiny.items import Items

    model, processor = fresh
    ex = Items(world).format_b(random.Random(1), "update")
    assert len(ex.images) == 2 and len(ex.aux) == 2
    text = f"<image> {ex.demo[1]} {SEP} <image> {ex.question}"
    inputs = processor(text=text, images=ex.images, return_tensors="pt")
    tok = processor.tokenizer
    answer_ids = tok(" " + ex.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    b = Encoder(tok).batch([ex, Example(None, "what is the capital of zarnia ?", "aldrun")])
    n = inputs["input_ids"].shape[1] + len(answer_ids)
    assert b["input_ids"][0, -n:].tolist() == inputs["input_ids"][0].tolist() + answer_ids
    assert (b["input_ids"][0] == tok.convert_tokens_to_ids("<image>")).sum() == 2 * N_IMAGE_TOKENS
    assert torch.allclose(b["pixel_values"], inputs["pixel_values"], atol=1e-6)
    demo_len = N_IMAGE_TOKENS + len(ex.demo[1].split()) + 1  # demo image, "question answer", separator
    assert b["demo"][0].sum() == demo_len and b["demo"][0, -n + 1:-n + 1 + demo_len].all() and not b["demo"][1].any()
    assert model(**{k: v for k, v in b.items() if k != "demo"}).logits.shape[:2] == b["input_ids"].shape


def test_hide_blocks_the_demonstration_only_in_chosen_layers(fresh, world):
    """Changing the demonstration (another image, another answer) leaves the query's states unchanged in
    the hidden layers and changes them above; a row without a demonstration is not touched."""
    import random

    from unike.tiny.hide import hide
    from unike.tiny.items import Items

    model, processor = fresh
    enc = Encoder(processor.tokenizer)
    ex = Items(world).format_b(random.Random(2), "update")
    question, value = ex.demo[1].rsplit(" ", 1)
    other = next(v for v in world.answers("kind") if v != value)
    swapped = Example(ex.image, ex.question, ex.answer, demo=(world.render(7, 5), f"{question} {other}"))
    text_only = Example(None, "what is the capital of zarnia ?", "aldrun")

    def states(example, layers, attn):
        model.set_attn_implementation(attn)
        b = enc.batch([example, text_only])
        b.pop("labels")
        demo = b.pop("demo")
        with hide(model, demo, layers):
            out = model(**b, output_hidden_states=True)
        after = (demo[0].cumsum(0) > 0) & ~demo[0]
        return [h[0, after] for h in out.hidden_states], out.logits[1]

    with torch.no_grad():
        for attn in ("sdpa", "eager"):
            (a, row_a), (b, _) = states(ex, (0, 1), attn), states(swapped, (0, 1), attn)
            diff = [float((x - y).abs().max()) for x, y in zip(a, b)]  # embeddings, then after each layer
            assert max(diff[:3]) < 1e-5 and min(diff[3:]) > 1e-3, (attn, diff)
            (full, _), (full2, _) = states(ex, range(6), attn), states(swapped, range(6), attn)
            assert max(float((x - y).abs().max()) for x, y in zip(full, full2)) < 1e-5
            (seen, row_seen), (seen2, _) = states(ex, (), attn), states(swapped, (), attn)
            assert float((seen[1] - seen2[1]).abs().max()) > 1e-3  # without the mask layer 0 reads it
            assert torch.allclose(row_a, row_seen, atol=1e-5)  # the text-only row is untouched
    model.set_attn_implementation("sdpa")


def test_in_context_evaluation_runs(fresh, world):
    from unike.tiny.evaluate import evaluate_in_context

    m = evaluate_in_context(*fresh, world, n=3, seed=0, greedy=1)
    keys = ("a_update", "a_retain", "a_text_update", "a_text_retain", "b_update", "b_entity", "b_fact",
            "b_update_visible")
    assert all(0 <= m[k] <= 100 for k in keys) and m["greedy"]["n"] == 7
    assert m["greedy"]["agrees_with_teacher_forced"] == 100.0  # an untrained model: both wrong everywhere


def test_curriculum_schedule():
    """With icl_start, the plain phase has its own cosine and the mix phase restarts the warm-up."""
    from unike.tiny.train import _stage2_lr

    lr = [_stage2_lr(s, 1000, 400) for s in range(1000)]
    assert lr[99] == 1.0 and lr[399] < 0.06 and lr[400] == 1 / 30 and lr[429] == 1.0 and lr[-1] < 0.06
    assert [_stage2_lr(s, 1000, 0) for s in (0, 99)] == [0.01, 1.0]
