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

Relevance gate. Most tokens (image patches, words inside a question) are about no stored question;
they get α = 0 and their attention output back unchanged. A token is relevant when its best match reaches
the gate `min_similarity`, set by `calibrate` to a quantile of ordinary prompt tokens' best matches. The
matches and the top-K are computed exactly through an index of the fitted keys (`unike.shortlist`), so a
forward costs about r numbers per fitted entry and relevant token, not d; only relevant tokens retrieve.
`prune = False` (or `UniKE.full_retrieval()`) makes every token retrieve without changing which are
relevant, e.g. to read or steer α where the gate is shut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .shortlist import Index
from .spaces import Spaces


class Knowledge(nn.Module):
    """A softmax-weighted sum of retrieved rows, zero for tokens that retrieved nothing; a module so
    nnsight can read or steer h_know."""

    def forward(self, weights: Float[Tensor, "m k"], table: Float[Tensor, "N d"], idx: Int[Tensor, "m k"],
                rows: Int[Tensor, " m"], n: int) -> Float[Tensor, "n d"]:
        out = weights.new_zeros(n, table.shape[1])
        return out.index_copy(0, rows, torch.einsum("mk,mkd->md", weights, table.to(weights)[idx]))


class Alpha(nn.Module):
    """α per token: clamp(cos(Enc_sem(h_know), x), 0, 1) (or a fixed value), and 0 where the token is not
    relevant (its best match is below the gate)."""

    def __init__(self, fixed: float | None = None):
        super().__init__()
        self.fixed = fixed

    def forward(self, enc_know: Float[Tensor, "n d"], x_std: Float[Tensor, "n d"],
                relevant: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
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
        self.top_k, self.temperature, self.index_rank = top_k, temperature, index_rank
        self.know = Knowledge()        # h_know, attention-output space (the shift)
        self.state = Knowledge()       # the retrieved states Σ w h_pos (input of the semantic encoder)
        self.alpha = Alpha(fixed_alpha)
        self.register_buffer("keys", torch.zeros(0, dim))      # standardised, unit-norm h_sem
        self.register_buffer("values", torch.zeros(0, dim))    # raw h_pos
        self.register_buffer("attn_values", torch.zeros(0, dim))  # Attn(h_pos, h_pos, h_pos)
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))  # first n_fit entries come from fit()
        self.register_buffer("min_similarity", torch.tensor(-1.0))       # relevance gate (calibrate())
        self.index = Index(dim, chunk)      # the fitted keys' index (exact speed-ups of the searches)
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
            self.index.extend(keys)
        self.keys = torch.cat([self.keys, keys])
        self.values = torch.cat([self.values, h_pos.float().to(self.values)])
        self.attn_values = torch.cat([self.attn_values, v_pos.float().to(self.attn_values)])

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        """Keep the first n entries (n = n_fit drops the edits' entries; 0 empties the memory)."""
        self.keys, self.values = self.keys[:n].clone(), self.values[:n].clone()
        self.attn_values = self.attn_values[:n].clone()
        self.n_fit.clamp_(max=n)
        self.index.truncate(n)

    @torch.no_grad()
    def reindex(self) -> None:
        """Build the index of the fitted entries."""
        self.index.build(self.keys[:int(self.n_fit)], self.index_rank)

    @torch.no_grad()
    def calibrate(self, h_sem: Float[Tensor, "n d"], other: Float[Tensor, "m d"],
                  quantile: float | None) -> float | None:
        """Index the fitted entries and set the relevance gate: a token whose best match is below the
        `quantile` of the best matches of ordinary prompt tokens (`other`) is not relevant (α = 0).
        Question-final states (`h_sem`, matched without their own entry) should pass; the fraction that
        does is returned."""
        self.reindex()
        if quantile is None or len(other) == 0:
            self.min_similarity.fill_(-1.0)
            return None
        dev = self.keys.device         # fit collects states on the CPU; the memory may live on a GPU
        self.min_similarity.fill_(float(torch.quantile(self.relevance(other.to(dev)), quantile)))
        loo = self.index.matches(self._unit(h_sem.to(dev)), 2, self.keys, int(self.n_fit))[:, -1]
        return float((loo >= self.min_similarity).float().mean())

    def _unit(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return F.normalize(self.spaces.standardize(x.float()), dim=-1)

    def nearest(self, x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """What pre-attention states x retrieve: their top-K cosines and memory indices (entry i < n_fit is
        the i-th fit triplet, later entries are the edits' in order)."""
        return self.retrieve(self._unit(x))

    def retrieve(self, q: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """Exact top-K cosines and indices of unit-norm standardised queries q."""
        return self.index.retrieve(q, min(self.top_k, len(self)), self.keys, int(self.n_fit))

    @torch.no_grad()
    def relevance(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """Pre-attention states' best match (in the index for fitted entries, by cosine for the edits'),
        the number the relevance gate `min_similarity` compares."""
        return self.index.matches(self._unit(x), 1, self.keys, int(self.n_fit))[:, 0]

    def forward(self, h_attn: Float[Tensor, "b t d"], x: Float[Tensor, "b t d"]) -> Float[Tensor, "b t d"]:
        if len(self) == 0:
            return h_attn
        shape, dtype = h_attn.shape, h_attn.dtype
        x_std = self.spaces.standardize(x.reshape(-1, shape[-1]).float())
        q = F.normalize(x_std, dim=-1)
        n = q.shape[0]
        if self.min_similarity > -1:
            relevant = self.index.relevant(q, self.keys, int(self.n_fit), self.min_similarity).to(q.dtype)
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
