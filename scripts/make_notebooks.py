"""Write the tutorial notebooks `notebooks/*.ipynb` (outputs stripped) from the cells below.

Edit the cells here, then run `python scripts/make_notebooks.py`; `--check` only reports the notebooks
that differ from this script (tests/test_notebooks.py runs that check). The parameter and set-up cells
are shared, so every notebook switches between the tiny model and a real VLM the same way.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"


def params(n_triplets: int, n_eval: int, extra: str = "") -> str:
    """The parameter cell (tagged `parameters`, as papermill expects)."""
    return f'''import torch

# Parameters. The defaults run the shipped tiny LLaVA on the CPU with SynthWorld data and small sizes (CI
# runs every notebook top to bottom on a small CPU). For a real VLM on a GPU set, for example,
#   MODEL = "llava-hf/llava-1.5-7b-hf"   (or "Qwen/Qwen2-VL-2B-Instruct", "Salesforce/blip2-opt-2.7b")
#   DEVICE, DTYPE = "cuda", torch.bfloat16
#   DATA = dict(train="MMEdit/vqa_train.json", vqa="MMEdit/vqa_eval.json",
#               caption="MMEdit/caption_eval_edit.json", images="MMEdit")
# and raise the sizes (the paper fits on more than 15,000 triplets).
MODEL = None        # None: unike.load_tiny(); else a Hugging Face id (AutoModelForImageTextToText, device_map="auto")
DATA = None         # None: SynthWorld; else MMEdit E-VQA / E-IC JSON files and their image root (unike.load_mmedit)
DEVICE = "cpu"      # where the tiny model runs; a real model is placed by device_map="auto"
DTYPE = None        # None: the checkpoint's dtype; torch.bfloat16 for a real model
N_TRIPLETS = {n_triplets:<8}# fit triplets (the README's table: 2000)
N_EVAL = {n_eval:<12}# edit cases per task{extra}'''


SETUP = '''import unike

if DEVICE == "cpu":
    torch.set_num_threads(1)   # CI runs on small shared machines; use more threads on your own

if MODEL is None:
    model, processor = unike.load_tiny(device=DEVICE, dtype=DTYPE)
else:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(MODEL, dtype=DTYPE, device_map="auto").eval()
    processor = AutoProcessor.from_pretrained(MODEL)

if DATA is None:
    world = unike.SynthWorld(seed=0)                    # the procedural world the tiny model was trained on
    triplets = world.triplets(n=N_TRIPLETS, seed=3)     # (image, question, right answer, wrong answer)
    cases = {task: world.edit_cases(task, n=N_EVAL, seed=11) for task in ("vqa", "caption")}
else:
    # In MMEdit's train files `alt` is the right answer and `pred` the model's wrong one: the paper's
    # (Q_I, A_pos, A_neg) triplets.
    pool = [unike.Triplet(c.image, c.prompt, c.target, c.ground_truth)
            for c in unike.load_mmedit(DATA["train"], DATA["images"]) if c.ground_truth]
    triplets = pool[:N_TRIPLETS]
    cases = {task: unike.load_mmedit(DATA[task], DATA["images"])[:N_EVAL]
             for task in ("vqa", "caption") if task in DATA}
print(f"{type(model).__name__} on {model.device}, {len(triplets)} fit triplets, "
      + ", ".join(f"{len(v)} {task} cases" for task, v in cases.items()))'''

PROBES = '''probes = {
    "the edit": (case.image, case.prompt),
    "rephrased question": (case.image, case.rephrase_prompt),              # generality: T-Gen
    "another image of it": (case.rephrase_image, case.prompt),             # M-Gen
    "same image, other fact": (case.image, case.ci_prompt),                # locality: CI-Loc
    "other entity, same question": (case.ri_image, case.prompt),           # RI-Loc
    "unrelated image question": (case.mloc_image, case.mloc_prompt),       # M-Loc
    "unrelated text question": (None, case.loc_prompt),                    # T-Loc
}
# MMEdit records lack the SynthWorld-only probes (CI, RI)
probes = {name: (image, prompt) for name, (image, prompt) in probes.items()
          if prompt and (image is not None or name == "unrelated text question")}'''

# --------------------------------------------------------------------------------------------- 01
QUICKSTART = [
    ("md", """# 01 · Quickstart: one edit

