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
# # 03 · Editing: one-step, sequential, cross-task, ablations and α
#
# `unike.evaluate(method, cases, mode=..., k=...)` edits and scores ([docs/metrics.md](../docs/metrics.md)):
#
# | metric | probe | should |
# |---|---|---|
# | Rel | the edit itself | give the target |
# | T-Gen / M-Gen | a rephrased question / another image of the same thing | give the target |
# | T-Loc / M-Loc | an unrelated text / image question | keep the model's answer |
# | CI-Loc / RI-Loc | the edited image with another question / the edited question over another entity's image (SynthWorld only) | keep the model's answer |
#
# Protocol `token_acc` (UniKE, EasyEdit): teacher-forced share of target tokens that are the argmax; for
# locality, the share of answer positions whose argmax is unchanged. `mode="one-step"` resets before each
# edit; `mode="sequential"` makes `k` edits one after another and then scores all of them.
#
# **Small n.** The defaults (`N_EVAL` cases per row, `N_TRIPLETS` fit triplets) keep this notebook within a
# few minutes on a CPU, so one case moves a score by 100/N_EVAL points. The README's table uses 50 cases per
# task and 2000 triplets; raise the sizes for numbers you can compare. The first code cell holds the
# parameters, as in notebook 01.

# %% tags=["parameters"]
import torch

MODEL = None        # None: unike.load_tiny(); else a Hugging Face id (AutoModelForImageTextToText, device_map="auto")
DATA = None         # None: SynthWorld; else MMEdit E-VQA / E-IC JSON files and their image root (unike.load_mmedit)
DEVICE = "cpu"      # where the tiny model runs; a real model is placed by device_map="auto"
DTYPE = None        # None: the checkpoint's dtype; torch.bfloat16 for a real model
N_TRIPLETS = 500    # fit triplets (the README's table: 2000)
N_EVAL = 2          # edit cases per task
ALPHAS = (0.0, 0.4, 0.8)   # fixed α for the sweep (the paper's Fig. 4b: 0.0, 0.2, ..., 0.8)

# %%
import unike
from unike import tutorial

if DEVICE == "cpu":
    torch.set_num_threads(1)   # CI runs on small shared machines; use more threads on your own
run = tutorial.setup(MODEL, DATA, device=DEVICE, dtype=DTYPE, n_triplets=N_TRIPLETS, n_eval=N_EVAL)
model, processor, triplets, cases = run.model, run.processor, run.triplets, run.cases
print(run)

# %%
editor = unike.UniKE(model, processor)
states = editor.collect(triplets)         # the model's states, collected once for every editor below
editor.fit_states(states)
print(f"fitted at layers {editor.layer_ids} from {len(triplets)} triplets")

# %% [markdown]
# Two small helpers print score dicts as a table and draw them as bars, one row per setting.

# %%
def table(rows: dict) -> None:
    """Print score dicts (one row each) as a table, in %."""
    metrics = [m for m in unike.metrics.METRICS if any(m in scores for scores in rows.values())]
    width = max(map(len, rows))
    print(" " * width + "".join(f"{m:>8}" for m in metrics))
    for name, scores in rows.items():
        print(f"{name:{width}}" + "".join(f"{scores[m]:8.1f}" if m in scores else f"{'-':>8}" for m in metrics))


# %%
import matplotlib.pyplot as plt


def bars(rows: dict, title: str) -> None:
    """Draw score dicts (one row each) as grouped bars, in %."""
    metrics = [m for m in unike.metrics.METRICS if any(m in scores for scores in rows.values())]
    fig, ax = plt.subplots(figsize=(10, 3))
    step = 0.8 / len(rows)
    for i, (name, scores) in enumerate(rows.items()):
        ax.bar([j + i * step for j in range(len(metrics))], [scores.get(m, 0) for m in metrics], step, label=name)
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(metrics))], metrics)
    ax.set(ylabel="%", ylim=(0, 105), title=title)
    ax.legend(fontsize=7, bbox_to_anchor=(1, 1))
    plt.tight_layout()
    plt.show()


# %% [markdown]
# ## One-step, sequential and cross-task editing
#
# The base model scores 0 on the edit probes (the targets are new facts) and 100 on locality by definition.
# Cross-task editing (the paper's K=10 setting) edits VQA facts and captions in one sequence.

# %%
with editor.disabled():
    rows = {"base model": unike.evaluate(model, cases["vqa"], processor=processor, progress=False)}
for task, task_cases in cases.items():
    rows[f"one-step, {task}"] = unike.evaluate(editor, task_cases)
