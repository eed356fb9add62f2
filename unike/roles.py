"""Token roles in a batch: image tokens, prompt tokens, the last prompt token, answer tokens.

Correct under left and right padding: roles come from `attention_mask` and `labels`, never from fixed
offsets.
"""
from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .prompting import IGNORE

Mask = Int[Tensor, "b t"] | Bool[Tensor, "b t"]      # an attention mask: 0/1 integers or booleans


def image_token_id(model=None, processor=None) -> int | None:
    """The id that marks image positions in `input_ids` (model config first, then the processor)."""
    cfg = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    value = getattr(processor, "image_token_id", None)
    return value if isinstance(value, int) else None


def image_mask(input_ids: Int[Tensor, "b t"], token_id: int | None) -> Bool[Tensor, "b t"]:
    if token_id is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return input_ids == token_id


def answer_mask(labels: Int[Tensor, "b t"]) -> Bool[Tensor, "b t"]:
    return labels != IGNORE


def prompt_mask(attention_mask: Mask, labels: Int[Tensor, "b t"] | None = None) -> Bool[Tensor, "b t"]:
    mask = attention_mask.bool()
    return mask if labels is None else mask & ~answer_mask(labels)


def last_prompt_index(attention_mask: Mask,
                      labels: Int[Tensor, "b t"] | None = None) -> Int[Tensor, " b"]:
    """Position of the last prompt token of each row (the question's last token, before any answer)."""
    mask = prompt_mask(attention_mask, labels)
    if not mask.any(1).all():
        raise ValueError("a row of the batch has no prompt token (empty prompt or all padding)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(1).values


def last_index(attention_mask: Mask) -> Int[Tensor, " b"]:
    """Position of the last real (non-padding) token of each row."""
    return last_prompt_index(attention_mask, None)


def answer_end_index(input_ids: Int[Tensor, "b t"], attention_mask: Mask,
                     labels: Int[Tensor, "b t"], eos_id: int | None) -> Int[Tensor, " b"]:
    """Position of each row's final answer token: the last real token, or the one before it where that is
    a labelled end-of-sequence token (an answer trained to stop)."""
    end = last_index(attention_mask)
    if eos_id is None:
        return end
    rows = torch.arange(len(end), device=end.device)
    return end - ((input_ids[rows, end] == eos_id) & (labels[rows, end] != IGNORE)).long()


def target_positions(labels: Int[Tensor, "b t"]) -> Bool[Tensor, "b t"]:
    """Positions whose logits predict an answer token (the answer mask shifted left by one)."""
    mask = answer_mask(labels)
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