UniKE (Pan et al., NeurIPS 2024) edits a vision-language model in two ways at once, in its last few
decoder layers:

* **intrinsic knowledge**: a few new key–value neurons in the FFN (T-Patcher style), trained for the edit;
* **external knowledge**: hidden states retrieved from a latent memory and mixed into the attention output;
* **collaboration**: a *semantic* space decides how much retrieved knowledge to mix in (α, per token) and
  a *truthfulness* space gives a direction ζ that is added to the new neurons' values.

`unike` attaches all of this to any Hugging Face VLM through forward hooks and removes it leaving the
model bit-identical. [docs/method.md](../docs/method.md) maps each equation of the paper to the code.

This notebook wraps a model, makes one edit, shows the answers before and after, and detaches. The first
cell holds every parameter: the tiny model on the CPU by default, or a real VLM on a GPU."""),
    ("params", params(500, 1)),
    ("code", SETUP),
    ("md", """## The edit and its probes

An `EditCase` holds the edit (image, prompt, new target) and the probes MMEdit scores it with: a
rephrased question and another image of the same thing should change too (*generality*); unrelated
questions must not (*locality*). SynthWorld cases add two hard locality probes: another fact of the same
image, and the same question over another entity's image."""),
    ("code", f'''import matplotlib.pyplot as plt
from unike.data.case import load_image
from unike.prompting import encode, on_model

case = cases["vqa"][0]
{PROBES}
ask = lambda image, prompt: unike.answer(model, processor, image, prompt)   # greedy answer  # noqa: E731
before = {{name: ask(*probe) for name, probe in probes.items()}}

inputs = on_model(encode(processor, load_image(case.image), case.prompt), model)
with torch.no_grad():
    reference = model(**inputs).logits          # to check that detach() restores the model exactly
print(f"edit: {{case.prompt!r}}  {{case.ground_truth!r}} -> {{case.target!r}}")
before'''),
    ("md", """## Attach, fit, edit

* `unike.UniKE(model, processor)` finds the language decoder (never the vision tower) and hooks its last
  4 layers (`UniKEConfig(layers=...)` to change that).
* `fit(triplets)` runs the model over (image, question, right answer, wrong answer) triplets, stores
  their hidden states as the latent memory and trains the two spaces (notebook 02). Here only
  `N_TRIPLETS` triplets, to stay fast on a CPU.
* `edit(case)` writes the edit into the memory and trains its new neurons (at most `edit_steps=60` Adam
  steps). Repeated calls edit sequentially; `reset()` drops every edit and keeps the fit."""),
    ("code", '''import time

editor = unike.UniKE(model, processor)
print(editor.stack.describe())
editor.fit(triplets)
start = time.time()
info = editor.edit(case)
print(f"edited in {time.time() - start:.1f} s ({info['steps']} steps)")
after = {name: ask(*probe) for name, probe in probes.items()}
width, answer_width = max(map(len, probes)), max(len(repr(a)) for a in before.values())
for name in probes:
    print(f"{name:{width}}  {before[name]!r:>{answer_width}} -> {after[name]!r}")'''),
    ("code", '''shown = [name for name, (image, _) in probes.items() if image is not None]
fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 3.2), squeeze=False)
for ax, name in zip(axes[0], shown):
    image, prompt = probes[name]
    ax.imshow(load_image(image))
    ax.set_title(f"{name}\\n{prompt}\\nbefore: {before[name]}\\nafter: {after[name]}", fontsize=7)
    ax.axis("off")
plt.tight_layout()
plt.show()''', "edit_before_after"),
    ("md", """The edit and its generality probes should now give the target, and the locality probes keep their
answers; notebook 03 measures how often they do.

## Detach

`detach()` removes every hook and `unike_*` submodule. To keep an edit, save it first:
`editor.save(folder)` writes safetensors + JSON, and `unike.UniKE.load(model, processor, folder)` puts it
back on the model."""),
    ("code", '''editor.detach()
with torch.no_grad():
    restored = model(**inputs).logits
assert torch.equal(restored, reference) and not any("unike_" in key for key in model.state_dict())
print("detached: logits bit-identical to before;", repr(ask(case.image, case.prompt)))'''),
]

