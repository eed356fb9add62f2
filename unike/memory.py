"""External knowledge: the latent memory of one layer and its feature shift (paper §3.2, Eq. 2 and 7).

The memory stores, per entry, the key h_sem (the pre-attention state of a question's last token) and
the value h_pos (the state of the final token of question + right answer). A token's pre-attention
state x retrieves its top-K entries by cosine (standardised states) and attends over them with weights
w = softmax(cos / T). As in the paper's derivation (App. A), the knowledge enters through the layer's
own value and output projections: each entry also stores v = Attn(h_pos, h_pos, h_pos), the attention
output of the entry attending to itself (= o_proj(v_proj(norm(h_pos))), computed once by the model
itself), so that

    h_know = Σ w_i v_i                      (what attending to the knowledge tokens would add)
    out    = (1 − α) · h_attn + α · h_know  (the attention output, before the residual add)

α = clamp(cos(Enc_sem(Σ w_i h_pos,i), x), 0, 1) per token (the semantic space), or a fixed value.

Per-token retrieval makes the shift independent of batch composition, padding and the KV cache: a
token gets the same shift whether it is processed in the prefill or in a cached decoding step.

Relevance gate and index. Most tokens (image patches, words inside a question) are about no stored
question; they get α = 0 and their attention output back unchanged. A token is relevant when its best
match reaches the gate `min_similarity`, set by `calibrate` to a quantile of ordinary prompt tokens'
best matches. The match is measured without touching the d-wide keys of the fitted memory: it is

    max( max_{i < n_fit} q_r · k_r,i ,  max_{i ≥ n_fit} q · k_i )

with q_r, k_r the coordinates of the unit-norm standardised states in the index: the top `index_rank`
principal directions of the fitted keys (`basis`, `coords`, built by `calibrate`). The fitted keys lie
almost inside it, so q_r · k_r is their cosine less what lies outside; the edits' entries, few and not
part of the basis, are matched by exact cosine. A token's fitted matches are at most |q_r|·max|k_r|, so
where that is below the gate the index is not scanned for it. Only relevant tokens retrieve, so a
forward costs at most r numbers per fitted entry and token, not d; `prune = False` (or
`UniKE.full_retrieval()`) makes every token retrieve without changing which are relevant, e.g. to read
or steer α where the gate is shut.

Retrieval is an exact top-K, shortlisted through the same index. With ρ_i = |k_i − k_r,i·basis|, what
of a fitted key lies outside the index (`residual`), and q⊥ likewise for the query,

    q · k_i = q_r · k_r,i + q⊥ · k⊥,i   lies within   q_r · k_r,i ± |q⊥| ρ_i,

so an entry whose upper bound is below the K-th best lower bound (the edits' entries count exactly)
cannot be in the top K. Exact cosines are computed only for the others, and for every entry when the
shortlist would not be much shorter than the memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .spaces import Spaces

SLACK = 1e-4   # float rounding in the shortlist's bounds (cosines of unit vectors, computed in fp32)


class Knowledge(nn.Module):
    """A softmax-weighted sum of retrieved rows, zero for tokens that retrieved nothing; a module so
    nnsight can read or steer h_know."""

    def forward(self, weights: Float[Tensor, "m k"], table: Float[Tensor, "N d"], idx: Int[Tensor, "m k"],
                rows: Int[Tensor, "m"], n: int) -> Float[Tensor, "n d"]:
        out = weights.new_zeros(n, table.shape[1])
        return out.index_copy(0, rows, torch.einsum("mk,mkd->md", weights, table.to(weights)[idx]))


class Alpha(nn.Module):
    """α per token: clamp(cos(Enc_sem(h_know), x), 0, 1) (or a fixed value), and 0 where the token is not
    relevant (its best match is below the gate)."""

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
    """One layer's (h_sem, h_pos) store, relevance gate, top-K retrieval and feature shift."""

    def __init__(self, dim: int, spaces: Spaces, top_k: int = 40, temperature: float = 0.1,
                 fixed_alpha: float | None = None, index_rank: int = 64, chunk: int = 16384):
        super().__init__()
        self.spaces = spaces                      # shared with the editor; not a second copy
        self.top_k, self.temperature, self.index_rank, self.chunk = top_k, temperature, index_rank, chunk
        self.know = Knowledge()        # h_know, attention-output space (the shift)
        self.state = Knowledge()       # the retrieved states Σ w h_pos (input of the semantic encoder)
        self.alpha = Alpha(fixed_alpha)
        self.register_buffer("keys", torch.zeros(0, dim))      # standardised, unit-norm h_sem
        self.register_buffer("values", torch.zeros(0, dim))    # raw h_pos
        self.register_buffer("attn_values", torch.zeros(0, dim))  # Attn(h_pos, h_pos, h_pos)
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))  # first n_fit entries come from fit()
        self.register_buffer("min_similarity", torch.tensor(-1.0))       # relevance gate (calibrate())
        self.register_buffer("basis", torch.zeros(0, dim))     # the index: [r, d] principal directions ...
        self.register_buffer("coords", torch.zeros(0, 0))      # ... and the fitted keys in it, [n_fit, r]
        self.register_buffer("residual", torch.zeros(0))       # |what of each fitted key is outside|, [n_fit]
        self.prune = True              # only relevant tokens retrieve (the others' α is 0 either way)
        self.retrieved = (0, 0)        # (tokens that retrieved, tokens) in the last forward

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def add(self, h_sem: Float[Tensor, "n d"], h_pos: Float[Tensor, "n d"], v_pos: Float[Tensor, "n d"],
            fitted: bool = False) -> None:
        """Append entries: an edit's, or (`fitted`) more fitted ones, placed in the index as it is."""
        keys = F.normalize(self.spaces.standardize(h_sem.float()), dim=-1).to(self.keys)
        if fitted:
            if len(self) != int(self.n_fit):
                raise RuntimeError("fitted entries go before the edits' entries: reset() the editor first")
            self.n_fit += len(keys)
            if len(self.basis):
                coords, residual = self._project(keys)
                self.coords, self.residual = torch.cat([self.coords, coords]), torch.cat([self.residual, residual])
        self.keys = torch.cat([self.keys, keys])
        self.values = torch.cat([self.values, h_pos.float().to(self.values)])
        self.attn_values = torch.cat([self.attn_values, v_pos.float().to(self.attn_values)])

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        """Keep the first n entries (n = n_fit drops the edits' entries; 0 empties the memory)."""
        self.keys, self.values = self.keys[:n].clone(), self.values[:n].clone()
        self.attn_values = self.attn_values[:n].clone()
        self.n_fit.clamp_(max=n)
        self.coords, self.residual = self.coords[:n].clone(), self.residual[:n].clone()

    @torch.no_grad()
    def index(self) -> None:
        """Build the index: the top `index_rank` right singular vectors of the fitted keys (a seeded
        randomized range finder) and every fitted key's coordinates in them."""
        fitted = self.keys[:int(self.n_fit)]
        r = min(self.index_rank, *fitted.shape)
        probe = torch.randn(fitted.shape[1], r + 8, generator=torch.Generator().manual_seed(0)).to(fitted)
        basis = torch.linalg.qr(fitted @ probe).Q
        for _ in range(2):                                   # power iterations sharpen the range
            basis = torch.linalg.qr(fitted @ (fitted.T @ basis)).Q
        self.basis = torch.linalg.svd(basis.T @ fitted, full_matrices=False).Vh[:r].contiguous()
        self.coords, self.residual = self._project(fitted)

    def _project(self, keys: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n r"], Float[Tensor, "n"]]:
        """Unit keys' coordinates in the index and the norm of what lies outside it."""
        coords = keys @ self.basis.T
        return coords, (keys - coords @ self.basis).norm(dim=1)

    @torch.no_grad()
    def calibrate(self, h_sem: Float[Tensor, "n d"], other: Float[Tensor, "m d"], quantile: float | None) -> float | None:
        """Index the fitted entries and set the relevance gate: a token whose best match is below the
        `quantile` of the best matches of ordinary prompt tokens (`other`) is not relevant (α = 0).
        Question-final states (`h_sem`, matched without their own entry) should pass; the fraction that
        does is returned."""
        self.index()
        if quantile is None or len(other) == 0:
            self.min_similarity.fill_(-1.0)
            return None
        dev = self.keys.device         # fit collects states on the CPU; the memory may live on a GPU
        self.min_similarity.fill_(float(torch.quantile(self.relevance(other.to(dev)), quantile)))
        loo = self._matches(self._unit(h_sem.to(dev)), 2)[:, -1]
        return float((loo >= self.min_similarity).float().mean())

    def _unit(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return F.normalize(self.spaces.standardize(x.float()), dim=-1)

    def nearest(self, x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """What pre-attention states x retrieve: their top-K cosines and memory indices (entry i < n_fit is
        the i-th fit triplet, later entries are the edits' in order)."""
        return self.retrieve(self._unit(x))

    @torch.no_grad()
    def relevance(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
        """Pre-attention states' best match (in the index for fitted entries, by cosine for the edits'),
        the number the relevance gate `min_similarity` compares."""
        return self._matches(self._unit(x), 1)[:, 0]

    @torch.no_grad()
    def _relevant(self, q: Float[Tensor, "n d"]) -> Bool[Tensor, "n"]:
        """Whether each query's match reaches the gate. Its fitted matches are at most |q_r|·max_i |k_r,i|;
        where that is below the gate they are not computed, only the edits' cosines (on the mid-size
        bench config that spares about 85% of the tokens the index scan)."""
        n_fit, gate = int(self.n_fit), self.min_similarity
        best = q.new_full(q.shape[:1], float("-inf"))
        scan = (q @ self.basis.T).norm(dim=1) * self._reach() + SLACK >= gate
        if scan.any():
            best[scan] = self._matches(q[scan], 1)[:, 0]
        if len(self) > n_fit and not scan.all():
            best[~scan] = (q[~scan] @ self.keys[n_fit:].T).amax(1)
        return best >= gate

    def _reach(self) -> Tensor:
        """max_i |k_r,i| over the fitted entries (0 without any), kept until the index changes."""
        coords, cached = self.coords, self.__dict__.get("_reach_cache")
        if cached is None or cached[0] is not coords or cached[1] != coords._version:
            top = coords.norm(dim=1).max() if coords.numel() else coords.new_zeros(())
            cached = self._reach_cache = (coords, coords._version, top)
        return cached[2]

    def _matches(self, q: Float[Tensor, "n d"], k: int) -> Float[Tensor, "n k"]:
        """The k best matches of unit-norm standardised queries (see the module docstring)."""
        best = q.new_full((q.shape[0], k), float("-inf"))
        for scores in self._scores(q):
            if k == 1:                     # the forward's case: a max, not a top-k
                best = torch.maximum(best, scores.amax(1, keepdim=True))
            else:
                best = torch.cat([best, scores], 1).topk(k, dim=1).values
        return best

    def _scores(self, q: Float[Tensor, "n d"]):
        """Blocks of match scores, in chunks: the fitted entries in the index, then the edits' by cosine."""
        n_fit, q_r = int(self.n_fit), q @ self.basis.to(q).T
        for start in range(0, n_fit, self.chunk):
            yield q_r @ self.coords[start:min(start + self.chunk, n_fit)].to(q).T
        for start in range(n_fit, len(self), self.chunk):
            yield q @ self.keys[start:start + self.chunk].to(q).T

    def retrieve(self, q: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """Top-K cosine similarities and indices of unit-norm standardised queries q: exact, the fitted
        entries shortlisted through the index (see the module docstring), in blocks of queries."""
        k, n_fit = min(self.top_k, len(self)), int(self.n_fit)
        if not len(self.basis) or not len(q):
            return self._scan(q, k)
        found = []
        for block in q.split(max(1, self.chunk * 256 // len(self))):
            q_r = block @ self.basis.T
            near = q_r @ self.coords.T                                          # [m, n_fit]
            spread = (block - q_r @ self.basis).norm(dim=1, keepdim=True) * self.residual + SLACK
            edits = block @ self.keys[n_fit:].T                                 # exact, [m, n_edits]
            floor = torch.cat([near - spread, edits], 1).topk(k, dim=1).values[:, -1:]
            short = (near + spread >= floor).any(0).nonzero().squeeze(1)        # every possible top-K entry
            if len(short) > n_fit // 2:                                         # no cheaper than all of them
                found.append(self._scan(block, k))
                continue
            sims, pos = torch.cat([block @ self.keys[short].T, edits], 1).topk(k, dim=1)
            rows = torch.cat([short, torch.arange(n_fit, len(self), device=q.device)])
            found.append((sims, rows[pos]))
        return torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])

    def _scan(self, q: Float[Tensor, "n d"], k: int) -> tuple[Float[Tensor, "n k"], Tensor]:
        """Top-k of q against every entry, in chunks of the memory (linear in its size)."""
        best_s = q.new_full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, len(self), self.chunk):
            sims = q @ self.keys[start:start + self.chunk].to(q).T
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + start], 1).gather(1, order)
        return best_s, best_i

    def forward(self, h_attn: Float[Tensor, "b t d"], x: Float[Tensor, "b t d"]) -> Float[Tensor, "b t d"]:
        if len(self) == 0:
            return h_attn
        shape, dtype = h_attn.shape, h_attn.dtype
        x_std = self.spaces.standardize(x.reshape(-1, shape[-1]).float())
        q = F.normalize(x_std, dim=-1)
        n = q.shape[0]
        if self.min_similarity > -1:
            relevant = self._relevant(q).to(q.dtype)
        else:                          # no gate (not calibrated): every token is relevant
            relevant = q.new_ones(n)
        rows = relevant.nonzero().squeeze(1) if self.prune else torch.arange(n, device=q.device)
        self.retrieved = (len(rows), n)
        with torch.no_grad():
            idx = self.retrieve(q[rows])[1].sort(1).values   # ascending: one summation order for any batch
        sims = torch.einsum("md,mkd->mk", q[rows], self.keys.to(q)[idx])    # differentiable in x when training
        weights = torch.softmax(sims / self.temperature, dim=-1)
        h_state = self.state(weights, self.values, idx, rows, n)
        enc_know = h_state.index_copy(0, rows, self.spaces.sem(self.spaces.standardize(h_state[rows])))
        alpha = self.alpha(enc_know, x_std, relevant)
        h_know = self.know(weights, self.attn_values, idx, rows, n)
        a = alpha[:, None]
        shifted = (1 - a) * h_attn.reshape(-1, shape[-1]).float() + a * h_know
        return shifted.reshape(shape).to(dtype)
