"""`answer()`: the greedy answer of any Hugging Face VLM to (image, prompt), as a string."""
from __future__ import annotations

import inspect

import torch

from .data.case import load_image


def _prompt_text(processor, prompt: str, has_image: bool) -> str:
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"{image_token} {prompt}" if has_image else prompt


@torch.no_grad()
def answer(model, processor, image, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy answer (new tokens only, special tokens skipped, stripped); `image=None` for a text-only question.

    Uses the processor's chat template when it has one, else `processor.image_token + " " + prompt`.
    """
    image = load_image(image)
    text = _prompt_text(processor, prompt, image is not None)
    kwargs = {"images": [image]} if image is not None else {}
    inputs = processor(text=text, return_tensors="pt", **kwargs)
    accepted = inspect.signature(model.forward).parameters
    if "token_type_ids" in inputs and "token_type_ids" not in accepted:
        inputs.pop("token_type_ids")
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(model.device, dtype) if torch.is_floating_point(v) else v.to(model.device))
              for k, v in inputs.items()}
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