# --------------------------------------------------------------------------------------------- 02
CONTRASTIVE = [
    ("md", """# 02 · Contrastive training: the semantic and truthfulness spaces

UniKE's two kinds of knowledge cooperate through two small encoders per edited layer, trained by
contrastive learning on triplets (image + question Q_I, right answer A_pos, wrong answer A_neg); paper
§3.3, [docs/method.md](../docs/method.md) ("Knowledge collaboration").

* The model runs on Q_I ⊕ A_pos and on Q_I ⊕ A_neg. At every edited layer three pre-attention states are
  kept: **h_sem** at the question's last token, **h_pos** and **h_neg** at the final token of each answer.
* **Truthfulness space** (Eq. 4, supervised contrastive): Enc_tru pulls right-answer states together and
  away from wrong-answer states. **ζ** = mean Enc_tru(h_pos) − mean Enc_tru(h_neg) is the direction toward
  truthful knowledge; a linear decoder fitted with the spaces maps it back to the hidden space, and every
  new edit adds ζ′ = Dec(ζ), times β, to its neurons' values (Eq. 6).
* **Semantic space** (Eq. 5): Enc_sem maps a sample's answer states, right *and* wrong, onto its own
  question state h_sem. So cos(Enc_sem(retrieved knowledge), current state) says whether the retrieved
  knowledge is about this input: that cosine is **α**, how much of it the latent memory mixes into the
  attention output (Eq. 7).

Right and wrong states should therefore **overlap in the semantic space** (both are about the same
question) and **separate in the truthfulness space**. `editor.fit(triplets)` is `editor.collect(triplets)`
(the model's states) followed by `editor.fit_states(states)` (memory and spaces); this notebook runs the
two steps apart to look at the states."""),
    ("params", params(500, 1, "\nN_HELD_OUT = 200    # held-out triplets for the projections")),
    ("code", SETUP),
    ("code", '''editor = unike.UniKE(model, processor)
states = editor.collect(triplets)          # one forward pass per answer; every tensor is on the CPU
layer = editor.layer_ids[-1]               # the plots below use the last decoder layer
{key: tuple(value.shape) for key, value in states.layers[layer].items()}'''),
    ("md", """## Training

Adam (lr 1e-4, as in the paper) on L_tru + L_sem, `encoder_steps=300` batches of 128, one pair of encoders
per layer. States are standardised per layer first: raw hidden states share a large common component, so
the cosine of any two would be close to 1."""),
    ("code", '''import matplotlib.pyplot as plt

editor.fit_states(states)
fig, ax = plt.subplots(figsize=(6, 3))
for key, label in (("truth", "truthfulness (Eq. 4)"), ("semantic", "semantic (Eq. 5)")):
    ax.plot([step[key] for step in editor.losses], label=label)
ax.set(xlabel="step", ylabel="loss (mean over layers)", title="encoder training")
ax.legend()
plt.show()'''),
    ("md", """## Both spaces on held-out triplets

The right- and wrong-answer states of triplets the encoders never saw, projected to 2-D by PCA
(`torch.pca_lowrank`): standardised raw states, the semantic space and the truthfulness space. The arrow
is ζ, computed at fit time. The printed share is how often a held-out state falls on its own side of the
midpoint between the fit-time right and wrong means, along their difference (along ζ for Enc_tru)."""),
    ("code", '''held_out = world.triplets(n=N_HELD_OUT, seed=5) if DATA is None else pool[N_TRIPLETS:N_TRIPLETS + N_HELD_OUT]
test = editor.collect(held_out, progress=False)


def told_apart(space, encoder, fit, new):
    """Share of held-out right / wrong states on their own side of the fit-time midpoint."""
    with torch.no_grad():
        enc = lambda h: encoder(space.standardize(h))  # noqa: E731
        mean_pos, mean_neg = enc(fit["h_pos"]).mean(0), enc(fit["h_neg"]).mean(0)
        direction, middle = mean_pos - mean_neg, (mean_pos + mean_neg) / 2
        right = ((enc(new["h_pos"]) - middle) @ direction > 0).float()
        wrong = ((enc(new["h_neg"]) - middle) @ direction < 0).float()
    return 100 * torch.cat([right, wrong]).mean().item()


space = editor.spaces[layer]
views = {"standardised states": torch.nn.Identity(), "semantic space (Enc_sem)": space.sem,
         "truthfulness space (Enc_tru)": space.tru}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
for ax, (title, encoder) in zip(axes, views.items()):
    with torch.no_grad():
        pos = encoder(space.standardize(test.layers[layer]["h_pos"]))
        neg = encoder(space.standardize(test.layers[layer]["h_neg"]))
        both = torch.cat([pos, neg])
        mean = both.mean(0)
        _, _, basis = torch.pca_lowrank(both - mean, q=2, center=False)
    ax.scatter(*((pos - mean) @ basis).T, s=6, alpha=0.6, label="right answer (h_pos)")
    ax.scatter(*((neg - mean) @ basis).T, s=6, alpha=0.6, label="wrong answer (h_neg)")
    share = told_apart(space, encoder, states.layers[layer], test.layers[layer])
    ax.set_title(f"{title}\\nright/wrong told apart: {share:.0f}%", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
start = ((neg - mean) @ basis).mean(0)          # ζ drawn in the last panel, the truthfulness space
ax.annotate("", xy=(start + space.zeta @ basis).tolist(), xytext=start.tolist(),
            arrowprops=dict(arrowstyle="->", lw=2, color="black"))
ax.text(*(start + space.zeta @ basis / 2).tolist(), " ζ", fontsize=12)
axes[0].legend(fontsize=7, loc="lower left")
plt.tight_layout()
plt.show()'''),
    ("md", """**Reading these plots.** Eq. 4 as written keeps each anchor in its own numerator and denominator. At
τ = 0.1 that self term (e^(1/τ)) is large enough that the truthfulness loss falls as soon as the states
are spread apart, whether or not right and wrong answers separate, so a falling curve above does not
by itself mean the space has learnt truthfulness; the held-out share is the test that matters. The
shipped tiny model's answer-final states carry only a weak right/wrong signal, so expect little
separation here (the paper's Fig. 5a shows it for a real MLLM); set `MODEL` and `DATA` to look at
yours."""),
    ("md", """## What the semantic space is for: α

α = cos(Enc_sem(Σ w h_pos), x): the retrieved states, through Enc_sem, against the current token's state
x. After training, a triplet's encoded answer state should be close to its *own* question state and
farther from another triplet's (some other triplets ask the same question about another image, so the
two histograms overlap a little)."""),
    ("code", '''import torch.nn.functional as F

with torch.no_grad():
    question = space.standardize(test.layers[layer]["h_sem"])
    encoded = space.sem(space.standardize(test.layers[layer]["h_pos"]))
    own, other = F.cosine_similarity(encoded, question), F.cosine_similarity(encoded, question.roll(1, 0))
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(own, bins=30, alpha=0.6, label=f"own question (mean {own.mean():.2f})")
ax.hist(other, bins=30, alpha=0.6, label=f"another triplet's (mean {other.mean():.2f})")
ax.set(xlabel="cos(Enc_sem(h_pos), h_sem)", ylabel="held-out triplets")
ax.legend()
plt.show()'''),
    ("md", """## ζ per layer

Every edited layer has its own spaces and its own ζ (`editor.spaces[l].zeta`, `truth_dim=64` numbers).
Notebook 03 compares it with the ablations of the paper's Fig. 4c: ζ from the semantic space, a random ζ,
and none (`UniKEConfig(zeta="semantic" | "random" | "none")`)."""),
    ("code", '''for l in editor.layer_ids:
    sp = editor.spaces[l]
    print(f"layer {l}: |ζ| = {sp.zeta.norm():.2f}; held-out right/wrong told apart along ζ: "
          f"{told_apart(sp, sp.tru, states.layers[l], test.layers[l]):.0f}%, in the semantic space: "
          f"{told_apart(sp, sp.sem, states.layers[l], test.layers[l]):.0f}%")
editor.detach()
print("detached")'''),
]

