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
# # 02 · Contrastive training: the semantic and truthfulness spaces
#
# UniKE's two kinds of knowledge cooperate through two small encoders per edited layer, trained by
# contrastive learning on triplets (image + question $Q_I$, right answer $A_{pos}$, wrong answer
# $A_{neg}$); paper §3.3, [docs/method.md](../docs/method.md) ("Knowledge collaboration").
#
# The model runs on $Q_I \oplus A_{pos}$ and on $Q_I \oplus A_{neg}$. At every edited layer three
# pre-attention states are kept: $h_{sem}$ at the question's last token, $h_{pos}$ and $h_{neg}$ at the
# final token of each answer (standardised per layer before either encoder sees them). With
# $s(a, b) = \cos(a, b)/\tau$ and a batch of $n$ triplets:
#
# * **Truthfulness space** (Eq. 4, supervised contrastive): with $H^{tru}_{pos} = \mathrm{Enc}_{tru}(h_{pos})$
#   and $H^{tru}_{neg} = \mathrm{Enc}_{tru}(h_{neg})$, right-answer states are pulled together and away from
#   wrong-answer states, and the reverse:
#   $$\mathcal{L}_{tru} = -\sum_{i=1}^{n}\left[\log\frac{\sum_{h \in H^{tru}_{pos}} e^{s(H^{tru}_{pos,i},\,h)}}{\sum_{h \in H^{tru}_{pos} \cup H^{tru}_{neg}} e^{s(H^{tru}_{pos,i},\,h)}} + \log\frac{\sum_{h \in H^{tru}_{neg}} e^{s(H^{tru}_{neg,i},\,h)}}{\sum_{h \in H^{tru}_{pos} \cup H^{tru}_{neg}} e^{s(H^{tru}_{neg,i},\,h)}}\right]$$
#   The direction toward truthful knowledge is the difference of the two means,
#   $$\zeta = \frac{1}{n}\sum_i \mathrm{Enc}_{tru}(h_{pos,i}) - \frac{1}{n}\sum_i \mathrm{Enc}_{tru}(h_{neg,i}),$$
#   over all fit triplets; a linear decoder fitted with the spaces maps it back to the hidden space, and
#   every new edit adds $\beta\,\zeta' = \beta\,\mathrm{Dec}(\zeta)$ to its neurons' values (Eq. 6).
# * **Semantic space** (Eq. 5): $\mathrm{Enc}_{sem}$ maps a sample's answer states, right *and* wrong, onto
#   its own raw question state, with $H^{sem} = \mathrm{Enc}_{sem}(h)$:
#   $$\mathcal{L}_{sem} = -\sum_{i=1}^{n}\log\frac{e^{s(h_{sem,i},\,H^{sem}_{pos,i})} + e^{s(h_{sem,i},\,H^{sem}_{neg,i})}}{\sum_{h \in H^{sem}_{pos} \cup H^{sem}_{neg}} e^{s(h_{sem,i},\,h)}}$$
#   So the cosine of the retrieved knowledge, through $\mathrm{Enc}_{sem}$, with a token's state $x$ says
#   whether that knowledge is about this input: it is $\alpha$, how much of it the latent memory mixes into
#   the attention output (Eq. 7),
#   $$\alpha = \mathrm{clamp}\big(\cos(\mathrm{Enc}_{sem}(h_{know}), x),\ 0,\ 1\big).$$
#
# Right and wrong states should therefore **overlap in the semantic space** (both are about the same
# question) and **separate in the truthfulness space**. `editor.fit(triplets)` is `editor.collect(triplets)`
# (the model's states) followed by `editor.fit_states(states)` (memory and spaces); this notebook runs the
# two steps apart to look at the states. The first code cell holds the parameters, as in notebook 01.

# %% tags=["parameters"]
import torch

