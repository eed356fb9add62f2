"""Write docs/architectures.md: where `unike.locate` finds the text layers of each supported architecture.

    .venv/bin/python scripts/gen_architectures.py          # writes docs/architectures.md (about 20 s on a CPU)
    .venv/bin/python scripts/gen_architectures.py --stdout # prints it instead

Three sources:

1. the tiny offline builders of ``tests/archs.py`` (each is built, located, and run once with recording hooks, so
   the table also shows the structure of the attention and FFN outputs);
2. full-size *default* configs of every image-text-to-text class in transformers, instantiated on the ``meta``
   device (no memory, no weights): structure only;
3. a fixed list of architectures that cannot be supported here, with the reason.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.archs import ARCHS, EXTRA_ARCHS  # noqa: E402
from unike.hooks import Hooks  # noqa: E402
from unike.locate import LocateError, locate  # noqa: E402

UNSUPPORTED = {
    "fast_vlm": "vision tower is a `TimmWrapperModel` (FastViTHD): needs `timm`, hence torchvision, which this stack "
                "does not install",
    "perception_lm": "vision tower is a `TimmWrapperModel`: needs `timm` / torchvision",
    "gemma3n": "MobileNetV5 vision tower through `TimmWrapperModel`: needs `timm` / torchvision (its text decoder "
               "would locate like Gemma 3)",
    "nemotron_h_omni": "NemotronH blocks hold *one* mixer each (Mamba, attention, MLP or MoE, by "
                       "`layers_block_type`), so a block has no attention + FFN pair; `locate` raises LocateError",
}

HOOK_FACTS = """\
## What a hook sees (transformers 5.24)

Recorded by running every tiny model once with forward hooks on the located modules; the conformance matrix
(`tests/test_conformance.py`) checks the same on every `generate` step, with and without the KV cache.

* **Attention modules are called with keyword arguments only** (`hidden_states=`, `position_embeddings=`,
  `attention_mask=`, `cache=`, ...): a forward *pre*-hook sees `args == ()` and needs `with_kwargs=True`. The
  exceptions are BART / Florence-2 (`hidden_states` positional) and the BERT-style `attention.output.dense`,
  GIT / BLIP (plain `Linear`).
* **The KV cache keyword is `cache`**, not `past_key_values`, in 5.x (layers and attention modules).
* **Attention output** is a tuple `(attn_output, attn_weights)` (weights `None` under SDPA) for every softmax
  attention, Mllama's cross-attention included; T5-style attention (Pix2Struct, UDOP, T5) returns
  `(attn_output, position_bias, attn_weights)`. Always take `output[0]`. **Plain tensors**: LFM2's `conv` (short convolution) layers,
  Qwen3.5's `linear_attn` (gated delta net), and the `Linear` sites chosen for BERT/GIT/BLIP and Bloom.
* **Rotary positions** are computed once per forward by the text model and passed to each attention as
  `position_embeddings=(cos, sin)`; `position_ids` is also passed to most, but **not** to the M-RoPE models
  (Qwen2/2.5/3-VL, Qwen3.5, GLM-4V: their 3-D position ids live only in the text model) and not to Mllama's
  cross-attention. In `generate` the M-RoPE models *do* pass 2-D text `position_ids`, while their rotary
  embedding still uses the 3-D ids computed inside the model: read positions from `position_embeddings`, not
  `position_ids`. In a plain forward, `position_ids` is `arange(T)` even with left padding, whereas `generate` derives
  them from `attention_mask.cumsum(-1) - 1`: teacher-forced scoring with left padding sees other positions than
  generation (pass `position_ids` or pad on the right). During cached decoding the positions continue from the
  cache length; a decode step's hidden states hold one token.
