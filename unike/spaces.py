"""Knowledge collaboration: the semantic and truthfulness spaces (paper §3.3, Eq. 4 and 5).

Both encoders are small MLPs trained by contrastive learning on the triplet states of one layer:
* the **semantic** encoder maps an answer-final state (right or wrong answer) back onto the raw
  question state of its own sample (Eq. 5), so that α = cos(Enc_sem(h_know), h) measures whether the
  retrieved knowledge is about this input;
* the **truthfulness** encoder pulls right-answer states together and away from wrong-answer states
  (Eq. 4); ζ = mean Enc_tru(h_pos) − mean Enc_tru(h_neg) is the direction toward truthful knowledge.
  A linear decoder fitted by least squares on the same states maps the truthfulness space back to the
  hidden space, so ζ′ = Dec(ζ) is a hidden-space direction fixed by the triplets (ours: the paper's W_ζ
  is not specified further; one W_ζ trained per edit from zero made ζ′ the same whatever ζ was).

All states are standardised per layer (see `Standardizer`) before they enter either space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm


class Standardizer(nn.Module):
    """(h − μ) / σ per feature, with μ and σ of one layer's states (fit time).

    Raw hidden states share a large common component, so the cosine of any two is close to 1; after
    standardising, cosine tells states apart.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, states: Float[Tensor, "n d"]) -> Standardizer:
        self.mean.copy_(states.mean(0))
        self.std.copy_(states.std(0).clamp_min(1e-5))
        return self

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return (h - self.mean.to(h)) / self.std.to(h)


class Encoder(nn.Module):
    """A few MLP layers: d → hidden → out (GELU)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... o"]:
        return self.net(h)


def _sim(a: Float[Tensor, "n k"], b: Float[Tensor, "m k"], tau: float) -> Float[Tensor, "n m"]:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau


def truth_loss(z_pos: Float[Tensor, "n k"], z_neg: Float[Tensor, "n k"], tau: float) -> Tensor:
    """Eq. 4: each right state is close to all right states and far from wrong ones, and vice versa."""
    z = torch.cat([z_pos, z_neg])
    n = z_pos.shape[0]
    label = torch.cat([torch.ones(n), torch.zeros(n)]).to(z.device).bool()
    logits = _sim(z, z, tau)
    same = label[:, None] == label[None, :]
    log_all = torch.logsumexp(logits, 1)
    log_same = torch.logsumexp(logits.masked_fill(~same, float("-inf")), 1)
    return (log_all - log_same).mean()


def semantic_loss(h_sem: Float[Tensor, "n d"], e_pos: Float[Tensor, "n d"], e_neg: Float[Tensor, "n d"],
                  tau: float) -> Tensor:
    """Eq. 5: the raw question state h_sem,i is close to its own sample's encoded pos/neg states."""
    n = h_sem.shape[0]
    logits = _sim(h_sem, torch.cat([e_pos, e_neg]), tau)              # [n, 2n]
    own = torch.zeros_like(logits, dtype=torch.bool)
    idx = torch.arange(n, device=logits.device)
    own[idx, idx] = own[idx, idx + n] = True
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~own, float("-inf")), 1)).mean()


class Spaces(nn.Module):
    """One layer's semantic and truthfulness encoders, its standardiser and ζ."""

    def __init__(self, dim: int, hidden: int = 256, truth_dim: int = 64):
        super().__init__()
        self.standardize = Standardizer(dim)
        self.sem = Encoder(dim, hidden, dim)
        self.tru = Encoder(dim, hidden, truth_dim)
        self.register_buffer("zeta", torch.zeros(truth_dim))
        self.register_buffer("decoder", torch.zeros(truth_dim, dim))   # Dec: truth space → standardised states

    @torch.no_grad()
    def compute_zeta(self, h_pos: Float[Tensor, "n d"], h_neg: Float[Tensor, "n d"]) -> Tensor:
        """ζ = mean Enc_tru(h_pos) − mean Enc_tru(h_neg), over all stored knowledge."""
        s = self.standardize
        self.zeta.copy_(self.tru(s(h_pos)).mean(0) - self.tru(s(h_neg)).mean(0))
        return self.zeta

    @torch.no_grad()
    def fit_decoder(self, h: Float[Tensor, "n d"], ridge: float = 1e-3) -> None:
        """Dec = argmin ‖(Z − z̄)·Dec − (S − s̄)‖² + λ‖Dec‖², Z = Enc_tru(S), S the standardised states."""
        s = self.standardize(h)
        z = self.tru(s)
        z, s = z - z.mean(0), s - s.mean(0)
        gram = z.T @ z
        gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)
        self.decoder.copy_(torch.linalg.solve(gram, z.T @ s))

    def zeta_prime(self) -> Float[Tensor, " d"]:
        """ζ′ = Dec(ζ) in the hidden space's own units (the standardisation's σ put back)."""
        return (self.zeta @ self.decoder) * self.standardize.std


def train_spaces(spaces: list[Spaces], states: list[dict[str, Tensor]], *, steps: int = 300,
                 batch_size: int = 128, lr: float = 1e-4, tau: float = 0.1, seed: int = 0,
                 progress: bool = True) -> list[dict[str, float]]:
    """Train every layer's encoders with Adam on L1 (Eq. 4) + L2 (Eq. 5); returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    for sp, st in zip(spaces, states):
        sp.standardize.fit(torch.cat([st["h_sem"], st["h_pos"], st["h_neg"]]))
    params = [p for sp in spaces for p in list(sp.sem.parameters()) + list(sp.tru.parameters())]
    opt = torch.optim.Adam(params, lr=lr)
    n = states[0]["h_sem"].shape[0]
    curve = []
    for _ in tqdm(range(steps), desc="contrastive spaces", disable=not progress):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        l_tru = l_sem = 0.0
        for sp, st in zip(spaces, states):
            s = sp.standardize
            h_sem, h_pos, h_neg = (s(st[k][idx]) for k in ("h_sem", "h_pos", "h_neg"))
            l_tru = l_tru + truth_loss(sp.tru(h_pos), sp.tru(h_neg), tau)
            l_sem = l_sem + semantic_loss(h_sem, sp.sem(h_pos), sp.sem(h_neg), tau)
        opt.zero_grad()
        (l_tru + l_sem).backward()
        opt.step()
        curve.append({"truth": l_tru.item() / len(spaces), "semantic": l_sem.item() / len(spaces)})
    for sp, st in zip(spaces, states):
        sp.compute_zeta(st["h_pos"], st["h_neg"])
        sp.fit_decoder(torch.cat([st["h_pos"], st["h_neg"]]))
    return curve


@torch.no_grad()
def zeta_variant(space: Spaces, kind: str, h_pos: Float[Tensor, "n d"], h_neg: Float[Tensor, "n d"],
                 gen: torch.Generator) -> Float[Tensor, " d_or_0"]:
    """ζ′ of new edits, a hidden-space direction fixed at fit time (Fig. 4c): "truthful" Dec(ζ), "semantic"
    the semantic space's right − wrong mean, "random" a random direction of the truthful norm, "none" empty."""
    if kind == "none":
        return torch.zeros(0)
    truthful = space.zeta_prime().detach().cpu()
    if kind == "semantic":
        s, dev = space.standardize, space.zeta.device     # the states were collected on the CPU
        sem = space.sem(s(h_pos.to(dev))).mean(0) - space.sem(s(h_neg.to(dev))).mean(0)
        return (sem * s.std).cpu()
    if kind == "random":
        return F.normalize(torch.randn(truthful.shape, generator=gen), dim=0) * truthful.norm()
    return truthful.clone()