MODEL = None        # None: unike.load_tiny(); else a Hugging Face id (AutoModelForImageTextToText, device_map="auto")
DATA = None         # None: SynthWorld; else MMEdit E-VQA / E-IC JSON files and their image root (unike.load_mmedit)
DEVICE = "cpu"      # where the tiny model runs; a real model is placed by device_map="auto"
DTYPE = None        # None: the checkpoint's dtype; torch.bfloat16 for a real model
N_TRIPLETS = 500    # fit triplets (the README's table: 2000)
N_EVAL = 1          # edit cases per task
N_HELD_OUT = 200    # held-out triplets for the projections

# %%
import unike
from unike import tutorial

if DEVICE == "cpu":
    torch.set_num_threads(1)   # CI runs on small shared machines; use more threads on your own
run = tutorial.setup(MODEL, DATA, device=DEVICE, dtype=DTYPE, n_triplets=N_TRIPLETS, n_eval=N_EVAL,
                     n_held_out=N_HELD_OUT)
model, processor, triplets, cases = run.model, run.processor, run.triplets, run.cases
print(run)

# %%
editor = unike.UniKE(model, processor)
states = editor.collect(triplets)          # one forward pass per answer; every tensor is on the CPU
layer = editor.layer_ids[-1]               # the plots below use the last decoder layer
{key: tuple(value.shape) for key, value in states.layers[layer].items()}

# %% [markdown]
# ## Training
#
# Adam (lr 1e-4, as in the paper) on $\mathcal{L}_{tru} + \mathcal{L}_{sem}$ (each averaged over the
# batch), `encoder_steps=300` batches of 128, $\tau$ = 0.1, one pair of encoders per layer. States are
# standardised per layer first: raw hidden states share a large common component, so the cosine of any two
# would be close to 1.

# %%
import matplotlib.pyplot as plt

editor.fit_states(states)
fig, ax = plt.subplots(figsize=(6, 3))
for key, label in (("truth", "truthfulness (Eq. 4)"), ("semantic", "semantic (Eq. 5)")):
    ax.plot([step[key] for step in editor.losses], label=label)
ax.set(xlabel="step", ylabel="loss (mean over layers)", title="encoder training")
ax.legend()
plt.show()

# %% [markdown]
# ## Both spaces on held-out triplets
#
# The right- and wrong-answer states of triplets the encoders never saw, projected to 2-D by PCA
# (`torch.pca_lowrank`): standardised raw states, the semantic space and the truthfulness space. The arrow
# is $\zeta$, computed at fit time. The printed share is how often a held-out state falls on its own side
# of the midpoint between the fit-time right and wrong means, along their difference (along $\zeta$ for
# $\mathrm{Enc}_{tru}$).

# %%
test = editor.collect(run.held_out, progress=False)


@torch.no_grad()
def told_apart(space, encoder, fit, new):
    """Share of held-out right / wrong states on their own side of the fit-time midpoint."""
    enc = lambda h: encoder(space.standardize(h))  # noqa: E731
    mean_pos, mean_neg = enc(fit["h_pos"]).mean(0), enc(fit["h_neg"]).mean(0)
    direction, middle = mean_pos - mean_neg, (mean_pos + mean_neg) / 2
    right = ((enc(new["h_pos"]) - middle) @ direction > 0).float()
    wrong = ((enc(new["h_neg"]) - middle) @ direction < 0).float()
    return 100 * torch.cat([right, wrong]).mean().item()


# %%
space = editor.spaces[layer]
views = {"standardised states": torch.nn.Identity(), "semantic space (Enc_sem)": space.sem,
         "truthfulness space (Enc_tru)": space.tru}


@torch.no_grad()
def pca_2d(encoder, layer_states):
    """Right and wrong states through `encoder`, their mean, and the top two principal directions."""
    pos = encoder(space.standardize(layer_states["h_pos"]))
    neg = encoder(space.standardize(layer_states["h_neg"]))
    mean = torch.cat([pos, neg]).mean(0)
    _, _, basis = torch.pca_lowrank(torch.cat([pos, neg]) - mean, q=2, center=False)
    return pos, neg, mean, basis


# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
for ax, (title, encoder) in zip(axes, views.items()):
    pos, neg, mean, basis = pca_2d(encoder, test.layers[layer])
    ax.scatter(*((pos - mean) @ basis).T, s=6, alpha=0.6, label="right answer (h_pos)")
    ax.scatter(*((neg - mean) @ basis).T, s=6, alpha=0.6, label="wrong answer (h_neg)")
    share = told_apart(space, encoder, states.layers[layer], test.layers[layer])
    ax.set(title=f"{title}\nright/wrong told apart: {share:.0f}%", xticks=[], yticks=[])
    ax.title.set_fontsize(9)
start = ((neg - mean) @ basis).mean(0)          # ζ drawn in the last panel, the truthfulness space
ax.annotate("", xy=(start + space.zeta @ basis).tolist(), xytext=start.tolist(),
            arrowprops=dict(arrowstyle="->", lw=2, color="black"))
ax.text(*(start + space.zeta @ basis / 2).tolist(), " ζ", fontsize=12)
axes[0].legend(fontsize=7, loc="lower left")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Reading these plots.** Eq. 4 as written keeps each anchor in its own numerator and denominator. At
# $\tau$ = 0.1 that self term ($e^{1/\tau}$) is large enough that the truthfulness loss falls as soon as the
# states are spread apart, whether or not right and wrong answers separate, so a falling curve above does
# not by itself mean the space has learnt truthfulness; the held-out share is the test that matters. The
# shipped tiny model's answer-final states carry only a weak right/wrong signal, so expect little
# separation here (the paper's Fig. 5a shows it for a real MLLM); set `MODEL` and `DATA` to look at
# yours.

# %% [markdown]
# ## What the semantic space is for: α
#
# A token's state $x$ retrieves its top-K memory entries, weighted by $w = \mathrm{softmax}(\cos/T)$;
# $h_{know} = \sum_i w_i v_i$ is their values $v_i$ through the layer's own attention projections, and
# $\alpha = \mathrm{clamp}\big(\cos(\mathrm{Enc}_{sem}(\sum_i w_i\,h_{pos,i}), x),\ 0,\ 1\big)$ compares the retrieved states,
# through $\mathrm{Enc}_{sem}$, with the current token's state $x$. After training, a triplet's encoded
# answer state should be close to its *own* question state and farther from another triplet's (some other
# triplets ask the same question about another image, so the two histograms overlap a little).

# %%
import torch.nn.functional as F

with torch.no_grad():
    question = space.standardize(test.layers[layer]["h_sem"])
    encoded = space.sem(space.standardize(test.layers[layer]["h_pos"]))
    own, other = F.cosine_similarity(encoded, question), F.cosine_similarity(encoded, question.roll(1, 0))
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(own, bins=30, alpha=0.6, label=f"own question (mean {own.mean():.2f})")
ax.hist(other, bins=30, alpha=0.6, label=f"another triplet's (mean {other.mean():.2f})")
ax.set(xlabel="cos(Enc_sem(h_pos), h_sem)", ylabel="held-out triplets")
ax.legend()
plt.show()

# %% [markdown]
# ## ζ per layer
#
# Every edited layer has its own spaces and its own $\zeta$ (`editor.spaces[l].zeta`, `truth_dim=64`
# numbers). Notebook 03 compares it with the ablations of the paper's Fig. 4c: $\zeta$ from the semantic
# space, a random $\zeta$, and none (`UniKEConfig(zeta="semantic" | "random" | "none")`).

# %%
for l in editor.layer_ids:
    sp = editor.spaces[l]
    print(f"layer {l}: |ζ| = {sp.zeta.norm():.2f}; held-out right/wrong told apart along ζ: "
          f"{told_apart(sp, sp.tru, states.layers[l], test.layers[l]):.0f}%, in the semantic space: "
          f"{told_apart(sp, sp.sem, states.layers[l], test.layers[l]):.0f}%")
editor.detach()
print("detached")
