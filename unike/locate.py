"""Find the language decoder's layers in any Hugging Face (vision-)language model.

A vision-language model holds several stacks of transformer blocks: the vision tower, sometimes a Q-Former
or a perceiver resampler, and the text decoder. UniKE edits only the text decoder, so everything here is
about finding that stack, and never the vision tower, even when the vision tower is deeper or wider.

    stack = locate(model)              # TextStack
    stack[-1].mlp, stack[-1].attn      # nn.Modules inside the last decoder layer
    print(stack.describe())            # the layer map, for notebooks

Resolution order (the first that yields a stack passing validation wins):

1. ``layers="model.language_model.layers"``, a dotted path given by the user (trusted: a size mismatch only
   warns);
2. ``model.get_decoder()``, then its layer list at ``layers``, ``decoder.layers``, ``encoder.layer``, ``h``,
   ``blocks`` or ``block``, following nested ``get_decoder()`` (BLIP-2's OPT, Llama4's text model);
3. a short table of known paths, then the rule "last ``ModuleList`` called layers / layer / h / blocks whose
   path has no vision / visual / qformer / perceiver / resampler / projector / audio component".

Validation compares the stack with ``model.config.get_text_config()``: the number of layers
(``num_hidden_layers``, or ``decoder_layers`` for encoder-decoders) and the width (``hidden_size``, which
config attribute maps turn into ``d_model``, ``n_embd``, ``embed_dim`` ...).

Per layer we then name four modules (see :class:`Layer`). Their outputs are the *pre-residual* attention
and FFN outputs, which is where UniKE adds its latent and intrinsic knowledge. In transformers 5.x:

* attention modules return a tuple ``(attn_output, attn_weights)``; take ``output[0]``;
* most FFN modules return a tensor ``[B, T, H]``; MoE blocks may return a tuple (Llama4:
  ``(out, router_logits)``) and OPT's ``fc2`` / Llama4's MoE work on *flattened* ``[B*T, H]`` tensors;
* BART / OPT / Florence-2 have no FFN wrapper: ``fc1`` and ``fc2`` sit on the layer, so ``mlp`` is ``fc2``
  and ``mlp_in`` (whose first input is the FFN input) is ``fc1``; GIT / BERT style layers use
  ``intermediate`` (in) and ``output.dense`` (out, before ``output``'s residual + LayerNorm).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

from torch import nn

from .anatomy import LocateError, block_widths, get_path, resolve_layer

__all__ = ["Layer", "TextStack", "LocateError", "locate"]


# Names a layer list may have, relative to the decoder module returned by `get_decoder()`.
_DECODER_LISTS = ("layers", "decoder.layers", "encoder.layer", "h", "blocks", "block", "layer")

# Known absolute paths (tried after get_decoder()); order matters only for models with several matches.
_KNOWN_PATHS = (
    "model.language_model.layers",  # LLaVA family, Qwen-VL, Gemma3, Mllama, Aria, InternVL, ...
    "model.text_model.layers",  # Idefics2/3, SmolVLM
    "language_model.model.layers",  # InstructBLIP, Llama4
    "language_model.model.decoder.layers",  # BLIP-2 (OPT)
    "model.language_model.decoder.layers",  # Florence-2 (BART)
    "text_model.model.layers",  # Kosmos-2
    "git.encoder.layer",  # GIT
    "language_model.layers",
    "text_model.layers",
    "model.layers",  # Llama, Mistral, Qwen, Gemma ... causal LMs
    "model.decoder.layers",  # OPT, BART
    "transformer.h",  # GPT-2, Bloom, Falcon
    "gpt_neox.layers",
    "transformer.blocks",  # MPT
)

_LIST_NAMES = {"layers", "layer", "h", "blocks", "block"}

# A path component containing one of these words belongs to a non-text part of the model.
_NON_TEXT = ("vision", "visual", "image", "video", "qformer", "perceiver", "resampler", "projector", "connector",
             "merger", "audio", "speech", "vqmodel", "patch")
_NON_TEXT_EXACT = {"vit", "vq", "encoder_vision"}

@dataclass
class Layer:
    """One decoder layer and the modules UniKE hooks.

    Attributes:
        index: position in the stack.
        block: the decoder layer itself.
        attn: the token-mixing module; its output (``output[0]`` when a tuple) is the attention output before the
            residual add. Usually self-attention; see ``attn_kind`` for Mllama's gated cross-attention layers,
            Qwen3.5's linear attention and LFM2's short convolutions.
        mlp: the module whose output (``output[0]`` when a tuple) is the FFN output before the residual add. May be
            flattened ``[B*T, H]`` (OPT ``fc2``, Llama4 MoE).
        mlp_in: the module whose first positional input is the FFN input ``q`` (``mlp`` itself, except for
            OPT / BART / Florence-2 where it is ``fc1``, and GIT / BERT where it is ``intermediate``).
        paths: dotted paths of ``block``, ``attn``, ``mlp`` and ``mlp_in`` inside the model.
        attn_kind: ``"self"``, ``"cross"`` (Mllama), ``"linear"`` (Qwen3.5, MiniCPM-V 4.6), ``"conv"`` (LFM2),
            ``"ssm"`` (a ``mamba`` mixer) or ``"mixer"``.
    """

    index: int
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    mlp_in: nn.Module
    paths: dict[str, str] = field(default_factory=dict)
    attn_kind: str = "self"

    def __repr__(self) -> str:
        p = self.paths
        return (f"Layer({self.index}, attn={p.get('attn')} [{type(self.attn).__name__}, {self.attn_kind}], "
                f"mlp={p.get('mlp')} [{type(self.mlp).__name__}])")


class TextStack(Sequence[Layer]):
    """The located text decoder: a sequence of :class:`Layer` plus what it was checked against.

    Supports ``len(stack)``, ``stack[i]``, ``stack[-4:]`` (a list) and iteration.
    """

    def __init__(self, model: nn.Module, layers_path: str, layers: list[Layer], hidden_size: int | None,
                 text_config, how: str):
        self.model = model
        self.layers_path = layers_path
        self.layers = layers
        self.hidden_size = hidden_size
        self.text_config = text_config
        self.how = how  # which strategy found it: "override", "get_decoder", "known path" or "rule"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @overload
    def __getitem__(self, i: int) -> Layer: ...

    @overload
    def __getitem__(self, i: slice) -> list[Layer]: ...

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def describe(self) -> str:
        """A readable layer map: where the stack is, and each layer's attention and FFN modules."""
        head = (f"{type(self.model).__name__}: {len(self)} text layers at `{self.layers_path}` "
                f"(hidden {self.hidden_size}, found by {self.how})")
        cells = []
        for ly in self.layers:
            rel = {k: v[len(self.layers_path) + 1:] for k, v in ly.paths.items()}
            kind = "" if ly.attn_kind == "self" else f", {ly.attn_kind}"
            mlp = f"{rel['mlp']} [{type(ly.mlp).__name__}]"
            if ly.mlp_in is not ly.mlp:
                mlp += f" (input: {rel['mlp_in']})"
            cells.append((f"{rel['attn']} [{type(ly.attn).__name__}{kind}]", mlp))
        w = max(len(a) for a, _ in cells)
        rows = [f"  {a:<{w}}  {m}" for a, m in cells]
        return "\n".join([head] + rows)

    def __repr__(self) -> str:
        return f"TextStack({self.layers_path!r}, {len(self)} layers, hidden={self.hidden_size})"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, mod in model.named_modules(remove_duplicate=False):
        if mod is target:
            return name
    return None


