"""The paper's equations against values computed by hand (explicit exp / log / cosines, not the code under
test): Eq. 4 and 5 (the contrastive losses), Eq. 7 (the latent memory's feature shift), Eq. 3/6 (the added
neurons with ζ′) and the initial keys of an edit's neurons."""
import math

import pytest
import torch

from unike.memory import LatentMemory
from unike.neurons import NeuronPatch
from unike.spaces import Spaces, semantic_loss, truth_loss


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- Eq. 4 and 5
def test_truth_loss_two_orthogonal_states():
    """One right and one wrong state, orthogonal, τ = 0.5: each row's logits are (2, 0), so the loss is
    log(e² + e⁰) − log(e²) = log(1 + e⁻²)."""
    loss = truth_loss(_t([[1.0, 0.0]]), _t([[0.0, 3.0]]), tau=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-12)


def test_truth_loss_by_hand():
    """Two right and two wrong states: per state, −log of the share of exp(cos/τ) (itself included) that
    falls on its own label, averaged over the four."""
    pos, neg, tau = [[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [-1.0, 2.0]], 0.2
    states, labels = pos + neg, [1, 1, 0, 0]
    want = 0.0
    for i, a in enumerate(states):
        e = [math.exp(_cos(a, b) / tau) for b in states]
        same = sum(x for x, l2 in zip(e, labels) if l2 == labels[i])
        want += (math.log(sum(e)) - math.log(same)) / len(states)
    assert truth_loss(_t(pos), _t(neg), tau).item() == pytest.approx(want, abs=1e-12)


def test_semantic_loss_by_hand():
    """Each question state against its own sample's pos and neg (the numerator) among every sample's."""
    h = [[1.0, 0.0], [0.0, 1.0]]
    e_pos, e_neg, tau = [[1.0, 0.2], [0.5, 1.0]], [[2.0, -1.0], [-1.0, 1.0]], 0.3
    others = e_pos + e_neg
    want = 0.0
    for i, a in enumerate(h):
        e = [math.exp(_cos(a, b) / tau) for b in others]
        own = e[i] + e[i + len(h)]
        want += -math.log(own / sum(e)) / len(h)
    assert semantic_loss(_t(h), _t(e_pos), _t(e_neg), tau).item() == pytest.approx(want, abs=1e-12)


def test_losses_fall_as_the_states_separate():
    """Eq. 4's minimum is approached as right and wrong states pull apart; Eq. 5's as the question state
    aligns with its own sample's encodings."""
    near = truth_loss(_t([[1.0, 0.1]]), _t([[1.0, -0.1]]), 0.1)
    far = truth_loss(_t([[1.0, 0.0]]), _t([[-1.0, 0.0]]), 0.1)
    assert far < near and far.item() == pytest.approx(math.log(1 + math.exp(-20)), abs=1e-12)
    mine = semantic_loss(_t([[1.0, 0.0]]), _t([[1.0, 0.0]]), _t([[1.0, 0.0]]), 0.1)
    assert mine.item() == pytest.approx(0.0, abs=1e-12)       # only its own sample: nothing to tell apart


# ---------------------------------------------------------------- Eq. 7
# Four entries in 3-D: key h_sem, value h_pos, attention value v = Attn(h_pos, h_pos, h_pos).
H_SEM = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
H_POS = [[0.5, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, -1.0]]
V_POS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [3.0, 3.0, 3.0]]


def _memory(top_k=2, temperature=0.5, fixed_alpha=None):
    """A fitted memory whose standardiser is the identity (mean 0, std 1, as a fresh `Spaces` has it), ungated."""
    spaces = Spaces(3, hidden=4, truth_dim=2)
    assert torch.equal(spaces.standardize.mean, torch.zeros(3)) and torch.equal(spaces.standardize.std, torch.ones(3))
    mem = LatentMemory(3, spaces, top_k=top_k, temperature=temperature, fixed_alpha=fixed_alpha)
    mem.add(torch.tensor(H_SEM), torch.tensor(H_POS), torch.tensor(V_POS), fitted=True)
    return mem


def _shift(x, h_attn, top_k, temperature, alpha_of, among=None):
    """(1 − α)·h_attn + α·Σ softmax(cos / T)·v over the top-K entries (`among` them) by cosine, by hand."""
    cos = [_cos(x, k) for k in H_SEM]
    top = sorted(range(len(H_SEM)) if among is None else among, key=lambda i: -cos[i])[:top_k]
    e = {i: math.exp(cos[i] / temperature) for i in top}
    w = {i: e[i] / sum(e.values()) for i in top}
    h_know = [sum(w[i] * V_POS[i][j] for i in top) for j in range(3)]
    h_state = [sum(w[i] * H_POS[i][j] for i in top) for j in range(3)]
    a = alpha_of(h_state, x)
    return [(1 - a) * h + a * k for h, k in zip(h_attn, h_know)]