* **Attention mask** reaches attention modules as `None` when nothing is padded (SDPA's causal path) and as a
  boolean `[B, 1, T_q, T_k]` mask (True = attend) otherwise.
* **FFN output** is `[B, T, H]`, except: OPT `fc2` (BLIP-2) works on **flattened `[B*T, H]`** (its `fc1` input too);
  Llama4's MoE `feed_forward` returns a **tuple `(out [B*T, H], router_logits [B*T, E])`**. Aria, Qwen3-VL-MoE and
  Mixtral-style MoE blocks return a plain `[B, T, H]` tensor.
* **Residual inside the module**: GIT/BERT `output` (dense + LayerNorm(h + input)), Bloom and MPT (`forward(x,
  residual)`), T5 / Pix2Struct / UDOP sub-layers (norm, module, dropout, + residual). `locate` therefore points
  `attn` / `mlp` at the inner module whose output precedes the residual add (`attention.output.dense`,
  `output.dense`, `self_attention.dense`, `mlp.dense_4h_to_h`, `layer.0.SelfAttention`, `layer.2.DenseReluDense`).
* **Post-LN models** (BART / Florence-2, GIT, BLIP) normalise after the residual add: a constant added to the FFN
  output is erased by the LayerNorm; tests must perturb non-uniformly.
* **Gated layers**: Mllama's cross-attention layers multiply both their attention and MLP outputs by
  `tanh(gate)`, zero at init, so edits there do nothing in a random model (real checkpoints have non-zero gates).
* **`generate` forces the cache on** for decoder-only models started from `inputs_embeds` (BLIP-2, InstructBLIP):
  `use_cache=False` is silently ignored there.
* **Llama4 in transformers 5.24 is broken**: `Llama4ForConditionalGeneration.forward` reads `outputs.image_outputs`,
  which `MoeCausalLMOutputWithPast` does not have, so every forward raises `AttributeError`. The fixture adds the
  field with a forward hook on `language_model`.
* Tiny models run ~10x faster with `torch.set_num_threads(1)` than with two threads on two shared cores.
"""


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return "T"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_desc(y) for y in x) + ")"
    return "None" if x is None else type(x).__name__


def _shape_word(t: torch.Tensor, hidden: int, n_tok: int) -> str:
    if t.dim() == 2 and t.shape[0] == n_tok:
        return "[B*T, H]"
    return "[B, T, H]" if t.dim() == 3 else str(list(t.shape))


def _outputs(arch, stack) -> tuple[str, str]:
    """How the attention and FFN outputs look (as sets over the layers)."""
    attn, ffn = set(), set()
    with Hooks() as h:
        for ly in stack:
            def a(m, args, out):
                if isinstance(out, tuple):
                    attn.add(f"tuple {_desc(out)}".replace("T", "out", 1))
                else:
                    attn.add("tensor")

            def f(m, args, out):
                t = out[0] if isinstance(out, tuple) else out
                n_tok = t.numel() // t.shape[-1]
                word = _shape_word(t, stack.hidden_size, n_tok)
                ffn.add(f"tuple ({word}, ...)" if isinstance(out, tuple) else word)

            h.forward(ly.attn, a)
            h.forward(ly.mlp, f)
        with torch.no_grad():
            arch.model(**arch.inputs)
    return " / ".join(sorted(attn)), " / ".join(sorted(ffn))


def _rel(stack, role: str) -> str:
    """Relative path of a role, showing per-layer variants (Mllama's cross_attn, LFM2's conv, ...)."""
    seen: dict[str, list[int]] = {}
    for ly in stack:
        rel = ly.paths[role][len(ly.paths["block"]) + 1:]
        seen.setdefault(rel, []).append(ly.index)
    if len(seen) == 1:
        return f"`{next(iter(seen))}`"
    return ", ".join(f"`{r}` (layers {','.join(map(str, idx))})" for r, idx in seen.items())


def _vision(model: nn.Module, text_path: str) -> str:
    """The model's other layer stacks (vision tower, Q-Former, text encoder, ...), with their depth."""
    out = [f"`{name}` ({len(mod)})" for name, mod in model.named_modules()
           if isinstance(mod, nn.ModuleList) and len(mod) > 1 and name != text_path
           and not name.startswith(text_path + ".") and name.rsplit(".", 1)[-1].endswith(("layers", "layer", "blocks"))]
    return ", ".join(out) or "-"


def tiny_table(model_types: set[str]) -> list[str]:
    rows = ["| key | class | text layers (n x width) | attention | FFN (input if different) | attn out | FFN out | "
            "other stacks (depth) | notes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, build in {**ARCHS, **EXTRA_ARCHS}.items():
        arch = build()
        model_types.add(arch.model.config.model_type)
        stack = locate(arch.model)
        ffn = _rel(stack, "mlp")
        if any(ly.mlp_in is not ly.mlp for ly in stack):
            ffn += f" (in: {_rel(stack, 'mlp_in')})"
        a_out, f_out = _outputs(arch, stack)
        rows.append(f"| {key} | `{type(arch.model).__name__}` | `{stack.layers_path}` ({len(stack)} x "
                    f"{stack.hidden_size}) | {_rel(stack, 'attn')} | {ffn} | {a_out} | {f_out} | "
                    f"{_vision(arch.model, stack.layers_path)} | {arch.notes} |")
    return rows


class _Timeout(Exception):
    pass


def meta_table(tested: set[str]) -> tuple[list[str], list[str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as NAMES

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    ok = ["| model_type | class | text layers | n | last layer's attention | last layer's FFN | attention kinds |",
          "|---|---|---|---|---|---|---|"]
    bad = []
    for mt, clsname in sorted(NAMES.items()):
        signal.alarm(60)
        try:
            if mt in UNSUPPORTED:
                continue
            cfg = tf.AutoConfig.for_model(mt)
            with torch.device("meta"):
                model = getattr(tf, clsname)(cfg)
            stack = locate(model)
            last = stack[-1]
            n = len(last.paths["block"]) + 1
            kinds = ", ".join(sorted({ly.attn_kind for ly in stack}))
            ok.append(f"| {mt} | `{clsname}` | `{stack.layers_path}` | {len(stack)} | `{last.paths['attn'][n:]}` | "
                      f"`{last.paths['mlp'][n:]}` | {kinds} |")
        except LocateError as e:
            bad.append(f"| {mt} | `{clsname}` | LocateError: {str(e).splitlines()[0]} |")
        except _Timeout:
            bad.append(f"| {mt} | `{clsname}` | timed out building the default config |")
        except Exception as e:  # the default config itself does not build (needs a checkpoint's fields)
            msg = str(e).strip().splitlines()[0][:120].rstrip(".").replace("|", "\\|")
            also = " **Tested end to end above with a tiny config.**" if mt in tested else ""
            bad.append(f"| {mt} | `{clsname}` | default config does not build: {type(e).__name__}: {msg}.{also} |")
        finally:
            signal.alarm(0)
    return ok, bad


def render() -> str:
    t0 = time.time()
    tested: set[str] = set()
    tiny = tiny_table(tested)
    ok, bad = meta_table(tested)
    n_tiny = len(ARCHS) + len(EXTRA_ARCHS)
    lines = [
        "# Architectures",
        "",
        "Generated by `scripts/gen_architectures.py` (do not edit by hand). `unike.locate(model)` finds the text",
        "decoder's layers and, in each, the attention module and the FFN module whose outputs come *before* the",
        "residual add; see `unike/locate.py` for the search order and `stack.describe()` for a model's map.",
        "",
        f"## Tested end to end: {n_tiny} tiny offline models",
        "",
        "Built by `tests/archs.py` from hand-written configs (no hub), each with a vision tower **deeper (4 layers)",
        "and wider (64) than the text decoder (2-3 layers, width 32)**. `tests/test_conformance.py` checks on every",
        "one: the located layers match the text config and lie under `get_decoder()`, outside the vision modules;",
        "hooks on `attn`, `mlp` and `mlp_in` fire once per forward and once per `generate` step (cache on and off);",
        "perturbing any layer's attention or FFN output changes the logits (except Mllama's zero-gated cross-attention",
        "layers); removing the hooks restores bit-identical logits. The matrix runs in about 10-20 s on two CPU",
        "cores (one torch thread).",
        "",
        "Paths are relative to one layer. \"attn out\" / \"FFN out\": what a forward hook receives as `output`.",
        "",
        *tiny,
        "",
        "## Structure only: full-size default configs on the meta device",
        "",
        "Every image-text-to-text class registered in transformers 5.24 (`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`),",
        "instantiated from its default (full-size) config on `torch.device(\"meta\")`: no memory and no weights, so",
        "this checks where `locate` looks (and its validation against the real layer counts and widths), not that",
        "hooks run.",
        "",
        *ok,
        "",
        "### Not located from the default config",
        "",
        "| model_type | class | why |",
        "|---|---|---|",
        *bad,
        "",
        "## Cannot be supported on this stack",
        "",
        "| model_type | why |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in UNSUPPORTED.items()],
        "",
        HOOK_FACTS,
    ]
    print(f"rendered in {time.time() - t0:.1f} s", file=sys.stderr)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdout", action="store_true", help="print instead of writing docs/architectures.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    tf.logging.set_verbosity_error()
    torch.set_num_threads(1)
    text = render()
    if args.stdout:
        print(text)
    else:
        out = ROOT / "docs" / "architectures.md"
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
