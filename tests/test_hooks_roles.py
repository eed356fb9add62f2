"""The hook manager and token roles."""
import torch
from torch import nn

from unike import Hooks
from unike.prompting import IGNORE, collate
from unike.roles import (
    answer_end_index,
    answer_mask,
    image_mask,
    last_index,
    last_prompt_index,
    prompt_mask,
    target_positions,
)


def test_hooks_remove_exactly_what_they_added():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    calls = []
    other = lin.register_forward_hook(lambda m, a, o: calls.append("other"))
    with Hooks() as h:
        h.forward(lin, lambda m, a, o: o * 0)
        h.pre(lin, lambda m, a: calls.append("pre"))
        assert len(h) == 2
        assert torch.equal(lin(x), torch.zeros(2, 3))
    assert len(h) == 0
    h.remove()  # idempotent
    assert not torch.equal(lin(x), torch.zeros(2, 3))
    assert calls == ["pre", "other", "other"]
    other.remove()


def _batch(side):
    rows = [dict(input_ids=torch.tensor([[5, 9, 9, 6, 7, 8]]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                 labels=torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE, 7, 8]])),
            dict(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                 labels=torch.tensor([[IGNORE, IGNORE, 7]]))]
    return collate(rows, pad_id=0, side=side)


def test_roles_under_left_and_right_padding():
    for side, offset in (("right", 0), ("left", 3)):
        b = _batch(side)
        assert last_prompt_index(b["attention_mask"], b["labels"]).tolist() == [3, 1 + offset]
        assert last_index(b["attention_mask"]).tolist() == [5, 2 + offset]
        assert answer_mask(b["labels"]).sum(1).tolist() == [2, 1]
        assert prompt_mask(b["attention_mask"], b["labels"]).sum(1).tolist() == [4, 2]
        tp = target_positions(b["labels"])
        assert tp[0].nonzero().flatten().tolist() == [3, 4]
        assert tp[1].nonzero().flatten().tolist() == [1 + offset]
        assert image_mask(b["input_ids"], 9).sum().item() == 2
        assert not image_mask(b["input_ids"], None).any()
        ends = lambda eos, b=b: answer_end_index(b["input_ids"], b["attention_mask"], b["labels"], eos).tolist()  # noqa: E731
        assert ends(None) == [5, 2 + offset]          # no EOS known: the last real token
        assert ends(8) == [4, 2 + offset]             # row 0 ends in a labelled "EOS" 8: the token before it
        assert ends(7) == [5, 1 + offset]             # row 1 ends in a labelled "EOS" 7