X = [[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [-1.0, 2.0, 0.5]]         # three tokens' pre-attention states
H_ATTN = [[0.1, 0.2, 0.3], [-1.0, 0.0, 1.0], [2.0, 2.0, -2.0]]     # and their attention outputs


@pytest.mark.parametrize("top_k, temperature", [(2, 0.5), (3, 0.1), (4, 1.0)])
def test_shift_with_fixed_alpha_by_hand(top_k, temperature):
    mem = _memory(top_k, temperature, fixed_alpha=0.3)
    with torch.no_grad():
        out = mem(torch.tensor([H_ATTN]), torch.tensor([X]))
    want = [_shift(x, h, top_k, temperature, lambda s, x: 0.3) for x, h in zip(X, H_ATTN)]
    assert out.shape == (1, 3, 3)
    assert torch.allclose(out[0], torch.tensor(want), atol=1e-6), (out, want)
    assert mem.retrieved == (3, 3)                          # no gate: every token retrieves


def test_shift_with_semantic_alpha_by_hand():
    """α = clamp(cos(Enc_sem(Σ w·h_pos), x), 0, 1), Enc_sem the identity here: token 0's retrieved state
    points its way (0 < α < 1); token 1's points away (α = 0: its attention output comes back as it was)."""
    mem = _memory(2, 0.5)
    mem.spaces.sem.net = torch.nn.Identity()
    with torch.no_grad():
        out = mem(torch.tensor([H_ATTN]), torch.tensor([X]))
    alphas = []

    def alpha(s, x):
        alphas.append(min(max(_cos(s, x), 0.0), 1.0))
        return alphas[-1]
    want = [_shift(x, h, 2, 0.5, alpha) for x, h in zip(X, H_ATTN)]
    assert 0 < alphas[0] < 1 and alphas[1] == 0.0, alphas
    assert torch.allclose(out[0], torch.tensor(want), atol=1e-6), (out, want)
    assert torch.equal(out[0, 1], torch.tensor(H_ATTN[1]))


def test_edit_entries_on_their_own_and_changed_facts_masked_by_hand():
    """Entries 0–2 fitted, entry 3 an edit's. A token whose best match is the edit's entry retrieves it
    alone (its own softmax: h_know = v_3); the others retrieve their top-2 fitted entries, entry 1 left out
    once masked (a fact the edit changed). With a fixed α every token is shifted, gate or not."""
    spaces = Spaces(3, hidden=4, truth_dim=2)
    mem = LatentMemory(3, spaces, top_k=2, temperature=0.5, fixed_alpha=0.3)
    mem.add(torch.tensor(H_SEM[:3]), torch.tensor(H_POS[:3]), torch.tensor(V_POS[:3]), fitted=True)
    mem.add(torch.tensor(H_SEM[3:]), torch.tensor(H_POS[3:]), torch.tensor(V_POS[3:]))
    assert mem.edits == 1 and mem.owner.tolist() == [0]
    best = [max(range(4), key=lambda i: _cos(x, H_SEM[i])) for x in X]
    assert best == [2, 3, 1]                     # token 1 is closest to the edit's entry
    for masked in ([], [1]):
        mem.mask(torch.tensor(masked, dtype=torch.long))
        with torch.no_grad():
            out = mem(torch.tensor([H_ATTN]), torch.tensor([X]))
        fitted = [i for i in range(3) if i not in masked]
        want = [_shift(x, h, 2, 0.5, lambda s, x: 0.3, among=[3] if b == 3 else fitted)
                for x, h, b in zip(X, H_ATTN, best)]
        assert torch.allclose(out[0], torch.tensor(want), atol=1e-6), (masked, out, want)
    mem.truncate(3)                                # reset: the edit's entry and the masks go
    assert len(mem) == 3 and not mem.masked.any() and mem.edits == 0


def test_empty_memory_and_alpha_zero_give_the_attention_output_back():
    spaces = Spaces(3, hidden=4, truth_dim=2)
    h = torch.tensor([H_ATTN])
    assert LatentMemory(3, spaces)(h, torch.tensor([X])) is h
    with torch.no_grad():
        assert torch.equal(_memory(fixed_alpha=0.0)(h, torch.tensor([X])), h)


# ---------------------------------------------------------------- Eq. 3 / 6
def test_neurons_by_hand():
    """act(q·K + b)·(V + β·ζ′): two edits of two neurons each in 2-D, ReLU, β = 0.5; each edit's ζ′
    is added to every one of its neurons' values."""
    k = [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 2.0]]]    # per edit: the two neurons' keys (rows)
    b = [[0.0, -1.0], [-0.5, 0.5]]
    v = [[[1.0, 2.0], [3.0, -1.0]], [[0.0, 1.0], [2.0, 2.0]]]    # per edit: the two neurons' values
    zeta, beta = [[1.0, -1.0], [0.5, 0.5]], 0.5
    patch = NeuronPatch(2, n_per_edit=2, beta=beta)
    for e in range(2):
        patch.begin(torch.tensor(k[e]).T, torch.tensor(b[e]))
        patch.pending["v"].data.copy_(torch.tensor(v[e]))
        patch.truth = torch.tensor(zeta[e])                  # the ζ′ this edit carries
        patch.commit()
    patch.truth = torch.zeros(0)
    qs = [[2.0, 0.5], [-1.0, 1.0], [0.3, -2.0]]
    want = []
    for q in qs:
        out = [0.0, 0.0]
        for e in range(2):
            for j in range(2):
                a = max(0.0, q[0] * k[e][j][0] + q[1] * k[e][j][1] + b[e][j])
                out = [o + a * (v[e][j][i] + beta * zeta[e][i]) for i, o in enumerate(out)]
        want.append(out)
    with torch.no_grad():
        got = patch(torch.tensor([qs]))
    assert torch.allclose(got[0], torch.tensor(want), atol=1e-6), (got, want)
    # the pending edit's neurons (values at zero) add β ζ′ times their activations only
    patch.begin(torch.tensor([[1.0], [0.0]]).repeat(1, 2), torch.tensor([0.0, -1.0]))
    patch.truth = torch.tensor([2.0, 4.0])
    with torch.no_grad():
        more = patch(torch.tensor([qs]))[0] - got[0]
    extra = [(max(0.0, q[0]) + max(0.0, q[0] - 1)) * beta * torch.tensor([2.0, 4.0]) for q in qs]
    assert torch.allclose(more, torch.stack(extra), atol=1e-6)


