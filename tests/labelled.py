"""Append answer tokens and `labels` to an architecture's prompt inputs (processor-free edits)."""
from __future__ import annotations

import torch

# Per-token tensors that grow with input_ids, and the value an appended answer token gets.
_GROW = {"attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0, "image_embeds_position_mask": 0}


def with_answer(inputs: dict, answer: list[int]) -> dict:
    """A copy of `inputs` with `answer` appended to input_ids and labels marking it (-100 elsewhere)."""
    out = dict(inputs)
    ans = torch.tensor([answer] * inputs["input_ids"].shape[0], dtype=inputs["input_ids"].dtype)
    out["input_ids"] = torch.cat([inputs["input_ids"], ans], 1)
    for key, fill in _GROW.items():
        if key in inputs and inputs[key].dim() == 2:
            out[key] = torch.cat([inputs[key], torch.full_like(ans, fill).to(inputs[key].dtype)], 1)
    if "image_attention_mask" in inputs:      # Idefics (1): [B, T, images]
        m = inputs["image_attention_mask"]
        out["image_attention_mask"] = torch.cat([m, m[:, -1:].expand(-1, len(answer), -1)], 1)
    if "cross_attention_mask" in inputs:      # Mllama: [B, T, images, tiles]
        m = inputs["cross_attention_mask"]
        out["cross_attention_mask"] = torch.cat([m, m[:, -1:].expand(-1, len(answer), -1, -1)], 1)
    labels = torch.full_like(out["input_ids"], -100)
    labels[:, -len(answer):] = ans
    out["labels"] = labels
    return out


def fit_pairs(inputs: dict, n: int = 24, seed: int = 0, vocab: int = 200):
    """n (right, wrong) answer pairs over the same prompt, for `UniKE.fit_inputs` on random models."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        right, wrong = torch.randint(3, vocab, (2, 2), generator=g).tolist()
        yield with_answer(inputs, right), with_answer(inputs, wrong)
