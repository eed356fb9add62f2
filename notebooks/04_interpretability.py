# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Interpretability with nnsight
#
# While an editor is attached, every UniKE component is a submodule of the decoder layer it acts on, so
# [nnsight](https://nnsight.net) reads and overwrites it by name. In each edited layer the latent memory
# shifts the attention output of every token $x$ (Eq. 2 and 7) and the new neurons add to the FFN output
# (Eq. 3 and 6):
# $$h' = (1-\alpha)\,\mathrm{Attn}(x, X, X) + \alpha\,\mathrm{Attn}(x, H_{know}, H_{know}),
# \qquad \mathrm{FFN}'(q) = \mathrm{FFN}(q) + \sigma(qK + b)\,(V + \beta\,\zeta'),$$
# with $\mathrm{Attn}(x, H_{know}, H_{know}) = h_{know} = \sum_i w_i v_i$ over the token's top-K memory
# entries and $\alpha = \mathrm{clamp}\big(\cos(\mathrm{Enc}_{sem}(\sum_i w_i\,h_{pos,i}), x),\ 0,\ 1\big)$.
#
# | module in `layers[l]` | output |
# |---|---|
# | `unike_memory.alpha` | $\alpha$ per token, `[tokens]`: how much retrieved knowledge is mixed in (Eq. 7) |
# | `unike_memory.know` | $h_{know}$, `[tokens, d]`: the retrieved knowledge in attention-output space (zero rows where the relevance gate is shut, except inside `editor.full_retrieval()`) |
# | `unike_memory.state` | $\sum_i w_i\,h_{pos,i}$, `[tokens, d]`: the retrieved states (the same) |
# | `unike_neurons.activation` | $\sigma(qK + b)$, the new neurons' activations, `[..., tokens, N]` (10 per edit) |
# | `unike_neurons.zeta_term` | $\beta\,\zeta'$ per edit, `[edits, d]` (Eq. 6) |
#
# Attach UniKE first, then wrap the model with `NNsight`. Inside a trace, read modules in the order the
# forward runs them: layer by layer, and within a layer the memory before the neurons. The first code cell
# holds the parameters, as in notebook 01.

# %% tags=["parameters"]
import torch

MODEL = None        # None: unike.load_tiny(); else a Hugging Face id (AutoModelForImageTextToText, device_map="auto")
DATA = None         # None: SynthWorld; else MMEdit E-VQA / E-IC JSON files and their image root (unike.load_mmedit)
DEVICE = "cpu"      # where the tiny model runs; a real model is placed by device_map="auto"
DTYPE = None        # None: the checkpoint's dtype; torch.bfloat16 for a real model
N_TRIPLETS = 500    # fit triplets (the README's table: 2000)
N_EVAL = 1          # edit cases per task

# %%
import unike
from unike import tutorial

if DEVICE == "cpu":
    torch.set_num_threads(1)   # CI runs on small shared machines; use more threads on your own
run = tutorial.setup(MODEL, DATA, device=DEVICE, dtype=DTYPE, n_triplets=N_TRIPLETS, n_eval=N_EVAL)
model, processor, triplets, cases = run.model, run.processor, run.triplets, run.cases
print(run)

# %%
case = cases["vqa"][0]
editor = unike.UniKE(model, processor).fit(triplets)
editor.edit(case)
probes = tutorial.probes(case)     # {what it asks: (image, prompt)}, as in notebook 01
print(f"edit: {case.prompt!r}  {case.ground_truth!r} -> {case.target!r}")

# %%
import operator

import nnsight
from nnsight import NNsight

traced = NNsight(model)                                        # after attaching
layers_path = unike.locate(model).layers_path                  # e.g. "model.language_model.layers"
layers = operator.attrgetter(layers_path)(traced)
inputs_for = lambda image, prompt: tutorial.inputs(model, processor, image, prompt)  # noqa: E731
tokenizer = processor.tokenizer
print(f"nnsight {nnsight.__version__}; decoder layers at {layers_path}")

