"""Fast batching for the tiny model: the same ids and pixels the processor makes, without its overhead.

`tests/test_tiny.py` checks that `encode` agrees token for token (and pixel for pixel) with
`processor(text=chat_template(question), images=[img])` followed by the answer ids and EOS.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .build import MEAN, N_IMAGE_TOKENS, STD


@dataclass
class Example:
    """One training or evaluation item; `aux` holds class labels for the vision heads (image items only)."""

    image: Image.Image | None
    question: str
    answer: str
    aux: dict = field(default_factory=dict)
    tag: str = ""


def pixels(image: Image.Image) -> torch.Tensor:
    """[3, 64, 64] float pixels, normalised as the processor does (64 px in, no resize)."""
    arr = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class Encoder:
    """Turns `Example`s into a left-padded batch: input_ids, attention_mask, labels (-100 = no loss), pixel_values."""

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        self.unk = tokenizer.unk_token_id
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.image_id = self.vocab["<image>"]

    def ids(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk) for w in text.split()]

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        prompt = [self.bos] + ([self.image_id] * N_IMAGE_TOKENS if ex.image is not None else []) + self.ids(ex.question)
        return prompt, self.ids(ex.answer) + [self.eos]

    def batch(self, examples: list[Example]) -> dict:
        seqs = [self.encode(ex) for ex in examples]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(seqs):
            n = len(p) + len(a)
            ids[i, width - n:] = torch.tensor(p + a)
            mask[i, width - n:] = 1
            labels[i, width - len(a):] = torch.tensor(a)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [ex.image for ex in examples if ex.image is not None]
        if images:
            out["pixel_values"] = torch.stack([pixels(im) for im in images])
        return out