def _is_non_text(path: str) -> bool:
    for comp in path.lower().split("."):
        if comp in _NON_TEXT_EXACT or any(w in comp for w in _NON_TEXT):
            return True
    return False


def _cfg_int(cfg, *names) -> int | None:
    for n in names:
        try:
            v = getattr(cfg, n)
        except Exception:  # some configs raise on unset mapped attributes
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _text_config(model: nn.Module):
    """``config.get_text_config(decoder=True)``; when that has no sizes (PI0 returns itself), the first sub-config's
    text config that has them (PI0: ``vlm_config``)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(getattr(cfg, "get_text_config", None)):
        return cfg
    try:
        tc = cfg.get_text_config(decoder=True)
    except Exception:
        return cfg
    if _expected(tc) == (set(), None):
        for name in getattr(cfg, "sub_configs", None) or {}:
            sub = getattr(cfg, name, None)
            try:
                cand = sub.get_text_config(decoder=True)
            except Exception:
                continue
            if _expected(cand)[0]:
                return cand
    return tc


def _expected(text_config) -> tuple[set[int], int | None]:
    """Acceptable layer counts and the hidden size from the text config (empty / None when unknown)."""
    if text_config is None:
        return set(), None
    counts = {c for c in (_cfg_int(text_config, "decoder_layers"), _cfg_int(text_config, "num_decoder_layers"),
                          _cfg_int(text_config, "num_hidden_layers", "num_layers", "n_layer", "n_layers"))
              if c is not None}
    width = _cfg_int(text_config, "hidden_size", "d_model", "n_embd", "embed_dim", "dim")
    return counts, width


def _check(lst: nn.ModuleList, counts: set[int], width: int | None) -> str | None:
    """None if the list looks like the text decoder, else the reason it does not."""
    if counts and len(lst) not in counts:
        return f"{len(lst)} layers, text config says {sorted(counts)}"
    if width is not None and len(lst):
        widths = block_widths(lst[0])
        if widths and width not in widths:
            return f"width {sorted(widths)}, text config says {width}"
    return None


def _candidates(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, len(m)) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]


def _build(model: nn.Module, path: str, lst: nn.ModuleList, width: int | None, tc, how: str) -> TextStack:
    if width is None:  # no config to read it from: infer it from the first block's norms
        widths = block_widths(lst[0])
        width = next(iter(widths)) if len(widths) == 1 else None
    layers = []
    for i, block in enumerate(lst):
        rel, kind = resolve_layer(block)
        mods = {k: get_path(block, v) for k, v in rel.items()}
        paths = {"block": f"{path}.{i}", **{k: f"{path}.{i}.{v}" for k, v in rel.items()}}
        layers.append(Layer(i, block, mods["attn"], mods["mlp"], mods["mlp_in"], paths, kind))
    return TextStack(model, path, layers, width, tc, how)


def _decoder_of(module: nn.Module) -> nn.Module | None:
    fn = getattr(module, "get_decoder", None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # some models raise for a missing bespoke rule; fall back to the search
        return None


def _error(model: nn.Module, reasons: list[str], counts: set[int] = frozenset(), head: str = "") -> LocateError:
    cands = _candidates(model)
    lines = [head or f"could not find the text decoder layers of {type(model).__name__}."]
    if reasons:
        lines.append("rejected: " + "; ".join(reasons))
    if cands:
        lines.append("ModuleLists in the model (path: length):")
        lines += [f"  {n}: {k}" for n, k in cands]
        text = [(n, k) for n, k in cands if not _is_non_text(n)]
        best = [n for n, k in text if k in counts] or [n for n, _ in text] or [n for n, _ in cands]
        example = best[-1]
    else:
        lines.append("the model has no nn.ModuleList.")
        example = "model.language_model.layers"
    lines.append(f'pass the text decoder\'s layer list explicitly, e.g. locate(model, layers="{example}")')
    return LocateError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def locate(model: nn.Module | object, layers: str | None = None) -> TextStack:   # object: an nnsight wrapper
    """Find the text decoder layers of ``model`` and, in each, the attention and FFN modules.

    Args:
        model: a Hugging Face model (VLM, causal LM or encoder-decoder), any ``nn.Module`` tree, or an nnsight
            wrapper of one (``NNsight(model)``; its torch module is used, and the paths work on the envoy too).
        layers: optional dotted path to the decoder's ``nn.ModuleList`` (e.g. ``"model.language_model.layers"``),
            which overrides the search.

    Returns:
        A :class:`TextStack`.

    Raises:
        LocateError: the path given does not lead to a non-empty ``ModuleList``, or no candidate stack passed
            validation; the message lists every ``ModuleList`` in the model and shows the override to pass.

    Example:
        >>> stack = locate(model)
        >>> stack.layers_path
        'model.language_model.layers'
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module  # an nnsight Envoy / NNsight wrapper
    if not isinstance(model, nn.Module):
        raise TypeError(f"locate() needs an nn.Module (or an nnsight wrapper of one), got {type(model).__name__}")
    tc = _text_config(model)
    counts, width = _expected(tc)

    # 1. user override
    if layers is not None:
        lst = get_path(model, layers)
        if not isinstance(lst, nn.ModuleList) or len(lst) == 0:
            what = "nothing" if lst is None else type(lst).__name__
            raise _error(model, [], counts, head=f"layers={layers!r} leads to {what}, not a non-empty nn.ModuleList "
                                                f"(in {type(model).__name__}).")
        why = _check(lst, counts, width)
        if why is not None:
            warnings.warn(f"locate: `{layers}` has {why}; using it as asked", stacklevel=2)
        return _build(model, layers, lst, width, tc, "override")

    reasons: list[str] = []
    seen: set[str] = set()

    def try_path(path: str, how: str) -> TextStack | None:
        if path in seen:
            return None
        seen.add(path)
        lst = get_path(model, path)
        if not isinstance(lst, nn.ModuleList) or len(lst) == 0:
            return None
        if _is_non_text(path):
            reasons.append(f"{path} (non-text path)")
            return None
        why = _check(lst, counts, width)
        if why is not None:
            reasons.append(f"{path} ({why})")
            return None
        try:
            return _build(model, path, lst, width, tc, how)
        except LocateError as e:
            reasons.append(f"{path} ({e})")
            return None

    # 2. get_decoder(), following nested wrappers (OPTForCausalLM -> OPTModel -> decoder ...)
    dec = _decoder_of(model)
    for _ in range(4):
        if not isinstance(dec, nn.Module):
            break
        base = _path_of(model, dec)
        if base is None:
            break
        for rel in _DECODER_LISTS:
            found = try_path(f"{base}.{rel}" if base else rel, "get_decoder")
            if found is not None:
                return found
        nxt = _decoder_of(dec)
        if nxt is None or nxt is dec:
            # search below the decoder only, with the naming rule
            for name, mod in reversed(list(dec.named_modules())):
                if name and isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LIST_NAMES:
                    found = try_path(f"{base}.{name}" if base else name, "get_decoder")
                    if found is not None:
                        return found
            break
        dec = nxt

    # 3a. known paths
    for path in _KNOWN_PATHS:
        found = try_path(path, "known path")
        if found is not None:
            return found

    # 3b. the rule: last ModuleList named layers / layer / h / blocks outside non-text parts of the model
    for name, mod in reversed(list(model.named_modules())):
        if name and isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LIST_NAMES:
            found = try_path(name, "rule")
            if found is not None:
                return found

    raise _error(model, reasons, counts)