rows[f"sequential K={N_EVAL}, vqa"] = unike.evaluate(editor, cases["vqa"], mode="sequential", k=N_EVAL)
if "caption" in cases:
    mixed = [case for pair in zip(cases["vqa"], cases["caption"]) for case in pair][:N_EVAL]
    rows[f"cross-task K={len(mixed)}"] = unike.evaluate(editor, mixed, mode="sequential", k=len(mixed))
editor.detach()
table(rows)
bars(rows, "UniKE on this model")

# %% [markdown]
# ## Ablations (paper Table 4 and Fig. 4c)
#
# Each row is a `UniKEConfig` switch ([docs/method.md](../docs/method.md#ablations-unikeconfig)). Every
# editor is fitted from the same collected `states`, and `fit_states` reuses the spaces trained on them,
# so a new editor needs neither the model's states nor new encoder training. With the new neurons
# $\mathrm{FFN}'(q) = \mathrm{FFN}(q) + \sigma(qK+b)(V+\beta\zeta')$ (Eq. 3 and 6) and the latent shift
# $h' = (1-\alpha)\,\mathrm{Attn}(x,X,X) + \alpha\,\mathrm{Attn}(x,H_{know},H_{know})$ (Eq. 2 and 7):
#
# * intrinsic only (`latent=False`): the new neurons alone, $\alpha = 0$ (a latent T-Patcher);
# * latent only (`intrinsic=False`): the memory alone, no new neurons (a latent IKE);
# * no collaboration: fixed $\alpha = 0.5$ and $\zeta' = 0$;
# * $\zeta$ variants: $\zeta$ from the semantic space, a random $\zeta$ of the same norm, no $\zeta$.

# %%
def evaluate_with(task_cases, **switches):
    """One-step scores of an editor with these UniKEConfig switches, fitted from `states`."""
    ablated = unike.UniKE(model, processor, unike.UniKEConfig(**switches)).fit_states(states, progress=False)
    try:
        return unike.evaluate(ablated, task_cases, progress=False)
    finally:
        ablated.detach()


# %%
switches = {"intrinsic only": dict(latent=False), "latent only": dict(intrinsic=False),
            "no collaboration": dict(collaboration=False), "ζ from semantic space": dict(zeta="semantic"),
            "random ζ": dict(zeta="random"), "no ζ": dict(zeta="none")}
ablations = {"UniKE": rows["one-step, vqa"]}
ablations.update({name: evaluate_with(cases["vqa"], **s) for name, s in switches.items()})
table(ablations)
bars(ablations, "ablations (one-step, vqa)")

# %% [markdown]
# ## α: fixed against dynamic (paper Fig. 4b)
#
# $\alpha$ sets how much retrieved knowledge replaces the attention output:
# $$h' = (1-\alpha)\,h_{attn} + \alpha\,h_{know}.$$
# UniKE computes it per token in the semantic space,
# $\alpha = \mathrm{clamp}(\cos(\mathrm{Enc}_{sem}(h_{know}), x)/s, 0, 1)$ ($s$: the fit samples' median
# own cosine), at the first edited layer, and only where an edit's scope lets its knowledge in ($\alpha = 0$
# elsewhere, method.md). `fixed_alpha` replaces it by a constant applied to *every* token, as in the paper's
# Fig. 4b: tokens no edit concerns then mix in their top-K fitted entries.

# %%
sweep = {f"α = {a}": evaluate_with(cases["vqa"], fixed_alpha=a) for a in ALPHAS}
table({**sweep, "dynamic α": rows["one-step, vqa"]})

# %%
edit_metrics = [m for m in unike.metrics.EDIT_METRICS if m in rows["one-step, vqa"]]
loc_metrics = [m for m in unike.metrics.LOC_METRICS if m in rows["one-step, vqa"]]
mean = lambda scores, metrics: sum(scores[m] for m in metrics) / len(metrics)  # noqa: E731
fig, ax = plt.subplots(figsize=(6, 3))
for metrics, label, colour in ((edit_metrics, "reliability + generality", "C0"), (loc_metrics, "locality", "C1")):
    ax.plot(ALPHAS, [mean(s, metrics) for s in sweep.values()], "o-", color=colour, label=f"fixed α: {label}")
    ax.axhline(mean(rows["one-step, vqa"], metrics), color=colour, ls="--", label=f"dynamic α: {label}")
ax.set(xlabel="fixed α", ylabel="mean score (%)", ylim=(0, 105))
ax.legend(fontsize=7)
plt.show()
