"""Hide an image demonstration from the tokens after it, in chosen decoder layers only.

Format B items are trained with the query's attention to the demonstration blocked in the layers below
the ones UniKE edits, so that the model reads the demonstration in the edited layers, where latent IKE
can stand in for it. Each Llama decoder layer receives the 4-D mask `create_causal_mask` made (bool
[B, 1, T, T], True = attend, under sdpa; additive float under eager; None when sdpa can use its causal
kernel); a forward pre-hook on each chosen layer swaps in that mask with the blocked pairs removed.

    with hide(model, batch.pop("demo"), layers=(0, 1)):
        out = model(**batch)
"""
from __future__ import annotations

import contextlib

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from ..hooks import Hooks
from ..locate import locate


def blocked(demo: Bool[Tensor, "B T"]) -> Bool[Tensor, "B T T"]:
    """(query i, key j) pairs to block: i after the demonstration, j inside it."""
    after = (demo.cumsum(-1) > 0) & ~demo
    return after[:, :, None] & demo[:, None, :]


def _masked(mask: Tensor | None, block: Bool[Tensor, "B T T"]) -> Tensor:
    B, T, _ = block.shape
    if mask is None:  # sdpa's causal kernel: build the causal mask it stands for
        mask = torch.ones(T, T, dtype=torch.bool, device=block.device).tril()[None, None].expand(B, 1, T, T)
    if mask.shape[-2:] != (T, T):
        raise ValueError(f"hide() needs a full forward pass over the batch it was given ({T} tokens); the layer "
                         f"got a mask of shape {tuple(mask.shape)} (generation with a cache is not supported)")
    if mask.dtype == torch.bool:
        return mask & ~block[:, None]
    return mask.masked_fill(block[:, None], torch.finfo(mask.dtype).min)


@contextlib.contextmanager
def hide(model: nn.Module, demo: Bool[Tensor, "B T"] | None, layers=(0, 1)):
    """Within the block, tokens after the demonstration (`demo`: its tokens) cannot attend to it in `layers`."""
    if demo is None or not len(layers) or not demo.any():
        yield model
        return
    block = blocked(demo)
    stack = locate(model)

    def pre_hook(module, args, kwargs):
        kwargs["attention_mask"] = _masked(kwargs.get("attention_mask"), block.to(args[0].device if args else
                                                                                   kwargs["hidden_states"].device))
        return args, kwargs

    with Hooks() as hooks:
        for i in layers:
            hooks.pre(stack[i].block, pre_hook, with_kwargs=True)
        yield model