# %% [markdown]
# ## α per token and layer
#
# A heat-map of $\alpha$ over the prompt's text tokens (the image's tokens are summarised in the title) at
# each edited layer, for the edit, a rephrasing, and unrelated questions. Where the memory acts is decided
# once, at the first edited layer (whose states no edit has moved), and α with it: the edit's entry opens
# where the edit's scope (its router gate) lets it in, and $\alpha$ is exactly 0 everywhere else.

# %%
image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", -1)


def alpha_map(image, prompt):
    """α [edited layers, tokens] for one input, read with nnsight; and the input ids."""
    inputs = inputs_for(image, prompt)
    with traced.trace(**inputs):
        alpha = nnsight.save([])
        for l in editor.layer_ids:
            alpha.append(layers[l].unike_memory.alpha.output)
    return torch.stack(alpha).detach().float().cpu(), inputs["input_ids"][0].cpu()


# %%
import matplotlib.pyplot as plt

shown = [name for name in ("the edit", "rephrased question", "same image, other fact",
                           "unrelated text question") if name in probes]
fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 2.8), squeeze=False, sharey=True)
for ax, name in zip(axes[0], shown):
    alpha, ids = alpha_map(*probes[name])
    text = ids != image_id
    picture = alpha[:, ~text].max().item() if (~text).any() else 0.0
    im = ax.imshow(alpha[:, text], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(int(text.sum())), tokenizer.convert_ids_to_tokens(ids[text]), rotation=90, fontsize=7)
    ax.set_yticks(range(len(editor.layer_ids)), [f"layer {l}" for l in editor.layer_ids], fontsize=8)
    ax.set_title(f"{name}\n(image tokens: max α {picture:.2f})", fontsize=8)
fig.colorbar(im, ax=axes[0].tolist(), label="α")
plt.show()

# %% [markdown]
# ## What a query retrieves
#
# A token where an edit is open retrieves that edit's entry alone; `LatentMemory.nearest(x)` shows what
# else lies near: the top-K (`top_k=40`) entries by cosine between standardised states (entry i of the
# first `n_fit` is the i-th fit triplet; the edits' entries follow). Fit entries of the fact the edit
# changed are masked (`LatentMemory.masked`) and would not be retrieved. Below: the question's last token
# at the layer where its $\alpha$ is largest, read with nnsight as the input of that decoder layer, and
# `editor.edits.switch.decision`, what the first edited layer decided in that forward.

# %%
alpha, _ = alpha_map(case.image, case.prompt)
l = editor.layer_ids[int(alpha[:, -1].argmax())]
with traced.trace(**inputs_for(case.image, case.prompt)):
    x = layers[l].input.save()                   # the state entering layer l: [1, tokens, d]
memory = editor.memory[l]
sims, idx = memory.nearest(x[0, -1:])            # the question's last token

# %%
n_fit = int(memory.n_fit)
opened = editor.edits.switch.decision.open[-1].nonzero().flatten().tolist()
print(f"layer {l}: α = {alpha[editor.layer_ids.index(l), -1]:.2f}; edits open at the last token: {opened}")
for s, i in zip(sims[0, :8].tolist(), idx[0, :8].tolist()):
    entry = (f"fit triplet {i}: {triplets[i].question!r} -> {triplets[i].right!r}" if i < n_fit
             else f"edit {i - n_fit}: {case.prompt!r} -> {case.target!r}")
    print(f"  cos {s:.3f}  {'masked' if i < n_fit and memory.masked[i] else '':6}  {entry}")

# %% [markdown]
# ## The edit's neurons
#
# The new neurons' activations $\sigma(qK + b)$ at the last prompt token, summed over the edit's neurons,
# per edited layer. ReLU gives an exact zero where the neurons do not match: they should fire on the edit
# and its generality probes and stay at zero on the locality probes.