# --------------------------------------------------------------------------------------------- 03
EDITING = [
    ("md", """# 03 · Editing: one-step, sequential, cross-task, ablations and α

`unike.evaluate(method, cases, mode=..., k=...)` edits and scores ([docs/metrics.md](../docs/metrics.md)):

| metric | probe | should |
|---|---|---|
| Rel | the edit itself | give the target |
| T-Gen / M-Gen | a rephrased question / another image of the same thing | give the target |
| T-Loc / M-Loc | an unrelated text / image question | keep the model's answer |
| CI-Loc / RI-Loc | the edited image with another question / the edited question over another entity's image (SynthWorld only) | keep the model's answer |

Protocol `token_acc` (UniKE, EasyEdit): teacher-forced share of target tokens that are the argmax; for
locality, the share of answer positions whose argmax is unchanged. `mode="one-step"` resets before each
edit; `mode="sequential"` makes `k` edits one after another and then scores all of them.

**Small n.** The defaults (`N_EVAL` cases per row, `N_TRIPLETS` fit triplets) keep this notebook within a
few minutes on a CPU, so one case moves a score by 100/N_EVAL points. The README's table uses 50 cases per
task and 2000 triplets; raise the sizes for numbers you can compare."""),
    ("params", params(500, 2, "\nALPHAS = (0.0, 0.4, 0.8)   # fixed α for the sweep (the paper's Fig. 4b: 0.0, 0.2, ..., 0.8)")),
    ("code", SETUP),
    ("code", '''import matplotlib.pyplot as plt

editor = unike.UniKE(model, processor)
states = editor.collect(triplets)         # the model's states, collected once for every editor below
editor.fit_states(states)


def table(rows: dict) -> None:
    """Print score dicts (one row each) as a table, in %."""
    metrics = [m for m in unike.metrics.METRICS if any(m in scores for scores in rows.values())]
    width = max(map(len, rows))
    print(" " * width + "".join(f"{m:>8}" for m in metrics))
    for name, scores in rows.items():
        print(f"{name:{width}}" + "".join(f"{scores[m]:8.1f}" if m in scores else f"{'-':>8}" for m in metrics))


def bars(rows: dict, title: str) -> None:
    metrics = [m for m in unike.metrics.METRICS if any(m in scores for scores in rows.values())]
    fig, ax = plt.subplots(figsize=(10, 3))
    step = 0.8 / len(rows)
    for i, (name, scores) in enumerate(rows.items()):
        ax.bar([j + i * step for j in range(len(metrics))], [scores.get(m, 0) for m in metrics], step, label=name)
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(metrics))], metrics)
    ax.set(ylabel="%", ylim=(0, 105), title=title)
    ax.legend(fontsize=7, bbox_to_anchor=(1, 1))
    plt.tight_layout()
    plt.show()'''),
    ("md", """## One-step, sequential and cross-task editing

The base model scores 0 on the edit probes (the targets are new facts) and 100 on locality by definition.
Cross-task editing (the paper's K=10 setting) edits VQA facts and captions in one sequence."""),
    ("code", '''with editor.disabled():
    rows = {"base model": unike.evaluate(model, cases["vqa"], processor=processor, progress=False)}
for task, task_cases in cases.items():
    rows[f"one-step, {task}"] = unike.evaluate(editor, task_cases)
rows[f"sequential K={N_EVAL}, vqa"] = unike.evaluate(editor, cases["vqa"], mode="sequential", k=N_EVAL)
if "caption" in cases:
    mixed = [case for pair in zip(cases["vqa"], cases["caption"]) for case in pair][:N_EVAL]
    rows[f"cross-task K={len(mixed)}"] = unike.evaluate(editor, mixed, mode="sequential", k=len(mixed))
editor.detach()
table(rows)
bars(rows, "UniKE on this model")'''),
    ("md", """## Ablations (paper Table 4 and Fig. 4c)

Each row is a `UniKEConfig` switch ([docs/method.md](../docs/method.md#ablations-unikeconfig)). Every
editor is fitted from the same collected `states`, and `fit_states` reuses the spaces trained on them,
so a new editor needs neither the model's states nor new encoder training.

* intrinsic only (`latent=False`): the new neurons alone (a latent T-Patcher);
* latent only (`intrinsic=False`): the memory alone (a latent IKE);
* no collaboration: fixed α = 0.5 and no ζ;
* ζ variants: ζ from the semantic space, a random ζ of the same norm, no ζ."""),
    ("code", '''def evaluate_with(task_cases, **switches):
    """One-step scores of an editor with these UniKEConfig switches, fitted from `states`."""
    ablated = unike.UniKE(model, processor, unike.UniKEConfig(**switches)).fit_states(states, progress=False)
    try:
        return unike.evaluate(ablated, task_cases, progress=False)
    finally:
        ablated.detach()


switches = {"intrinsic only": dict(latent=False), "latent only": dict(intrinsic=False),
            "no collaboration": dict(collaboration=False), "ζ from semantic space": dict(zeta="semantic"),
            "random ζ": dict(zeta="random"), "no ζ": dict(zeta="none")}
ablations = {"UniKE": rows["one-step, vqa"]}
ablations.update({name: evaluate_with(cases["vqa"], **s) for name, s in switches.items()})
table(ablations)
bars(ablations, "ablations (one-step, vqa)")'''),
    ("md", """## α: fixed against dynamic (paper Fig. 4b)

α sets how much retrieved knowledge replaces the attention output: out = (1 − α)·h_attn + α·h_know.
UniKE computes it per token in the semantic space; `fixed_alpha` replaces it by a constant. Either way the
relevance gate keeps α = 0 on tokens that are not closer to stored knowledge than ordinary prompt tokens
get (method.md), so a fixed α acts on the same tokens as the dynamic one, at another strength."""),
    ("code", '''sweep = {f"α = {a}": evaluate_with(cases["vqa"], fixed_alpha=a) for a in ALPHAS}
table({**sweep, "dynamic α": rows["one-step, vqa"]})
edit_metrics = [m for m in unike.metrics.EDIT_METRICS if m in rows["one-step, vqa"]]
loc_metrics = [m for m in unike.metrics.LOC_METRICS if m in rows["one-step, vqa"]]
mean = lambda scores, metrics: sum(scores[m] for m in metrics) / len(metrics)  # noqa: E731
fig, ax = plt.subplots(figsize=(6, 3))
for metrics, label, colour in ((edit_metrics, "reliability + generality", "C0"), (loc_metrics, "locality", "C1")):
    ax.plot(ALPHAS, [mean(s, metrics) for s in sweep.values()], "o-", color=colour, label=f"fixed α: {label}")
    ax.axhline(mean(rows["one-step, vqa"], metrics), color=colour, ls="--", label=f"dynamic α: {label}")
ax.set(xlabel="fixed α", ylabel="mean score (%)", ylim=(0, 105))
ax.legend(fontsize=7)
plt.show()'''),
]

