"""The input of one edit: an EditCase (encoded with the processor) or an HF inputs dict with labels,
checked before anything changes."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .data.case import EditCase, load_image
from .prompting import IGNORE, encode, on_model


def edit_inputs(model, processor, item, text_config=None) -> dict[str, Tensor]:
    """An EditCase, or an HF inputs dict with `labels` (-100 = ignore), checked and placed on the model's
    device: the input of one edit, for UniKE and the baselines alike."""
    if isinstance(item, EditCase):
        if processor is None:
            raise ValueError("editing an EditCase needs a processor: UniKE(model, processor); "
                             "or pass an inputs dict with `labels`")
        c = item
        inputs = encode(processor, load_image(c.image), c.prompt, c.target)
    elif isinstance(item, Mapping):
        inputs = dict(item)
        if "labels" not in inputs or "input_ids" not in inputs:
            raise ValueError("an inputs dict must hold `input_ids` and `labels` (-100 on prompt tokens)")
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    else:
        raise TypeError(f"edit() takes an EditCase or an inputs dict with labels, not {type(item).__name__}")
    _check_tensors(model, inputs)
    labels = inputs["labels"]
    if labels.shape != inputs["input_ids"].shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                         f"{tuple(inputs['input_ids'].shape)}")
    if not (labels != IGNORE).any(1).all():
        raise ValueError("a row of labels has no target token (all -100): mark the answer tokens")
    if labels[:, 0].ne(IGNORE).any():
        raise ValueError("labels mark the first token: the prompt must come before the answer")
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit and inputs["input_ids"].shape[1] > limit:
        raise ValueError(f"the edit input has {inputs['input_ids'].shape[1]} tokens, more than the model's "
                         f"context of {limit}; shorten the prompt or the target")
    return on_model(inputs, model)

def _check_tensors(model, inputs: dict) -> None:
    """Token ids are integers within the vocabulary, and every tensor holds data (dtype and device of
    the rest are fixed by `on_model`)."""
    for key in ("input_ids", "labels"):
        value = inputs[key]
        if not isinstance(value, Tensor) or value.dim() != 2:
            raise TypeError(f"`{key}` must be a [batch, tokens] tensor, not {type(value).__name__} "
                            f"{tuple(getattr(value, 'shape', ()))}")
        if value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"`{key}` holds {value.dtype}; it must hold integer token ids (torch.long), as "
                            "the processor returns them (labels: -100 where not trained)")
    meta = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.device.type == "meta"]
    if meta:
        raise ValueError(f"{meta} lie on the meta device and hold no data; pass real tensors "
                         "(unike moves them to the model's device)")
    for key, getter, ids in (("input_ids", "get_input_embeddings", inputs["input_ids"]),
                             ("labels", "get_output_embeddings", inputs["labels"][inputs["labels"] != IGNORE])):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        size = getattr(module, "num_embeddings", None) or getattr(module, "out_features", None)
        if size and len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < size:
            raise ValueError(f"`{key}` holds ids in [{int(ids.min())}, {int(ids.max())}] but the model has "
                             f"{size} tokens: were they made by another model's processor?")