# %%
def activations(image, prompt):
    """The new neurons' activations at the last token, summed per edited layer: [layers]."""
    with traced.trace(**inputs_for(image, prompt)):
        acts = nnsight.save([])
        for l in editor.layer_ids:
            out = layers[l].unike_neurons.activation.output
            acts.append(out.reshape(-1, out.shape[-1])[-1].sum())
    return torch.stack(acts).detach().float().cpu()


# %%
fired = {name: activations(*probe) for name, probe in probes.items()}
fig, ax = plt.subplots(figsize=(8, 3))
step = 0.8 / len(editor.layer_ids)
for j, l in enumerate(editor.layer_ids):
    ax.bar([i + j * step for i in range(len(fired))], [a[j].item() for a in fired.values()], step, label=f"layer {l}")
ax.set_xticks([i + 0.4 - step / 2 for i in range(len(fired))], list(fired), rotation=20, ha="right", fontsize=8)
ax.set(ylabel="summed activation")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Steering α and ζ
#
# The same modules can be overwritten inside a trace. Below, the edit's prompt runs with $\alpha$ forced to
# 0 (no external knowledge) or 1 (retrieved knowledge replaces every token's attention output), $\zeta'$
# scaled, and the new neurons switched off; the table shows the next-token prediction and the
# probabilities of the target and of the original answer (their first tokens), and how far the logits
# moved from the edited model's. Tokens where the memory does not act skip retrieval (their $h_{know}$
# is a zero row), so the traces run inside `editor.full_retrieval()`, where every token retrieves its
# knowledge (an open edit's entry, else its top-K fitted entries).

# %%
inputs = inputs_for(case.image, case.prompt)
target, original = tutorial.first_token(processor, case.target), tutorial.first_token(processor, case.ground_truth)


def steered(alpha=None, zeta=1.0, neurons=True):
    """Next-token logits with α set, ζ′ scaled or the new neurons off at every edited layer."""
    with editor.full_retrieval(), traced.trace(**inputs):
        for l in editor.layer_ids:                     # execution order: memory, then neurons
            if alpha is not None:
                layers[l].unike_memory.alpha.output[:] = alpha
            if not neurons:
                layers[l].unike_neurons.activation.output[:] = 0
            if zeta != 1.0:
                layers[l].unike_neurons.zeta_term.output[:] *= zeta
        logits = traced.output.logits[0, -1].save()
    return logits.detach().float().cpu()


# %%
settings = {"as edited": {}, "α = 0": dict(alpha=0.0), "α = 1 on every token": dict(alpha=1.0),
            "ζ′ = 0": dict(zeta=0.0), "ζ′ × 5": dict(zeta=5.0), "new neurons off": dict(neurons=False),
            "α = 0 and neurons off": dict(alpha=0.0, neurons=False)}
results = {name: steered(**s) for name, s in settings.items()}
with editor.disabled(), torch.no_grad():
    results["editor disabled (base)"] = model(**inputs).logits[0, -1].float().cpu()

# %%
width = max(map(len, results))
print(f"{'':{width}}  {'top token':>12}  {'p(target)':>10}  {'p(original)':>11}  {'max |Δ logit|':>13}")
for name, logits in results.items():
    p = logits.softmax(-1)
    moved = (logits - results["as edited"]).abs().max()
    print(f"{name:{width}}  {tokenizer.decode(p.argmax()):>12}  {p[target]:10.3f}  {p[original]:11.3f}  {moved:13.3f}")
editor.detach()
print("detached")

# %% [markdown]
# Read the table row by row. In the published run, forcing $\alpha = 0$ gives the unedited answer back
# even though the new neurons are still in place: they were trained on the states that the shift of the
# edit's own knowledge produces at its question (where $\alpha \approx 1$), so without the shift they no
# longer fire. The two kinds of knowledge act as one edit. With the neurons off, the shift alone moves
# the answer, but not to the target: this tiny model does not read in-context knowledge the way a real
# VLM does. Scaling $\zeta'$ moves the logits only a little.
