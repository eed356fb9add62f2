"""Conformance matrix: `locate` + forward hooks on every tiny architecture in `tests/archs.py`.

For each architecture:

* `locate` finds the *text* layers: count and width equal the text config, and every located module lies
  under the decoder returned by `get_decoder()` and outside the vision tower / projector (checked by identity);
* forward hooks on each layer's `attn` and `mlp`, and a pre-hook on `mlp_in`, fire once per forward pass,
  and once per step of `generate` (prefill sees the prompt; cached steps see one token; uncached steps see
  the growing sequence);
* a non-uniform perturbation of any layer's FFN (and attention) output changes the logits;
* after the hooks are removed the logits are bit-identical (`torch.equal`) to the logits before hooking.

The whole matrix takes well under a minute on two CPU cores (see docs/architectures.md).
"""

from __future__ import annotations

import pytest
import torch

from archs import ARCHS, EXTRA_ARCHS  # tests/ is on sys.path (tests/conftest.py)
from unike.hooks import Hooks
from unike.locate import locate

BUILDERS = {**ARCHS, **EXTRA_ARCHS}
N_NEW = 3
# words that mark a non-text part of a VLM (vision tower, projector, Q-Former, resampler, audio, VQ tokenizer)
NON_TEXT = ("vision", "visual", "image", "video", "qformer", "perceiver", "resampler", "projector", "connector",
            "merger", "audio", "vq", "aligner")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _tokens(t: torch.Tensor, hidden: int) -> int:
    """Tokens in an activation, whether [B, T, H] or flattened [B*T, H] (batch size is 1 here)."""
    assert t.shape[-1] == hidden, f"last dim {t.shape[-1]} != hidden {hidden}"
    return t.numel() // hidden


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                              use_cache=use_cache)


def _noise(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g).to(t.dtype) * t.detach().float().std().clamp_min(1.0).item()


def _perturb(seed: int):
    """A forward hook adding a fixed, non-uniform perturbation to the output (first element if a tuple)."""

    def hook(module, args, out):
        t = _first(out)
        t = t + _noise(t, seed)
        return (t, *out[1:]) if isinstance(out, tuple) else t

    return hook


def _gated_off(layer) -> bool:
    """Mllama cross-attention layers multiply both their attention and their MLP output by tanh(gate), and random
    init sets the gates to 0: nothing done to those outputs can reach the logits in an untrained model."""
    return layer.attn_kind == "cross" and hasattr(layer.block, "cross_attn_mlp_gate")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are faster on one thread; two threads on two shared cores are 10x slower at worst."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def arch(request):
    a = BUILDERS[request.param]()
    a.extra["stack"] = locate(a.model)
    a.extra["base"] = _logits(a.model, a.inputs)
    return a


def test_locate_finds_the_text_layers(arch):
    model, stack = arch.model, arch.extra["stack"]
    tc = model.config.get_text_config(decoder=True)
    n_expected = getattr(tc, "decoder_layers", None) or getattr(tc, "num_decoder_layers", None) or tc.num_hidden_layers
    assert len(stack) == stack.num_layers == n_expected
    assert stack.hidden_size == tc.hidden_size

    decoder = set(map(id, model.get_decoder().modules()))
    non_text = {id(m) for name, mod in model.named_modules()
                if any(w in part for part in name.lower().split(".") for w in NON_TEXT) for m in mod.modules()}
    for layer in stack:
        for role in ("block", "attn", "mlp", "mlp_in"):
            mod, path = getattr(layer, role), layer.paths[role]
            assert model.get_submodule(path) is mod, (role, path)
            assert id(mod) in decoder, f"{role} at {path} is not under get_decoder()"
            assert id(mod) not in non_text, f"{role} at {path} is inside a vision / projector module"
    assert stack.layers_path in stack.describe()


