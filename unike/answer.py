"""`answer()`: the greedy answer of any Hugging Face VLM to (image, prompt), as a string."""
from __future__ import annotations

import torch

from .data.case import load_image
from .prompting import encode, on_model, pad_id_of, tokenizer_of


@torch.no_grad()
def answer(model, processor, image, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy answer (new tokens only, special tokens skipped, stripped); `image=None` for a text-only question.

    The prompt goes through `unike.prompting.encode`: the processor's chat template when it has one, else
    `processor.image_token + " " + prompt`.
    """
    inputs = on_model(encode(processor, load_image(image), prompt), model)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id_of(processor))
    return tokenizer_of(processor).decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