# --------------------------------------------------------------------------------------------- 04
INTERPRET = [
    ("md", """# 04 · Interpretability with nnsight

While an editor is attached, every UniKE component is a submodule of the decoder layer it acts on, so
[nnsight](https://nnsight.net) reads and overwrites it by name:

| module in `layers[l]` | output |
|---|---|
| `unike_memory.alpha` | α per token, `[tokens]`: how much retrieved knowledge is mixed in (Eq. 7) |
| `unike_memory.know` | h_know, `[tokens, d]`: the retrieved knowledge in attention-output space (zero rows where the relevance gate is shut, except inside `editor.full_retrieval()`) |
| `unike_memory.state` | Σ w·h_pos, `[tokens, d]`: the retrieved states (the same) |
| `unike_neurons.activation` | the new neurons' activations, `[..., tokens, N]` (10 per edit) |
| `unike_neurons.zeta_term` | β·ζ′ per edit, `[edits, d]` (Eq. 6) |

Attach UniKE first, then wrap the model with `NNsight`. Inside a trace, read modules in the order the
forward runs them: layer by layer, and within a layer the memory before the neurons."""),
    ("params", params(500, 1)),
    ("code", SETUP),
    ("code", '''import operator

import matplotlib.pyplot as plt
import nnsight
from nnsight import NNsight
from unike.data.case import load_image
from unike.prompting import encode, on_model, tokenizer_of

case = cases["vqa"][0]
editor = unike.UniKE(model, processor).fit(triplets)
editor.edit(case)
traced = NNsight(model)                                           # after attaching
layers = operator.attrgetter(editor.stack.layers_path)(traced)    # e.g. traced.model.language_model.layers
tokenizer = tokenizer_of(processor)
inputs_for = lambda image, prompt: on_model(encode(processor, load_image(image), prompt), model)  # noqa: E731
print(f"nnsight {nnsight.__version__}; edit: {case.prompt!r}  {case.ground_truth!r} -> {case.target!r}")
{PROBES}'''.replace("{PROBES}", PROBES)),
    ("md", """## α per token and layer

A heat-map of α over the prompt's text tokens (the image's tokens are summarised in the title) at each
edited layer, for the edit, a rephrasing, and unrelated questions. The relevance gate keeps α at exactly
0 wherever a token is no closer to stored knowledge than ordinary prompt tokens get, so the memory acts
only where an input comes close to a stored entry, such as the edit written into it."""),
    ("code", '''image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", -1)


def alpha_map(image, prompt):
    """α [edited layers, tokens] for one input, read with nnsight; and the input ids."""
    inputs = inputs_for(image, prompt)
    with traced.trace(**inputs):
        alpha = nnsight.save([])
        for l in editor.layer_ids:
            alpha.append(layers[l].unike_memory.alpha.output)
    return torch.stack(alpha).detach().float().cpu(), inputs["input_ids"][0].cpu()


shown = ["the edit", "rephrased question", "same image, other fact", "unrelated text question"]
shown = [name for name in shown if name in probes]
fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 2.8), squeeze=False, sharey=True)
for ax, name in zip(axes[0], shown):
    alpha, ids = alpha_map(*probes[name])
    text = ids != image_id
    picture = alpha[:, ~text].max().item() if (~text).any() else 0.0
    im = ax.imshow(alpha[:, text], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(int(text.sum())), tokenizer.convert_ids_to_tokens(ids[text]), rotation=90, fontsize=7)
    ax.set_yticks(range(len(editor.layer_ids)), [f"layer {l}" for l in editor.layer_ids], fontsize=8)
    ax.set_title(f"{name}\\n(image tokens: max α {picture:.2f})", fontsize=8)
fig.colorbar(im, ax=axes[0].tolist(), label="α")
plt.show()'''),
    ("md", """## What a query retrieves

A relevant token's pre-attention state x retrieves its top-K (`top_k=40`) memory entries by cosine
between standardised states; `LatentMemory.nearest(x)` returns those cosines and the entries' indices
(entry i of the first `n_fit` is the i-th fit triplet; the edits' entries follow), and
`LatentMemory.relevance(x)` the best match that the relevance gate compares (fitted entries matched in
the memory's index, the edits' by cosine). Below: the question's last
token at the layer where its α is largest, read with nnsight as the input of that decoder layer."""),
    ("code", '''alpha, _ = alpha_map(case.image, case.prompt)
l = editor.layer_ids[int(alpha[:, -1].argmax())]
with traced.trace(**inputs_for(case.image, case.prompt)):
    x = layers[l].input.save()                   # the state entering layer l: [1, tokens, d]
memory = editor.memory[l]
sims, idx = memory.nearest(x[0, -1:])            # the question's last token
weights = torch.softmax(sims / memory.temperature, dim=-1)[0]
n_fit = int(memory.n_fit)
print(f"layer {l}: α = {alpha[editor.layer_ids.index(l), -1]:.2f}; relevance gate: best match "
      f"{memory.relevance(x[0, -1:]).item():.3f} ≥ {memory.min_similarity.item():.3f}")
for s, w, i in zip(sims[0, :8].tolist(), weights[:8].tolist(), idx[0, :8].tolist()):
    entry = (f"fit triplet {i}: {triplets[i].question!r} -> {triplets[i].right!r}" if i < n_fit
             else f"edit {i - n_fit}: {case.prompt!r} -> {case.target!r}")
    print(f"  cos {s:.3f}  weight {w:.3f}  {entry}")'''),
    ("md", """## The edit's neurons

The new neurons' activations at the last prompt token, summed over the edit's neurons, per edited
layer. ReLU gives an exact zero where the neurons do not match: they should fire on the edit and its
generality probes and stay at zero on the locality probes."""),
    ("code", '''def activations(image, prompt):
    """The new neurons' activations at the last token, summed per edited layer: [layers]."""
    with traced.trace(**inputs_for(image, prompt)):
        acts = nnsight.save([])
        for l in editor.layer_ids:
            out = layers[l].unike_neurons.activation.output
            acts.append(out.reshape(-1, out.shape[-1])[-1].sum())
    return torch.stack(acts).detach().float().cpu()


fired = {name: activations(*probe) for name, probe in probes.items()}
fig, ax = plt.subplots(figsize=(8, 3))
step = 0.8 / len(editor.layer_ids)
for j, l in enumerate(editor.layer_ids):
    ax.bar([i + j * step for i in range(len(fired))], [a[j].item() for a in fired.values()], step, label=f"layer {l}")
ax.set_xticks([i + 0.4 - step / 2 for i in range(len(fired))], list(fired), rotation=20, ha="right", fontsize=8)
ax.set(ylabel="summed activation")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()'''),
    ("md", """## Steering α and ζ

The same modules can be overwritten inside a trace. Below, the edit's prompt runs with α forced to 0
(no external knowledge) or 1 (retrieved knowledge replaces every token's attention output), ζ′ scaled,
and the new neurons switched off; the table shows the next-token prediction and the probabilities of the
target and of the original answer (their first tokens), and how far the logits moved from the edited
model's. Tokens that the relevance gate shuts skip retrieval (their h_know is a zero row), so
the traces run inside `editor.full_retrieval()`, where every token retrieves its knowledge."""),
    ("code", '''inputs = inputs_for(case.image, case.prompt)
first = lambda answer: tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"][0]  # noqa: E731
target, original = first(case.target), first(case.ground_truth)


def steered(alpha=None, zeta=1.0, neurons=True):
    """Next-token probabilities with α set, ζ′ scaled or the new neurons off at every edited layer."""
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


settings = {"as edited": {}, "α = 0": dict(alpha=0.0), "α = 1 on every token": dict(alpha=1.0),
            "ζ′ = 0": dict(zeta=0.0), "ζ′ × 5": dict(zeta=5.0), "new neurons off": dict(neurons=False),
            "α = 0 and neurons off": dict(alpha=0.0, neurons=False)}
results = {name: steered(**s) for name, s in settings.items()}
with editor.disabled(), torch.no_grad():
    results["editor disabled (base)"] = model(**inputs).logits[0, -1].float().cpu()
width = max(map(len, results))
print(f"{'':{width}}  {'top token':>12}  {'p(target)':>10}  {'p(original)':>11}  {'max |Δ logit|':>13}")
for name, logits in results.items():
    p = logits.softmax(-1)
    moved = (logits - results["as edited"]).abs().max()
    print(f"{name:{width}}  {tokenizer.decode(p.argmax()):>12}  {p[target]:10.3f}  {p[original]:11.3f}  {moved:13.3f}")
editor.detach()
print("detached")'''),
]

NOTEBOOKS = {"01_quickstart": QUICKSTART, "02_contrastive_training": CONTRASTIVE,
             "03_editing": EDITING, "04_interpretability": INTERPRET}
def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`, outputs empty, with stable cell ids. A third item in a cell's tuple names the
    figure it draws (tag `figure:<name>`, picked up by scripts/make_figures.py)."""
    cells = []
    for i, (kind, source, *figure) in enumerate(NOTEBOOKS[name]):
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
            tags = (["parameters"] if kind == "params" else []) + [f"figure:{f}" for f in figure]
            if tags:
                cell.metadata["tags"] = tags
        cell.id = f"{name[:2]}-{i:02d}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    FOLDER.mkdir(exist_ok=True)
    for name in NOTEBOOKS:
        path = FOLDER / f"{name}.ipynb"
        if not path.is_file() or path.read_text(encoding="utf-8") != text(name):
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(text(name), encoding="utf-8")
    if check and stale:
        print("out of date (run python scripts/make_notebooks.py):", *stale)
    elif not check:
        print("wrote", *stale) if stale else print("notebooks up to date")
    return int(check and bool(stale))


if __name__ == "__main__":
    sys.exit(main())