def _record_token_counts(h: Hooks, stack, hidden: int, seen: dict) -> None:
    """Hook every located attn, mlp and mlp_in; each call appends its token count to seen[(layer, role)]."""
    def rec(key, t):
        seen.setdefault(key, []).append(_tokens(t, hidden))

    for ly in stack:
        h.forward(ly.attn, lambda m, a, o, k=(ly.index, "attn"): rec(k, _first(o)))
        h.forward(ly.mlp, lambda m, a, o, k=(ly.index, "mlp"): rec(k, _first(o)))
        h.pre(ly.mlp_in, lambda m, a, k=(ly.index, "mlp_in"): rec(k, a[0]))


def test_hooks_fire_once_per_forward(arch):
    model, stack, H = arch.model, arch.extra["stack"], arch.extra["stack"].hidden_size
    seen: dict[tuple, list[int]] = {}
    with Hooks() as h:
        _record_token_counts(h, stack, H, seen)
        assert len(h) == 3 * len(stack)
        logits = _logits(model, arch.inputs)
    assert torch.equal(logits, arch.extra["base"])  # recording hooks change nothing
    assert set(seen) == {(ly.index, r) for ly in stack for r in ("attn", "mlp", "mlp_in")}
    for key, toks in seen.items():
        assert len(toks) == 1, f"{key} fired {len(toks)} times"
    n_tok = {t for toks in seen.values() for t in toks}
    assert len(n_tok) == 1, f"token counts differ between sites: {seen}"


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_hooks_fire_at_each_generate_step(arch, use_cache):
    model, stack, H = arch.model, arch.extra["stack"], arch.extra["stack"].hidden_size
    seen: dict[tuple, list[int]] = {}
    with Hooks() as h:
        _record_token_counts(h, stack, H, seen)
        _generate(model, arch.inputs, use_cache)
    for key, toks in seen.items():
        assert len(toks) == N_NEW, f"{key}: {len(toks)} calls for {N_NEW} new tokens ({toks})"
        first = toks[0]
        if use_cache or arch.extra.get("forces_cache"):
            # generate() from inputs_embeds (BLIP-2, InstructBLIP) forces the cache on: transformers'
            # GenerationMixin sets use_cache=True for decoder-only models started from embeddings
            assert toks == [first] + [1] * (N_NEW - 1), f"{key}: {toks}"
        else:
            assert toks == [first + i for i in range(N_NEW)], f"{key}: {toks}"
    assert len(seen) == 3 * len(stack)


@pytest.mark.parametrize("role", ["mlp", "attn"])
def test_perturbing_an_output_changes_the_logits(arch, role):
    model, stack = arch.model, arch.extra["stack"]
    checked = 0
    for ly in stack:
        if _gated_off(ly):
            continue  # see _gated_off: the gate is tanh(0) = 0 at init, so the edit cannot show
        with Hooks() as h:
            h.forward(getattr(ly, role), _perturb(seed=ly.index))
            logits = _logits(model, arch.inputs)
        assert not torch.equal(logits, arch.extra["base"]), f"perturbing layer {ly.index} {role} did nothing"
        checked += 1
    assert checked >= 1
    # the last layer is always checked (Mllama's cross-attention layers are never last in these fixtures)
    assert not _gated_off(stack[-1])


def test_removal_restores_bit_identical_logits(arch):
    model, stack = arch.model, arch.extra["stack"]
    before_hooks = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()}
    gen_before = _generate(model, arch.inputs, True)
    h = Hooks()
    for ly in stack:
        h.forward(ly.attn, _perturb(seed=100 + ly.index))
        h.forward(ly.mlp, _perturb(seed=200 + ly.index))
        h.pre(ly.mlp_in, lambda m, a: None)
    edited = _logits(model, arch.inputs)
    if not all(_gated_off(ly) for ly in stack):
        assert not torch.equal(edited, arch.extra["base"])
    h.remove()
    h.remove()  # idempotent
    assert len(h) == 0
    assert torch.equal(_logits(model, arch.inputs), arch.extra["base"])
    assert torch.equal(_generate(model, arch.inputs, True), gen_before)
    after_hooks = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()}
    assert after_hooks == before_hooks