# ---------------------------------------------------------------- the keys of an edit's neurons
def _check_init_keys(init_keys):
    """`init_keys(q, neg, mu, ridge, margin) -> keys [d, n]`: keys ∝ Σ⁻¹(q − μ), Σ the negatives'
    covariance plus ridge·mean(diag Σ)·I, scaled so that (q − μ)·k = margin."""
    neg = _t([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    # unbiased covariance: var x = 2/3, var y = 8/3, cov 0; ridge 0.5 adds 0.5 · 5/3: Σ = diag(3/2, 7/2)
    q, mu = _t([[1.0, 1.0], [3.0, 1.0]]), _t([0.0, 0.0])
    keys = init_keys(q, neg, mu, 0.5, 2.0)
    # query 0: Σ⁻¹δ = (2/3, 2/7), δ·Σ⁻¹δ = 20/21, times 2 · 21/20; query 1: Σ⁻¹δ = (2, 2/7), δ·Σ⁻¹δ = 44/7
    want = _t([[2 / 3 * 2 * 21 / 20, 2 / 7 * 2 * 21 / 20], [2 * 2 * 7 / 44, 2 / 7 * 2 * 7 / 44]]).T
    assert keys.shape == (2, 2)
    assert torch.allclose(keys.double(), want, atol=1e-6), (keys, want)
    assert torch.allclose(((q - mu) * keys.T).sum(1), _t([2.0, 2.0]))       # the margin at q, 0 at μ
    # no ridge (T-Patcher), or one negative: keys along q − μ, |q − μ|² = 1 and 5 (μ = (1, 0) moves them)
    mu1 = _t([1.0, 0.0])
    for k in (init_keys(q, neg, mu1, None, 3.0), init_keys(q, neg[:1], mu1, 0.5, 3.0)):
        assert torch.allclose(k.double(), _t([[0.0, 3.0], [3 * 2 / 5, 3 * 1 / 5]]).T, atol=1e-6), k


def test_init_keys_by_hand():
    from unike.training import init_keys

    _check_init_keys(init_keys)
