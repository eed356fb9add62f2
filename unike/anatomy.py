"""The anatomy of one decoder layer: which of its modules are the attention, the FFN and the FFN's input,
taken where their outputs come before the residual add (see `unike.locate`), and its width."""
from __future__ import annotations

import inspect
from collections import Counter

from torch import nn


class LocateError(ValueError):
    """The text decoder's layers could not be found (or a user-given path is wrong)."""


# Per-layer attribute names, most specific first.
_ATTN_NAMES = (("self_attn", "self"), ("self_attention", "self"), ("attention", "self"), ("attn", "self"),
               ("linear_attn", "linear"), ("cross_attn", "cross"), ("conv", "conv"), ("mamba", "ssm"),
               ("mixer", "mixer"))
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        if not part:
            return None
        mod = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if mod is None:
            return None
    return mod


def block_widths(block: nn.Module) -> set[int]:
    """Plausible widths of a block: the sizes of its own (direct-child) norms; else of any 1-D norm weight
    (q/k norms have head size, hence a set); else the commonest parameter dimension."""
    def norm_sizes(named):
        return {p.shape[0] for n, p in named if p.ndim == 1 and n.endswith("weight")
                and any(k in n.lower() for k in ("norm", "ln"))}

    direct = norm_sizes((f"{c}.{n}", p) for c, m in block.named_children()
                        for n, p in m.named_parameters(recurse=False))
    if direct:
        return direct
    nested = norm_sizes(block.named_parameters())
    if nested:
        return nested
    dims = Counter(d for p in block.parameters() for d in p.shape)
    return {dims.most_common(1)[0][0]} if dims else set()


def _first_child(block: nn.Module, names) -> tuple[str, nn.Module] | None:
    for n in names:
        m = block._modules.get(n)
        if isinstance(m, nn.Module):
            return n, m
    return None


def _takes_residual(mod: nn.Module) -> bool:
    try:
        return "residual" in inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):
        return False


def _pre_residual(block: nn.Module, rel: str) -> str:
    """Descend from a sub-layer that adds the residual itself to the module whose output comes before it."""
    mod = get_path(block, rel)
    kids = mod._modules
    # T5 / Pix2Struct / UDOP wrappers: norm -> inner module -> dropout, residual added in the wrapper
    if any("norm" in k.lower() for k in kids):
        for inner in ("SelfAttention", "attention", "DenseReluDense"):
            if isinstance(kids.get(inner), nn.Module):
                return f"{rel}.{inner}"
    # Bloom: forward(hidden_states, residual, ...) adds the residual; its last Linear is the output projection
    if _takes_residual(mod):
        linears = [n for n, c in mod.named_children() if isinstance(c, nn.Linear)]
        if linears:
            return f"{rel}.{linears[-1]}"
    return rel


def resolve_layer(block: nn.Module) -> tuple[dict[str, str], str]:
    """Relative paths of attn / mlp / mlp_in inside one decoder layer, plus the attention kind."""
    # T5 style: block.layer = [self-attention sub-layer, (cross-attention sub-layer), FF sub-layer]
    subs = block._modules.get("layer")
    if isinstance(subs, nn.ModuleList) and len(subs) >= 2 and "SelfAttention" in subs[0]._modules \
            and "DenseReluDense" in subs[-1]._modules:
        ff = f"layer.{len(subs) - 1}.DenseReluDense"
        return {"attn": "layer.0.SelfAttention", "mlp": ff, "mlp_in": ff}, "self"

    rel: dict[str, str] = {}
    kind = "self"
    # --- attention: BERT/GIT style first (attention = self + output; output adds the residual and a LayerNorm)
    att = block._modules.get("attention")
    if att is not None and isinstance(get_path(att, "output.dense"), nn.Linear) and "self" in att._modules:
        rel["attn"] = "attention.output.dense"
    else:
        hit = None
        for name, k in _ATTN_NAMES:
            if isinstance(block._modules.get(name), nn.Module):
                hit = (name, k)
                break
        if hit is None:
            raise LocateError(f"no attention module in {type(block).__name__}; children: {list(block._modules)}")
        rel["attn"], kind = _pre_residual(block, hit[0]), hit[1]
    # --- FFN
    ffn = _first_child(block, _FFN_NAMES)
    if ffn is not None:
        rel["mlp_in"] = ffn[0]
        rel["mlp"] = _pre_residual(block, ffn[0])
        if rel["mlp"].endswith("DenseReluDense"):
            rel["mlp_in"] = rel["mlp"]  # the wrapper's input is not yet normalised
    elif isinstance(block._modules.get("fc2"), nn.Module) and isinstance(block._modules.get("fc1"), nn.Module):
        rel["mlp"], rel["mlp_in"] = "fc2", "fc1"  # OPT / BART / Florence-2: no wrapper module
    elif "intermediate" in block._modules and isinstance(get_path(block, "output.dense"), nn.Linear):
        rel["mlp"], rel["mlp_in"] = "output.dense", "intermediate"  # BERT / GIT
    else:
        raise LocateError(f"no FFN module in {type(block).__name__}; children: {list(block._modules)}")
    return rel, kind
