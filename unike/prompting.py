"""Turn (image, prompt, answer) into model inputs with `labels`, the same way for every HF VLM.

The prompt goes through the processor's chat template when it has one (else `<image> prompt`); the
answer follows as plain text, and `labels` mark its tokens (-100 elsewhere), HF-style: `labels[t]` is the
token at position t, the model shifts internally.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

IGNORE = -100
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


def tokenizer_of(processor):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)


def prompt_text(processor, prompt: str, has_image: bool) -> str:
    """The text the model sees before its answer: the chat template with a generation prompt."""
    if getattr(processor, "chat_template", None):
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"{token} {prompt}" if has_image else prompt


def _process(processor, text: str, image) -> dict[str, Tensor]:
    kwargs = {"text": [text], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    if not hasattr(processor, "image_processor"):   # a bare tokenizer: text-only model
        if image is not None:
            raise ValueError("this model has no image processor, so it cannot take an image; pass image=None")
        kwargs.pop("text")
        return dict(processor(text, return_tensors="pt"))
    return dict(processor(**kwargs))


def answer_tokens(processor, answer: str, *, eos: bool = False) -> list[int]:
    """The ids `encode` appends for `answer` (a leading space, no special tokens; EOS if `eos`).
    Raises if the answer tokenizes to nothing or to the tokenizer's unknown token."""
    tok = tokenizer_of(processor)
    ids = tok(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing; give a non-empty target")
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise ValueError(f"the answer {answer!r} holds words the tokenizer does not know (they map to "
                         f"{tok.unk_token!r}); use words from its vocabulary")
    return ids + [tok.eos_token_id] if eos and tok.eos_token_id is not None else ids


def encode(processor, image, prompt: str, answer: str | None = None, *, eos: bool = False) -> dict[str, Tensor]:
    """Inputs for one sample (batch of 1). With `answer`, `labels` hold its tokens (and EOS if `eos`)."""
    text = prompt_text(processor, prompt, image is not None)
    enc = _process(processor, text, image)
    enc.pop("token_type_ids", None)
    if answer is None:
        return enc
    answer_ids = answer_tokens(processor, answer, eos=eos)
    ans = torch.tensor([answer_ids], dtype=enc["input_ids"].dtype)
    n = ans.shape[1]
    enc["input_ids"] = torch.cat([enc["input_ids"], ans], 1)
    enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(ans)], 1)
    for key in ("mm_token_type_ids",):
        if key in enc:
            enc[key] = torch.cat([enc[key], torch.zeros_like(ans)], 1)
    labels = torch.full_like(enc["input_ids"], IGNORE)
    labels[:, -n:] = ans
    enc["labels"] = labels
    return enc


def collate(encodings: Sequence[dict[str, Tensor]], pad_id: int, side: str = "left") -> dict[str, Tensor]:
    """Pad a list of single-sample encodings into one batch; non-sequence tensors are concatenated."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    width = max(e["input_ids"].shape[1] for e in encodings)
    out: dict[str, Any] = {}
    keys = {k for e in encodings for k in e}
    for key in keys:
        parts = [e[key] for e in encodings if key in e]
        if key in SEQUENCE_KEYS:
            if len(parts) != len(encodings):
                raise ValueError(f"{key!r} is missing from some samples of the batch")
            fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
            padded = []
            for p in parts:
                pad = p.new_full((1, width - p.shape[1]), fill)
                padded.append(torch.cat([pad, p] if side == "left" else [p, pad], 1))
            out[key] = torch.cat(padded, 0)
        else:
            out[key] = torch.cat(parts, 0)
    return out


def pad_id_of(processor) -> int:
    tok = tokenizer_of(processor)
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def eos_id_of(model, processor=None) -> int | None:
    """The end-of-sequence id: the processor's tokenizer's, else the model's generation config's (first)."""
    eos = getattr(tokenizer_of(processor), "eos_token_id", None) if processor is not None else None
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) and eos else eos


def device_of(module) -> torch.device:
    """Where `module` computes. Under accelerate's `device_map` its weights may wait on the "meta" device
    (offloaded to CPU or disk) between calls: then the device its hook brings them to; else the device
    of its first parameter that holds data."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):          # accelerate's SequentialHook holds several
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
    real = next((p for p in module.parameters() if p.device.type != "meta"), None)
    return real.device if real is not None else torch.device("cpu")


def on_model(inputs: dict[str, Tensor], model) -> dict[str, Tensor]:
    """Inputs moved to the model's device; floating tensors (pixels) cast to its dtype."""
    device, dtype = device_of(model), next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
            if isinstance(v, Tensor) else v for k, v in inputs.items()}
