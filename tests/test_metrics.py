"""`evaluate` on hand-computed examples: a fake model whose predictions we control."""
import contextlib

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

import unike
from unike.metrics import normalize

WORDS = ["<pad>", "<unk>", "</s>", "what", "colour", "is", "it", "?", "red", "blue", "green", "capital", "of", "x"]


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


def test_bad_protocol_mode_and_inputs():
    tok = tokenizer()
    with pytest.raises(ValueError, match="protocol"):
        unike.evaluate(Parrot(tok, "red"), [case()], processor=tok, protocol="bleu")
    with pytest.raises(ValueError, match="mode"):
        unike.evaluate(Parrot(tok, "red"), [case()], processor=tok, mode="batch")
    with pytest.raises(ValueError, match="processor"):
        unike.evaluate(Parrot(tok, "red"), [case()])
    with pytest.raises(ValueError, match="no cases"):
        unike.evaluate(Parrot(tok, "red"), [], processor=tok)


def test_normalize():
    assert normalize("  The Red,  fox! ") == "the red fox"
