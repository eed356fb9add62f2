"""How one edit's neurons are made (paper §3.2, T-Patcher style): keys initialised along the discriminant
direction of the edit's FFN inputs against unrelated ones, then keys, biases and values trained together
on the edit's cross-entropy and two hinge losses (fire on the edit's own positions, stay silent on
unrelated inputs), until the target is generated and both margins hold.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from .collect import BatchStates, tokens
from .config import UniKEConfig
from .layer import EditedLayer
from .prompting import IGNORE
from .roles import target_positions
from .router import EditRouter
from .subject import named, occurred


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Iterable[nn.Parameter]):
    """Gradients on `params` alone for a while; every parameter's flag and gradient restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


def answer_logits(model: nn.Module, inputs: dict, labels: Tensor) -> Tensor:
    """Float32 logits at the positions that predict `labels[:, 1:]` (the model may prepend positions)."""
    return model(**inputs).logits[:, -labels.shape[1]:][:, :-1].float()


def init_keys(q: Float[Tensor, "n d"], neg: Float[Tensor, "m d"], mu: Float[Tensor, " d"], ridge: float | None,
              margin: float) -> Float[Tensor, "d n"]:
    """Keys along the discriminant direction Σ⁻¹(q − μ) of each neuron's input against the negatives
    (covariance Σ + ridge·mean(diag Σ)·I; None or a single negative: along q − μ), scaled so the
    pre-activation q·k + b with b = −μ·k is `margin` at q and 0 at μ."""
    delta = q - mu
    if len(neg) > 1 and ridge is not None:
        cov = torch.cov(neg.T.double())
        cov += ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        w = torch.linalg.solve(cov, delta.T.double()).T.to(delta)
    else:
        w = delta
    return (w * margin / (w * delta).sum(-1, keepdim=True).clamp_min(1e-6)).T


def unrelated(q_pos: dict[int, Float[Tensor, "p d"]], pools: dict[int, Float[Tensor, "m d"]],
              exclude_cos: float, stats: dict[int, Float[Tensor, "s d"]] | None = None) -> Bool[Tensor, " m"]:
    """Which negatives are unrelated to the edit. A negative is the *same knowledge* as the edit (another
    rendering or wording of the edited fact, which the edit should reach) when its FFN input agrees with the
    edit's at every edited layer: the mean over layers of the best cosine to the edit's positions
    (standardised by the statistics of `stats`, default the negatives themselves) is at least `exclude_cos`.
    Those are not pushed down."""
    cos = 0
    for l, neg in pools.items():
        q, ref = q_pos[l], neg if stats is None else stats[l].to(neg)
        mu, sd = ref.mean(0), ref.std(0).clamp_min(1e-5) if len(ref) > 1 else torch.ones_like(q[0, 0])
        cos = cos + (F.normalize((neg - mu) / sd, dim=-1) @ F.normalize((q - mu) / sd, dim=-1).T).max(1).values
    return cos / len(pools) < exclude_cos


def targets(labels: Tensor, eos: int | None) -> Bool[Tensor, "b t"]:
    """The positions an edit's neurons sit at: those that predict a target token. The answer's end
    (predicting EOS) is left out where others exist: it only trains through the loss, its state is the
    same "answer ends" state as every other answer's."""
    pos_mask = target_positions(labels)
    ends = pos_mask & (F.pad(labels[:, 1:], (0, 1), value=IGNORE) == eos)
    return pos_mask & ~ends if (pos_mask & ~ends).any() else pos_mask


def violation(z: Tensor, margin: float) -> Tensor:
    """Hinge of pre-activations above −margin, averaged over the violating ones: hard ones are not diluted."""
    hinge = F.relu(z + margin)
    return hinge.sum() / (hinge > 0).sum().clamp_min(1)


