"""External knowledge: the latent memory of one layer and its feature shift (paper §3.2, Eq. 2 and 7).

The memory stores, per entry, the key h_sem (the pre-attention state of a question's last token) and
the value h_pos (the state of the final token of question + right answer). Every token's
pre-attention state x retrieves its top-K entries by cosine (standardised states) and attends over them
with weights w = softmax(cos / T). As in the paper's derivation (App. A), the knowledge enters through
the layer's own value and output projections: each entry also stores v = Attn(h_pos, h_pos, h_pos),
the attention output of the entry attending to itself (= o_proj(v_proj(norm(h_pos))), computed once
by the model itself), so that

    h_know = Σ w_i v_i                      (what attending to the knowledge tokens would add)
    out    = (1 − α) · h_attn + α · h_know  (the attention output, before the residual add)

α = clamp(cos(Enc_sem(Σ w_i h_pos,i), x), 0, 1) per token (the semantic space), or a fixed value.

Per-token retrieval makes the shift independent of batch composition, padding and the KV cache: a
token gets the same shift whether it is processed in the prefill or in a cached decoding step.

Pruning (exact). A token whose best cosine is below the relevance gate gets α = 0 and its attention
output back unchanged, so its top-K is never used. Before the full scan, every token's best cosine is
bounded from above in a rank-r basis of the keys (Cauchy–Schwarz on the part outside the basis):

    cos(q, k) = q_r·k_r + q_⊥·k_⊥ ≤ q_r·k_r + |q_⊥| |k_⊥|      (r = 16 numbers per entry, not d)

and only tokens whose bound reaches the gate retrieve. They re-rank exactly a shortlist of the entries
with the best bounds, certified when its lowest bound is below the K-th exact cosine (else a full
scan). The output is that of a full scan (to float rounding: matrix products over fewer rows sum in
another order); a token that skips gets exactly its attention output, α = 0, and zero rows of h_know
and Σ w h_pos. `prune = False` (or `UniKE.full_retrieval()`) makes every token retrieve, e.g. to steer
α where the gate is shut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .spaces import Spaces


BOUND_RANK = 16      # width of the pruning bound's basis
BOUND_SLACK = 1e-4   # added to the bound: float rounding never prunes a token the full scan would pass


class Knowledge(nn.Module):
    """A softmax-weighted sum of retrieved rows, zero for tokens that retrieved nothing; a module so
    nnsight can read or steer h_know."""

    def forward(self, weights: Float[Tensor, "m k"], table: Float[Tensor, "N d"], idx: Int[Tensor, "m k"],
                rows: Int[Tensor, "m"], n: int) -> Float[Tensor, "n d"]:
        out = weights.new_zeros(n, table.shape[1])
        return out.index_copy(0, rows, torch.einsum("mk,mkd->md", weights, table.to(weights)[idx]))


class Alpha(nn.Module):
    """α per token: clamp(cos(Enc_sem(h_know), x), 0, 1) (or a fixed value), and 0 where the best
    retrieval cosine is below the relevance gate."""

    def __init__(self, fixed: float | None = None):
        super().__init__()
        self.fixed = fixed

    def forward(self, enc_know: Float[Tensor, "n d"], x_std: Float[Tensor, "n d"],
                relevant: Float[Tensor, "n"]) -> Float[Tensor, "n"]:
        if self.fixed is not None:
            alpha = enc_know.new_full(enc_know.shape[:1], float(self.fixed))
        else:
            alpha = F.cosine_similarity(enc_know, x_std, dim=-1).clamp(0, 1)
        return alpha * relevant


class LatentMemory(nn.Module):
    """One layer's (h_sem, h_pos) store, top-K retrieval and feature shift."""

    def __init__(self, dim: int, spaces: Spaces, top_k: int = 40, temperature: float = 0.1,
                 fixed_alpha: float | None = None, chunk: int = 16384):
        super().__init__()
        self.spaces = spaces                      # shared with the editor; not a second copy
        self.top_k, self.temperature, self.chunk = top_k, temperature, chunk
        self.know = Knowledge()        # h_know, attention-output space (the shift)
        self.state = Knowledge()       # the retrieved states Σ w h_pos (input of the semantic encoder)
        self.alpha = Alpha(fixed_alpha)
        self.register_buffer("keys", torch.zeros(0, dim))      # standardised, unit-norm h_sem
        self.register_buffer("values", torch.zeros(0, dim))    # raw h_pos
        self.register_buffer("attn_values", torch.zeros(0, dim))  # Attn(h_pos, h_pos, h_pos)
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))  # first n_fit entries come from fit()
        self.register_buffer("min_similarity", torch.tensor(-1.0))       # relevance gate (calibrate())
        self.prune = True              # skip retrieval where the bound proves the gate shut (exact)
        self._bound: dict | None = None  # the pruning bound's basis and per-entry parts, for `keys` as it is
        self.retrieved = (0, 0)        # (tokens that retrieved, tokens) in the last forward

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def add(self, h_sem: Float[Tensor, "n d"], h_pos: Float[Tensor, "n d"], v_pos: Float[Tensor, "n d"]) -> None:
        keys = F.normalize(self.spaces.standardize(h_sem.float()), dim=-1).to(self.keys)
        bound = self._live_bound()
        self.keys = torch.cat([self.keys, keys])
        if bound is not None:          # the basis stays; the new entries get their parts in it
            parts = torch.cat([bound["parts"], self._parts(keys, bound["basis"])])
            self._bound = {**bound, "keys": self.keys, "parts": parts}
        self.values = torch.cat([self.values, h_pos.float().to(self.values)])
        self.attn_values = torch.cat([self.attn_values, v_pos.float().to(self.attn_values)])

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        """Keep the first n entries (drop the edits' entries)."""
        bound = self._live_bound()
        self.keys, self.values = self.keys[:n].clone(), self.values[:n].clone()
        self.attn_values = self.attn_values[:n].clone()
        self._bound = None if bound is None else {**bound, "keys": self.keys, "parts": bound["parts"][:n].clone()}

    @torch.no_grad()
    def calibrate(self, h_sem: Float[Tensor, "n d"], other: Float[Tensor, "m d"], quantile: float | None) -> None:
        """Set the relevance gate: a token whose best retrieval cosine is below the `quantile` of the
        best cosines of ordinary prompt tokens (`other`) gets α = 0. Question-final states (`h_sem`,
        scored without their own entry) should pass; the fraction that does is returned."""
        if quantile is None or len(other) == 0:
            self.min_similarity.fill_(-1.0)
            return None
        dev = self.keys.device         # fit collects states on the CPU; the memory may live on a GPU
        self.min_similarity.fill_(float(torch.quantile(self.nearest(other.to(dev))[0][:, 0], quantile)))
        best = self.nearest(h_sem.to(dev))[0]
        loo = best[:, 1] if len(self) > 1 else best[:, 0]
        return float((loo >= self.min_similarity).float().mean())

    def nearest(self, x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """What pre-attention states x retrieve: their top-K cosines and memory indices (entry i < n_fit is
        the i-th fit triplet, later entries are the edits' in order)."""
        return self.retrieve(F.normalize(self.spaces.standardize(x.float()), dim=-1))

    def retrieve(self, q: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """Top-K cosine similarities and indices of unit-norm standardised queries q, computed in chunks of
        the memory (linear in its size)."""
        k = min(self.top_k, len(self))
        best_s = q.new_full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, len(self), self.chunk):
            sims = q @ self.keys[start:start + self.chunk].to(q).T
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + start], 1).gather(1, order)
        return best_s, best_i

    @staticmethod
    def _parts(keys: Float[Tensor, "n d"], basis: Float[Tensor, "r d"]) -> Float[Tensor, "n r+1"]:
        """[k_r, |k_⊥|]: unit vectors' coordinates in the basis and the norm of what lies outside it."""
        inside = keys @ basis.T
        return torch.cat([inside, (keys - inside @ basis).norm(dim=1, keepdim=True)], 1)

    def _live_bound(self) -> dict | None:
        """The bound's basis and parts if they were made for `keys` as it is now (fit, load and a rolled
        back transaction replace `keys`, which leaves them stale)."""
        return self._bound if self._bound is not None and self._bound["keys"] is self.keys else None

    @torch.no_grad()
    def _index(self) -> dict:
        """The bound's basis (top right singular vectors of the fitted keys, by a seeded randomized range
        finder) and every entry's parts; built on first use and after `keys` is replaced (fit, load)."""
        if self._live_bound() is None:
            fitted = self.keys[:int(self.n_fit)] if int(self.n_fit) else self.keys
            r = min(BOUND_RANK, *fitted.shape)
            probe = torch.randn(fitted.shape[1], r + 8, generator=torch.Generator().manual_seed(0)).to(fitted)
            basis = torch.linalg.qr(fitted @ probe).Q
            for _ in range(2):                                   # power iterations sharpen the range
                basis = torch.linalg.qr(fitted @ (fitted.T @ basis)).Q
            basis = torch.linalg.svd(basis.T @ fitted, full_matrices=False).Vh[:r]        # [r, d]
            self._bound = {"keys": self.keys, "basis": basis, "parts": self._parts(self.keys, basis)}
        return self._bound

    @torch.no_grad()
    def open_rows(self, q: Float[Tensor, "n d"]) -> Int[Tensor, "m"]:
        """Rows of unit-norm standardised queries whose best cosine may reach the relevance gate (every
        row when the gate is off, `prune` is False, or the memory is small)."""
        return self._open(q)[0]

    def _open(self, q: Float[Tensor, "n d"]) -> tuple[Int[Tensor, "m"], Float[Tensor, "m r+1"] | None]:
        """`open_rows` and those rows' coordinates in the bound's basis (None when not pruning)."""
        every = torch.arange(q.shape[0], device=q.device)
        gate = float(self.min_similarity)
        if not self.prune or gate <= -1 or len(self) <= 4 * self.top_k:
            return every, None
        bound = self._index()
        mine = self._parts(q, bound["basis"].to(q))                                        # [n, r+1]
        best = q.new_full((q.shape[0],), float("-inf"))
        for start in range(0, len(self), self.chunk):
            best = torch.maximum(best, (mine @ bound["parts"][start:start + self.chunk].to(q).T).amax(1))
        keep = best + BOUND_SLACK >= gate
        if keep.float().mean() > 0.25:     # the bound prunes little here: a full scan is cheaper than shortlists
            return every[keep], None
        return every[keep], mine[keep]

    @torch.no_grad()
    def top_indices(self, q: Float[Tensor, "m d"], coords: Float[Tensor, "m r+1"] | None = None) -> Int[Tensor, "m k"]:
        """Each query's exact top-K entries as ascending indices. With its coordinates in the bound's
        basis, from a shortlist of the 4K best bounds, re-ranked exactly: kept when the shortlist's lowest
        bound is below the K-th exact cosine (no entry outside it can enter), else a full scan."""
        if coords is None:
            return self.retrieve(q)[1].sort(1).values
        k = min(self.top_k, len(self))
        bounds, short = (coords @ self._index()["parts"].to(q).T).topk(min(len(self), 4 * k), dim=1)
        exact, order = torch.einsum("md,msd->ms", q, self.keys.to(q)[short]).topk(k, dim=1)
        idx = short.gather(1, order)
        unsure = bounds[:, -1] + BOUND_SLACK >= exact[:, -1]
        if unsure.any():
            idx[unsure] = self.retrieve(q[unsure])[1]
        return idx.sort(1).values

    def forward(self, h_attn: Float[Tensor, "b t d"], x: Float[Tensor, "b t d"]) -> Float[Tensor, "b t d"]:
        if len(self) == 0:
            return h_attn
        shape, dtype = h_attn.shape, h_attn.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        n = x2.shape[0]
        x_std = self.spaces.standardize(x2)
        q = F.normalize(x_std, dim=-1)
        rows, coords = self._open(q)
        self.retrieved = (len(rows), n)
        idx = self.top_indices(q[rows], coords)
        sims = torch.einsum("md,mkd->mk", q[rows], self.keys.to(q)[idx])    # differentiable in x when training
        weights = torch.softmax(sims / self.temperature, dim=-1)
        h_state = self.state(weights, self.values, idx, rows, n)
        relevant = x_std.new_zeros(n).index_fill(0, rows[sims.amax(1) >= self.min_similarity], 1.0)
        enc_know = h_state.index_copy(0, rows, self.spaces.sem(self.spaces.standardize(h_state[rows])))
        alpha = self.alpha(enc_know, x_std, relevant)
        h_know = self.know(weights, self.attn_values, idx, rows, n)
        a = alpha[:, None]
        shifted = (1 - a) * h_attn.reshape(-1, shape[-1]).float() + a * h_know
        return shifted.reshape(shape).to(dtype)
