# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Quickstart: one edit
#
# UniKE (Pan et al., NeurIPS 2024) edits a vision-language model in two ways at once, in its last few
# decoder layers:
#
# * **intrinsic knowledge** (Eq. 3 and 6): a few new key–value neurons in the FFN (T-Patcher style),
#   trained for the edit,
#   $$\mathrm{FFN}'(q) = \mathrm{FFN}(q) + \sigma(qK + b)\,(V + \beta\,\zeta')$$
#   with the FFN input $q$, new keys $K$, biases $b$ and values $V$, and $\sigma$ = ReLU;
# * **external knowledge** (Eq. 2 and 7): hidden states $H_{know}$ retrieved from a latent memory and mixed
#   into the attention output of each token $x$ of the input $X$,
#   $$h' = (1-\alpha)\,\mathrm{Attn}(x, X, X) + \alpha\,\mathrm{Attn}(x, H_{know}, H_{know});$$
# * **collaboration**: a *semantic* space sets $\alpha$ per token, how much retrieved knowledge to mix in,
#   and a *truthfulness* space gives the direction $\zeta$ whose image $\zeta'$ in the hidden space is
#   added to the new neurons' values (notebook 02).
#
# `unike` attaches all of this to any Hugging Face VLM through forward hooks and removes it leaving the
# model bit-identical. [docs/method.md](../docs/method.md) maps each equation of the paper to the code.
#
# This notebook wraps a model, makes one edit, shows the answers before and after, and detaches. The first
# code cell holds every parameter: the tiny model on the CPU by default. For a real VLM on a GPU set, for
# example, `MODEL = "llava-hf/llava-1.5-7b-hf"` (or `"Qwen/Qwen2-VL-2B-Instruct"`,
# `"Salesforce/blip2-opt-2.7b"`), `DEVICE, DTYPE = "cuda", torch.bfloat16`,
# `DATA = dict(train="MMEdit/vqa_train.json", vqa="MMEdit/vqa_eval.json",
# caption="MMEdit/caption_eval_edit.json", images="MMEdit")`, and raise the sizes (the paper fits on more
# than 15,000 triplets).

# %% tags=["parameters"]
import torch

MODEL = None        # None: unike.load_tiny(); else a Hugging Face id (AutoModelForImageTextToText, device_map="auto")
DATA = None         # None: SynthWorld; else MMEdit E-VQA / E-IC JSON files and their image root (unike.load_mmedit)
DEVICE = "cpu"      # where the tiny model runs; a real model is placed by device_map="auto"
DTYPE = None        # None: the checkpoint's dtype; torch.bfloat16 for a real model
N_TRIPLETS = 500    # fit triplets (the README's table: 2000)
N_EVAL = 1          # edit cases per task

# %% [markdown]
# `unike.tutorial.setup` loads the model and the data every notebook uses: fit triplets (image, question,
# right answer, wrong answer) and edit cases per task, from SynthWorld (the procedural world the tiny model
# was trained on) or from MMEdit files.

# %%
import unike
from unike import tutorial

if DEVICE == "cpu":
    torch.set_num_threads(1)   # CI runs on small shared machines; use more threads on your own
run = tutorial.setup(MODEL, DATA, device=DEVICE, dtype=DTYPE, n_triplets=N_TRIPLETS, n_eval=N_EVAL)
model, processor, triplets, cases = run.model, run.processor, run.triplets, run.cases
print(run)

# %% [markdown]
# ## The edit and its probes
#
# An `EditCase` holds the edit (image, prompt, new target) and the probes MMEdit scores it with: a
# rephrased question and another image of the same thing should change too (*generality*); unrelated
# questions must not (*locality*). SynthWorld cases add two hard locality probes: another fact of the same
# image, and the same question over another entity's image. `tutorial.probes(case)` names the probes that
# `unike.evaluate` scores (`unike.metrics.probes`).

# %%
case = cases["vqa"][0]
probes = tutorial.probes(case)     # {what it asks: (image, prompt)}
ask = lambda image, prompt: unike.answer(model, processor, image, prompt)   # greedy answer  # noqa: E731
before = {name: ask(*probe) for name, probe in probes.items()}
print(f"edit: {case.prompt!r}  {case.ground_truth!r} -> {case.target!r}")
before

# %% [markdown]
# The model's logits on the edit's prompt, kept to check that `detach()` restores the model exactly.

# %%
inputs = tutorial.inputs(model, processor, case.image, case.prompt)
with torch.no_grad():
    reference = model(**inputs).logits

# %% [markdown]
# ## Attach, fit, edit
#
# * `unike.UniKE(model, processor)` finds the language decoder (never the vision tower) and hooks its last
#   4 layers (`UniKEConfig(layers=...)` to change that).
# * `fit(triplets)` runs the model over the triplets, stores their hidden states as the latent memory and
#   trains the two spaces (notebook 02). Here only `N_TRIPLETS` triplets, to stay fast on a CPU.
# * `edit(case)` writes the edit into the memory and trains its new neurons $K, b, V$ (at most
#   `edit_steps=60` Adam steps). Repeated calls edit sequentially; `reset()` drops every edit and keeps the
#   fit.

# %%
import time

print(unike.locate(model).describe())
editor = unike.UniKE(model, processor)
editor.fit(triplets)
print("edited layers:", editor.layer_ids)
start = time.time()
info = editor.edit(case)
print(f"edited in {time.time() - start:.1f} s ({info['steps']} steps)")

# %%
after = {name: ask(*probe) for name, probe in probes.items()}
width, answer_width = max(map(len, probes)), max(len(repr(a)) for a in before.values())
for name in probes:
    print(f"{name:{width}}  {before[name]!r:>{answer_width}} -> {after[name]!r}")

# %% tags=["figure:edit_before_after"]
import matplotlib.pyplot as plt

from unike.data.case import load_image

shown = [name for name, (image, _) in probes.items() if image is not None]
fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 3.2), squeeze=False)
for ax, name in zip(axes[0], shown):
    image, prompt = probes[name]
    ax.imshow(load_image(image))
    ax.set_title(f"{name}\n{prompt}\nbefore: {before[name]}\nafter: {after[name]}", fontsize=7)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# The edit and its generality probes should now give the target, and the locality probes keep their
# answers; notebook 03 measures how often they do.
#
# ## Detach
#
# `detach()` removes every hook and `unike_*` submodule. To keep an edit, save it first:
# `editor.save(folder)` writes safetensors + JSON, and `unike.UniKE.load(model, processor, folder)` puts it
# back on the model.

# %%
editor.detach()
with torch.no_grad():
    restored = model(**inputs).logits
assert torch.equal(restored, reference) and not any("unike_" in key for key in model.state_dict())
print("detached: logits bit-identical to before;", repr(ask(case.image, case.prompt)))
