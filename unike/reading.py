"""Latent knowledge read by each head of the edited layer's own attention (paper App. A taken literally).

The paper's h_know is Attn(x, H_know, H_know): the input's queries attend over the retrieved states, each
head with its own query, key and value projections. `UniKEConfig.latent_read = "heads"` does exactly that:
each memory entry keeps the layer's own key and value of its state h_pos (`Collector.attn_values` reads
them at position 0, where rotary embeddings are the identity, so the knowledge sits before the query as a
demonstration would), and for a token where the memory acts, every head h computes

    know_h = softmax(q_h · K_know,hᵀ · scaling) V_know,h       (over the token's retrieved entries)
    out_h  = (1 − α) · Attn_h(x, X) + α · know_h                (Eq. 7, per head, before o_proj)

with α from the semantic space (`unike.memory`), so that the paper's decomposition
Attn(x, [H_know; X]) = (1 − m)·Attn(x, X) + m·Attn(x, H_know) holds with the attention mass m replaced by
α, as Eq. 7 does. `"shift"` (the default) mixes one similarity-weighted value, o_proj(v_proj(h_pos)), into
the attention output instead, the same for every head.

The plumbing: an attention function registered with transformers' `AttentionInterface` under "unike".
Each edited layer's attention module gets its own copy of its config naming it, and it calls the model's
own implementation first (sdpa, eager, flash, ...), so with nothing to read the output is that
implementation's, bit for bit; `detach` gives the module its config back. Attention modules that do not
dispatch through the interface keep the output shift.
"""
from __future__ import annotations

import copy
import inspect
import sys
import weakref

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

NAME = "unike"
READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # attention module -> (reader, base name)


def dispatches(attn: nn.Module) -> bool:
    """Whether an attention module takes its attention function from `config._attn_implementation`."""
    try:
        source = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        return False
    return hasattr(getattr(attn, "config", None), "_attn_implementation") and "ALL_ATTENTION_FUNCTIONS" in source


def install(attn: nn.Module, reader) -> bool:
    """Point `attn` at the "unike" attention function, which calls `reader(module, query, key, value, out,
    scaling)` after the module's own implementation; False where the module does not dispatch."""
    if not dispatches(attn):
        return False
    config = copy.copy(attn.config)
    base = attn.config._attn_implementation
    config._attn_implementation_internal = NAME          # this copy only (the setter recurses into sub-configs)
    READERS[attn] = (reader, attn.config, base)
    attn.config = config
    return True


def uninstall(attn: nn.Module) -> None:
    """Give `attn` its own config (and attention function) back."""
    entry = READERS.pop(attn, None)
    if entry is not None:
        attn.config = entry[1]


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """The "unike" attention function: the model's own, then the module's reader (if any) on its output."""
    reader, _, base = READERS.get(module, (None, None, "sdpa"))
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", eager_attention_forward)
    out, weights = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)(module, query, key, value, attention_mask,
                                                                       **kwargs)
    if reader is None:
        return out, weights
    scaling = kwargs.get("scaling")
    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5) if scaling is None else scaling
    return reader(query, key, value, out, scaling), weights


AttentionInterface.register(NAME, attention)


def read_heads(query: Float[Tensor, "m h e"], keys: Float[Tensor, "m k g e"], values: Float[Tensor, "m k g e"],
               use: Tensor, scaling: float) -> Float[Tensor, "m h e"]:
    """Each head's attention over the retrieved entries' keys and values (`use`: which of the k count; g key
    heads shared by h / g query heads each)."""
    groups = query.shape[1] // keys.shape[2]
    keys, values = keys.repeat_interleave(groups, 2), values.repeat_interleave(groups, 2)
    scores = torch.einsum("mhe,mkhe->mhk", query, keys) * scaling
    weights = torch.softmax(scores.masked_fill(~use[:, None, :], -1e9), dim=-1)
    return torch.einsum("mhk,mkhe->mhe", weights, values)
