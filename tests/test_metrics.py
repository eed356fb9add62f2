"""`evaluate` on hand-computed examples: a fake model whose predictions we control."""
import contextlib

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

import unike
from unike.metrics import normalize

WORDS = ["<pad>", "<unk>", "</s>", "what", "colour", "is", "it", "?", "red", "blue", "green", "capital", "of", "x",
         "img"]


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


class Parrot(torch.nn.Module):
    """Predicts `self.word` at every position (then EOS once it has said it)."""

    def __init__(self, tok, word):
        super().__init__()
        self.tok, self.word = tok, word
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, len(WORDS))
        logits[..., self.tok.convert_tokens_to_ids(self.word)] = 1
        said = input_ids == self.tok.convert_tokens_to_ids(self.word)
        logits[said] = 0
        logits[..., self.tok.eos_token_id][said] = 1
        return CausalLMOutput(logits=logits)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=4, **kw):
        ids = input_ids
        for _ in range(max_new_tokens):
            nxt = self.forward(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if (nxt == self.tok.eos_token_id).all():
                break
        return ids


class Switch:
    """A 'method' whose edit makes the parrot say another word."""

    def __init__(self, model, processor, new):
        self.model, self.processor, self.old, self.new = model, processor, model.word, new

    def edit(self, case):
        self.model.word = self.new

    def reset(self):
        self.model.word = self.old

    @contextlib.contextmanager
    def disabled(self):
        word, self.model.word = self.model.word, self.old
        yield
        self.model.word = word


def case(target="blue"):
    return unike.EditCase(image=None, prompt="what colour is it ?", target=target, ground_truth="red",
                          rephrase_prompt="what is it ?", loc_prompt="capital of x ?", loc_answer="green")


def test_base_row_is_zero_reliability_full_locality():
    tok = tokenizer()
    scores = unike.evaluate(Parrot(tok, "red"), [case()], processor=tok, progress=False)
    assert scores == {"rel": 0.0, "t_gen": 0.0, "t_loc": 100.0}


def test_token_acc_counts_tokens_and_locality_compares_with_base():
    tok = tokenizer()
    method = Switch(Parrot(tok, "red"), tok, "blue")
    # target "blue": 1/1 token right; target "green blue": position 1 predicts blue (wrong), position 2
    # follows "green" and predicts blue (right): 1/2. Locality: every answer position changed red -> blue.
    scores = unike.evaluate(method, [case("blue"), case("green blue")], progress=False)
    assert scores["rel"] == pytest.approx(75.0)
    assert scores["t_gen"] == pytest.approx(75.0)
    assert scores["t_loc"] == 0.0


def test_exact_protocol_compares_generations():
    tok = tokenizer()
    method = Switch(Parrot(tok, "red"), tok, "blue")
    scores = unike.evaluate(method, [case("blue"), case("green")], protocol="exact", progress=False)
    assert scores["rel"] == 50.0 and scores["t_loc"] == 0.0
    method.new = "red"
    assert unike.evaluate(method, [case("blue")], protocol="exact", progress=False)["t_loc"] == 100.0


def test_sequential_scores_after_all_k_edits():
    tok = tokenizer()

    class Last(Switch):  # only the last edit counts: earlier cases lose their edit
        def edit(self, c):
            self.model.word = c.target

    scores = unike.evaluate(Last(Parrot(tok, "red"), tok, None), [case("blue"), case("green")],
                            mode="sequential", k=2, progress=False)
    assert scores["rel"] == 50.0
    one = unike.evaluate(Last(Parrot(tok, "red"), tok, None), [case("blue"), case("green")], progress=False)
    assert one["rel"] == 100.0


def test_score_after_each_scores_every_case_right_after_its_own_edit():
    tok = tokenizer()

    class Last(Switch):  # only the last edit counts: earlier cases lose their edit
        def edit(self, c):
            self.model.word = c.target

    cases = [case("blue"), case("green")]
    each = unike.evaluate(Last(Parrot(tok, "red"), tok, None), cases, mode="sequential", k=2, score_after="each",
                          progress=False)
    after_all = unike.evaluate(Last(Parrot(tok, "red"), tok, None), cases, mode="sequential", k=2, progress=False)
    assert each["rel"] == 100.0 and after_all["rel"] == 50.0
    assert unike.evaluate(Last(Parrot(tok, "red"), tok, None), cases, score_after="each", progress=False) == \
        unike.evaluate(Last(Parrot(tok, "red"), tok, None), cases, progress=False)   # one-step: the same


class Processor:
    """The word-level tokenizer with a stand-in image processor: an image adds the word "img"."""

    image_token, chat_template, image_processor = "img", None, object()

    def __init__(self, tok):
        self.tokenizer = tok

    def __call__(self, text, images=None, return_tensors="pt"):
        enc = dict(self.tokenizer(text, return_tensors=return_tensors))
        if images:
            enc["pixel_values"] = torch.zeros(len(images), 1)
        return enc


class Ranked(torch.nn.Module):
    """Logits -id at every position (top-10 = ids 0..9, in order); where the input token is "x", the
    logits of the id pairs in `swaps` are exchanged."""

    def __init__(self, tok):
        super().__init__()
        self.x, self.swaps = tok.convert_tokens_to_ids("x"), []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = -torch.arange(len(WORDS), dtype=torch.float).expand(*input_ids.shape, -1).clone()
        at = input_ids == self.x
        for a, b in self.swaps:
            logits[at, a], logits[at, b] = -float(b), -float(a)
        return CausalLMOutput(logits=logits)


class Swaps:
    """A 'method' whose edit sets the model's swaps."""

    def __init__(self, model, processor, swaps):
        self.model, self.processor, self.new = model, processor, swaps

    def edit(self, case):
        self.model.swaps = self.new

    def reset(self):
        self.model.swaps = []

    @contextlib.contextmanager
    def disabled(self):
        swaps, self.model.swaps = self.model.swaps, []
        yield
        self.model.swaps = swaps


def test_easyedit_locality_every_position_top1_text_top10_image():
    tok = tokenizer()
    image = Image.new("RGB", (2, 2))
    c = unike.EditCase(image=image, prompt="what colour is it ?", target="blue", loc_prompt="capital of x ?",
                       loc_answer="green", mloc_image=image, mloc_prompt="what is x ?", mloc_answer="red",
                       ci_prompt="what is x ?", ci_answer="red", ri_image=image, ri_answer="red")
    proc = Processor(tok)
    # the edit swaps ranks 1 and 2 at the position of "x". T-Loc: "capital of x ?" + "green" = 5 positions,
    # the top-1 changes at none of them. M-Loc: "img what is x ?" + "red" = 6 positions x 10 ranks, 2 differ.
    scores = unike.evaluate(Swaps(Ranked(tok), proc, [(1, 2)]), [c], "easyedit", progress=False)
    assert scores["t_loc"] == 100.0
    assert scores["m_loc"] == pytest.approx(100 * 58 / 60)
    assert scores["ci_loc"] == pytest.approx(100 * 58 / 60)      # an image probe: M-Loc's rule
    assert scores["ri_loc"] == 100.0                                # the edit question has no "x"
    # swapping ranks 0 and 1 changes the top-1 at "x": 1 of T-Loc's 5 positions
    scores = unike.evaluate(Swaps(Ranked(tok), proc, [(0, 1)]), [c], "easyedit", progress=False)
    assert scores["t_loc"] == pytest.approx(80.0) and scores["m_loc"] == pytest.approx(100 * 58 / 60)
    # token_acc scores only the answer positions (predicted at "?" and "red"): unchanged, 100
    tacc = unike.evaluate(Swaps(Ranked(tok), proc, [(0, 1)]), [c], "token_acc", progress=False)
    assert tacc["t_loc"] == tacc["m_loc"] == tacc["ci_loc"] == 100.0
    assert scores["rel"] == tacc["rel"] == 0.0                       # edit probes: token_acc under both


def test_port_probe_is_scored_against_its_answer_like_rel():
    tok = tokenizer()
    c = case("blue")
    c.port_prompt, c.port_answer = "what is it ?", "blue"    # a two-hop question the edit answers
    method = Switch(Parrot(tok, "red"), tok, "blue")
    assert unike.evaluate(method, [c], progress=False)["port"] == 100.0
    assert unike.evaluate(Parrot(tok, "red"), [c], processor=tok, progress=False)["port"] == 0.0


def test_bad_protocol_mode_and_inputs():
    tok = tokenizer()
    with pytest.raises(ValueError, match="protocol"):
        unike.evaluate(Parrot(tok, "red"), [case()], processor=tok, protocol="bleu")
    with pytest.raises(ValueError, match="mode"):
        unike.evaluate(Parrot(tok, "red"), [case()], processor=tok, mode="batch")
    with pytest.raises(ValueError, match="score_after"):
        unike.evaluate(Parrot(tok, "red"), [case()], processor=tok, mode="sequential", score_after="last")
    with pytest.raises(ValueError, match="processor"):
        unike.evaluate(Parrot(tok, "red"), [case()])
    with pytest.raises(ValueError, match="no cases"):
        unike.evaluate(Parrot(tok, "red"), [], processor=tok)


def test_normalize():
    assert normalize("  The Red,  fox! ") == "the red fox"
