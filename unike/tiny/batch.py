"""Fast batching for the tiny model: the same ids and pixels the processor makes, without its overhead.

`tests/test_tiny.py` checks that `encode` agrees token for token (and pixel for pixel) with
`processor(text=chat_template(question), images=[img])` followed by the answer ids and EOS, and for an
image demonstration with `processor(text="<image> demo ; <image> question", images=[demo_img, img])`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .build import MEAN, N_IMAGE_TOKENS, SEP, STD


@dataclass
class Example:
    """One training or evaluation item.

    `question` may already hold text demonstrations (format A: "q1 a1 ; q2 a2 ; question"). `demo` is an
    image demonstration (format B): (image, "question answer"), written before `image` and followed by
    `SEP`. `aux` holds the vision heads' class labels, one dict per image in sequence order.
    """

    image: Image.Image | None
    question: str
    answer: str
    aux: list[dict] = field(default_factory=list)
    tag: str = ""
    demo: tuple[Image.Image, str] | None = None

    @property
    def images(self) -> list[Image.Image]:
        return ([self.demo[0]] if self.demo else []) + ([self.image] if self.image is not None else [])


def pixels(image: Image.Image) -> torch.Tensor:
    """[3, 64, 64] float pixels, normalised as the processor does (64 px in, no resize)."""
    arr = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class Encoder:
    """Turns `Example`s into a left-padded batch: input_ids, attention_mask, labels (-100 = no loss),
    pixel_values, and `demo` (bool [B, T], the image demonstrations' tokens) when an example has one."""

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        self.unk = tokenizer.unk_token_id
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.image_id = self.vocab["<image>"]

    def ids(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk) for w in text.split()]

    def encode(self, ex: Example) -> tuple[list[int], list[int], int]:
        """(prompt ids, answer ids + EOS, length of the image demonstration after BOS: 0 without one)."""
        demo = [self.image_id] * N_IMAGE_TOKENS + self.ids(f"{ex.demo[1]} {SEP}") if ex.demo else []
        query = ([self.image_id] * N_IMAGE_TOKENS if ex.image is not None else []) + self.ids(ex.question)
        return [self.bos] + demo + query, self.ids(ex.answer) + [self.eos], len(demo)

    def batch(self, examples: list[Example]) -> dict:
        seqs = [self.encode(ex) for ex in examples]
        width = max(len(p) + len(a) for p, a, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        demo = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (p, a, d) in enumerate(seqs):
            n = len(p) + len(a)
            ids[i, width - n:] = torch.tensor(p + a)
            mask[i, width - n:] = 1
            labels[i, width - len(a):] = torch.tensor(a)
            demo[i, width - n + 1:width - n + 1 + d] = True
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [im for ex in examples for im in ex.images]
        if images:
            out["pixel_values"] = torch.stack([pixels(im) for im in images])
        if demo.any():
            out["demo"] = demo
        return out