def train_neurons(model: nn.Module, layers: dict[int, EditedLayer], config: UniKEConfig, inputs: dict[str, Tensor],
                  states: dict[int, BatchStates], at: Bool[Tensor, "b t"],
                  extra: tuple[dict[int, Tensor], Tensor] | None = None, router: EditRouter | None = None,
                  progress: bool = False, radius: float | None = None,
                  updates: Bool[Tensor, " k"] | None = None,
                  subject: Int[Tensor, " s"] | None = None) -> dict[str, float]:
    """Add and train one edit's neurons in every layer (positions `at`, from `targets`), then commit them.
    Negatives: fit questions' FFN inputs, earlier edits' (so a sequence of edits does not overwrite itself),
    the edit's own prompt positions and `extra` (other questions over the edit's image: their FFN inputs
    per layer and their states at the first edited layer, `Collector.image_negatives`); with
    `own_answer_negatives`, the edit's answer positions that predict another token than a neuron's own
    (where they are not the same knowledge as its own position). With the `router` that will gate the
    edit (and the edit's image threshold `radius`), the neurons train against (and stop on) the negatives
    its gate reaches only: elsewhere the gate keeps them silent. `updates`: the rows of the earlier edits'
    inputs (`EditedLayer.edited`) at the question of the edits this one updates (`EditRouter.precede`): the
    same knowledge, so not negatives; the neurons at the question's last token fire there too, where the
    gate reaches. `subject`: the edit's subject (`unike.subject`; None: none), which its gate needs."""
    cfg, labels = config, inputs["labels"]
    pos_mask = target_positions(labels)                       # positions that predict target tokens
    neg_mask = inputs["attention_mask"].bool() & ~pos_mask & (labels == IGNORE)
    rows, cols = at.nonzero(as_tuple=True)
    assign = torch.arange(cfg.n_neurons, device=rows.device) % len(rows)   # neuron j ↔ target position
    extra, extra_x = extra if extra else (None, None)
    pools = {l: torch.cat([ly.negatives.to(states[l].q), ly.edited.to(states[l].q), states[l].q[neg_mask]]
                          + ([extra[l].to(states[l].q)] if extra else [])) for l, ly in layers.items()}
    keep = unrelated({l: st.q[rows, cols] for l, st in states.items()}, pools, cfg.neg_exclude_cos)
    n_fit = len(next(iter(layers.values())).negatives)
    updated = torch.zeros_like(keep)
    if updates is not None:
        updated[n_fit:n_fit + len(updates)] = updates.to(keep.device)
    keep &= ~updated
    reach = torch.ones_like(keep)
    if router is not None:
        l0 = min(layers)                                      # the router's layer
        holds = (None if subject is None                      # where the edit's own prompt has named its subject
                 else named(occurred(inputs["input_ids"], subject), subject[None])[..., 0][neg_mask])
        reach = router.negative_scope(states[l0].x[rows, cols], states[l0].image, len(layers[l0].negatives),
                                      states[l0].x[neg_mask], extra_x, radius, subject, holds).to(keep.device)
    first = assign == 0                                       # neurons at the question's last token
    # the answer positions a neuron stays silent at: those that predict another token than its own, unless
    # they are the same knowledge as its own position (`unrelated`, as for every negative); None: none
    answers, elsewhere = {}, None
    if cfg.own_answer_negatives:
        answers = {l: st.q[pos_mask] for l, st in states.items()}                # [A, d] per layer
        slot = pos_mask.flatten().cumsum(0).view_as(labels) - 1               # answer position → row
        predicts = labels[:, 1:][pos_mask[:, :-1]]                             # [A] the token each predicts
        apart = torch.stack([unrelated({l: st.q[r, c][None] for l, st in states.items()}, answers,
                                       cfg.neg_exclude_cos, {l: ly.negatives for l, ly in layers.items()})
                             for r, c in zip(rows.tolist(), cols.tolist())], 1)  # [A, P]
        elsewhere = (predicts[:, None] != predicts[slot[rows, cols][assign]][None]) & apart[:, assign]  # [A, n]
        elsewhere = elsewhere if elsewhere.any() else None
    negatives, positives, inside, prompts, groups = {}, {}, {}, {}, []
    for l, layer in layers.items():
        q_pos, neg = states[l].q[rows, cols], pools[l]                     # [P, d], [m, d]
        mu = neg.mean(0)
        layer.edited = torch.cat([layer.edited, q_pos.cpu()])
        negatives[l] = neg[keep & reach]
        same = neg[:n_fit][~keep[:n_fit]] if cfg.memory_positives else neg[:0]  # fit inputs of the same knowledge
        positives[l] = torch.cat([same, neg[updated & reach]])                  # and updated edits': fire there too
        keys = init_keys(q_pos[assign], neg, mu, cfg.key_ridge, cfg.margin_pos)
        bias = -(mu @ keys)
        inside[l] = layer.answer_negatives.to(q_pos)
        prompts[l] = layer.prompt_negatives.to(q_pos)
        if len(inside[l]) and not first.all():   # neurons inside a multi-token answer: against fit answers
            pool = torch.cat([inside[l], neg])
            k_in = init_keys(q_pos[assign[~first]], pool, pool.mean(0), cfg.key_ridge, cfg.margin_pos)
            keys[:, ~first], bias[~first] = k_in, -(pool.mean(0) @ k_in)
        patch = layer.neurons
        patch.begin(keys, bias)
        # step sizes relative to each tensor's natural scale, so one edit_lr fits every model width
        groups += [{"params": [patch.pending["k"]], "lr": cfg.edit_lr * float(keys.pow(2).mean().sqrt())},
                   {"params": [patch.pending["b"]], "lr": cfg.edit_lr * cfg.margin_pos},
                   {"params": [patch.pending["v"]], "lr": cfg.edit_lr * float(states[l].x_rms)}]
    opt = torch.optim.Adam(groups)
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    tgt = labels[:, 1:]
    with only_trainable(model, [p for g in groups for p in g["params"]]), torch.enable_grad():
        for step in tqdm(range(cfg.edit_steps + 1), desc="edit", disable=not progress):
            logits = answer_logits(model, batch, labels)
            ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE)
            probs = logits.softmax(-1)[tgt != IGNORE].gather(-1, tgt[tgt != IGNORE][:, None])
            reached = bool((probs > cfg.stop_prob).all())          # every target token generated
            act = neg_loss = torch.zeros((), device=logits.device)
            for l, layer in layers.items():
                z_of = layer.neurons.pending_preactivation
                z = z_of(tokens(layer.q, inputs)[rows, cols][assign])            # [n, n] own positions
                act = act + F.relu(cfg.margin_pos - z.diagonal()).mean()
                if len(positives[l]):
                    act = act + F.relu(cfg.margin_pos - z_of(positives[l])[:, first]).mean()
                if len(negatives[l]):
                    neg_loss = neg_loss + violation(z_of(negatives[l]), cfg.margin_neg)
                if elsewhere is not None:
                    neg_loss = neg_loss + violation(z_of(answers[l])[elsewhere], cfg.margin_neg)
                if len(inside[l]) and not first.all():
                    neg_loss = neg_loss + violation(z_of(inside[l])[:, ~first], cfg.margin_neg)
                if len(prompts[l]):        # a term of its own: many easy rows do not dilute the others
                    neg_loss = neg_loss + violation(z_of(prompts[l]), cfg.margin_neg)
            loss = ce + cfg.act_weight * act + cfg.neg_weight * neg_loss
            held = act.item() == 0 and neg_loss.item() == 0         # both margins, at every layer
            if (reached and held) or step == cfg.edit_steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    for layer in layers.values():
        layer.neurons.commit()
    info = {"steps": step, "loss": loss.item(), "reached": reached, "margins_held": held,
            "target_prob": probs.min().item()}
    if not reached:
        warnings.warn(f"the edit did not reach its target in {step} steps (lowest target-token probability "
                      f"{info['target_prob']:.2f}): its answer may differ from the target; raise "
                      "UniKEConfig.edit_steps or edit_lr", stacklevel=4)
    return info
