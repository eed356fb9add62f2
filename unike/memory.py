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

Relevance (ours), decided once per forward at the first edited layer, whose states no edit has moved,
and reused by the deeper ones (`Decision`, `decide`):
* an edit's entries are *open* at a token where the edit's scope lets it through (the router's g_e; for an
  edit not routed, e.g. one being trained: where its entry is the token's best match, fitted ones
  included, and reaches the gate). A token with open edits retrieves their entries only, weighted by
  their own softmax: the edit's knowledge is not drowned by the fitted entries, which hold the facts as
  they were;
* any other token retrieves its top-K fitted entries, those of facts an edit changed masked (`masked`,
  set by `mask`, cleared by `reset`), and is relevant when its best fitted match reaches the gate
  `min_similarity` (`calibrate`: a quantile of ordinary prompt tokens' best matches).
Dynamic α is 0 on tokens neither relevant nor open (their attention output comes back unchanged); a fixed
α (`fixed_alpha`, Fig. 4b; or no collaboration) is applied to every token as given. The matches and the
top-K are computed exactly through an index of the fitted keys (`unike.shortlist`), so a forward costs
about r numbers per fitted entry and relevant token, not d; only relevant tokens retrieve.
`prune = False` (or `UniKE.full_retrieval()`) makes every token retrieve without changing which are
relevant, e.g. to read or steer α where the gate is shut.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .grow import append
from .reach import kept
from .shortlist import Index
from .spaces import Spaces


class Knowledge(nn.Module):
    """A softmax-weighted sum of retrieved rows, zero for tokens that retrieved nothing; a module so
    nnsight can read or steer h_know."""

    def forward(self, weights: Float[Tensor, "m k"], table: Float[Tensor, "N d"], idx: Int[Tensor, "m k"],
                rows: Int[Tensor, " m"], n: int) -> Float[Tensor, "n d"]:
        out = weights.new_zeros(n, table.shape[1])
        return out.index_copy(0, rows, torch.einsum("mk,mkd->md", weights, table.to(weights)[idx]))


class Decision(NamedTuple):
    """Where the memory acts, decided at the first edited layer: `relevant` tokens (best fitted match at the
    gate), per token the edits whose entries are open there, and (once that layer's memory ran) α."""

    relevant: Bool[Tensor, " n"]
    open: Bool[Tensor, "n e"]
    alpha: Float[Tensor, " n"] | None = None


class Retrieval(NamedTuple):
    """What the tokens that retrieve (`rows`) retrieved: memory indices, which of them count, their
    similarity weights, and every token's α."""

    rows: Int[Tensor, " m"]
    idx: Int[Tensor, "m k"]
    use: Bool[Tensor, "m k"]
    weights: Float[Tensor, "m k"]
    alpha: Float[Tensor, " n"]


class Alpha(nn.Module):
    """α per token: clamp(cos(Enc_sem(h_know), x) / s, 0, 1), s the median cosine of the fit samples' own
    pairs (`scale`, set by `fit`); or α as decided at the first edited layer (`given`); or a fixed value.
    0 where `relevant` is 0 (for a fixed α: only where nothing was retrieved)."""

    def __init__(self, fixed: float | None = None):
        super().__init__()
        self.fixed = fixed
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, enc_know: Float[Tensor, "n d"], x_std: Float[Tensor, "n d"], relevant: Float[Tensor, " n"],
                given: Float[Tensor, " n"] | None = None) -> Float[Tensor, " n"]:
        if self.fixed is not None:
            alpha = enc_know.new_full(enc_know.shape[:1], float(self.fixed))
        elif given is not None:
            alpha = given.to(enc_know)
        else:
            alpha = (F.cosine_similarity(enc_know, x_std, dim=-1) / self.scale).clamp(0, 1)
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
        # the layer's own key and value of h_pos at position 0, every key head's side by side (`unike.reading`;
        # width 0 where the attention module does not dispatch through transformers' AttentionInterface)
        self.register_buffer("head_keys", torch.zeros(0, 0))
        self.register_buffer("head_values", torch.zeros(0, 0))
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))  # first n_fit entries come from fit()
        self.register_buffer("owner", torch.zeros(0, dtype=torch.long))   # the edit of each later entry
        self.register_buffer("masked", torch.zeros(0, dtype=torch.bool))  # fitted entries of facts edits changed
        self.register_buffer("min_similarity", torch.tensor(-1.0))       # relevance gate (calibrate())
        self.index = Index(dim, chunk)      # the fitted keys' index (exact speed-ups of the searches)
        self.prune = True              # only relevant tokens retrieve (the others' α is 0 either way)
        self.retrieved = (0, 0)        # (tokens that retrieved, tokens) in the last forward
        self.last_alpha: Tensor | None = None   # α of the last forward (the first edited layer's is shared)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def edits(self) -> int:
        """How many edits own entries (the last owner + 1)."""
        return int(self.owner.max()) + 1 if len(self.owner) else 0

    @torch.no_grad()
    def add(self, h_sem: Float[Tensor, "n d"], h_pos: Float[Tensor, "n d"], v_pos: Float[Tensor, "n d"],
            fitted: bool = False, edit: int | None = None,
            heads: tuple[Float[Tensor, "n c"], Float[Tensor, "n c"]] | None = None) -> None:
        """Append entries: edit number `edit`'s (default: the next), or (`fitted`) more fitted ones, placed in
        the index as it is; `heads`: their keys and values in the layer's attention heads (or none)."""
        width = self.head_keys.shape[1]
        if heads is None or (len(self) and not width):          # a memory without them stays without
            if heads is None and len(self) and width:
                raise ValueError("this memory keeps its entries' head keys and values: pass heads=(keys, values)")
            heads = (h_sem.new_zeros(len(h_sem), 0),) * 2
        elif len(self) and heads[0].shape[1] != width:
            raise ValueError(f"head keys of width {heads[0].shape[1]} for a memory whose entries have {width}")
        keys = F.normalize(self.spaces.standardize(h_sem.float()), dim=-1).to(self.keys)
        if fitted:
            if len(self) != int(self.n_fit):
                raise RuntimeError("fitted entries go before the edits' entries: reset() the editor first")
            self.n_fit += len(keys)
            self.index.extend(keys)
            append(self, "masked", self.masked.new_zeros(len(keys)))
        else:
            edit = self.edits if edit is None else edit
            append(self, "owner", self.owner.new_full((len(keys),), edit))
        append(self, "keys", keys)
        append(self, "values", h_pos.float())
        append(self, "attn_values", v_pos.float())
        if self.head_keys.shape[1] != heads[0].shape[1]:       # an empty memory takes the width it is given
            self.head_keys = self.head_values = self.keys.new_zeros(0, heads[0].shape[1])
        append(self, "head_keys", heads[0].float())
        append(self, "head_values", heads[1].float())

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        """Keep the first n entries (n = n_fit drops the edits' entries and their masks; 0 empties the memory)."""
        self.keys, self.values = self.keys[:n].clone(), self.values[:n].clone()
        self.attn_values = self.attn_values[:n].clone()
        self.head_keys, self.head_values = self.head_keys[:n].clone(), self.head_values[:n].clone()
        self.n_fit.clamp_(max=n)
        self.owner = self.owner[:max(0, n - int(self.n_fit))].clone()
        if n <= int(self.n_fit):
            self.masked = self.masked.new_zeros(int(self.n_fit))
        self.index.truncate(n)

    @torch.no_grad()
    def mask(self, rows: Int[Tensor, " m"]) -> None:
        """Leave fitted entries `rows` (facts an edit changed) out of retrieval until `truncate`/`reset`."""
        self.masked = self.masked.index_fill(0, rows.to(self.masked.device), True)

    @torch.no_grad()
    def reindex(self) -> None:
        """Build the index of the fitted entries."""
        self.index.build(self.keys[:int(self.n_fit)], self.index_rank)

    @torch.no_grad()
    def scale_alpha(self, h_sem: Float[Tensor, "n d"], h_pos: Float[Tensor, "n d"]) -> float:
        """Set α's scale: the median cos(Enc_sem(h_pos,i), h_sem,i) of the fit samples' own pairs. The
        contrastive loss fixes the ranking of these cosines, not their size (0.4–0.56 on the tiny model),
        so a token about its retrieved knowledge gets α ≈ 1, as about its own sample."""
        sp = self.spaces
        own = F.cosine_similarity(sp.sem(sp.standardize(h_pos.float())), sp.standardize(h_sem.float()), dim=-1)
        self.alpha.scale.fill_(float(own.median().clamp_min(1e-3)))
        return float(self.alpha.scale)

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
        loo = self.index.matches(self.unit(h_sem.to(dev)), 2, self.keys, int(self.n_fit))[:, -1]
        return float((loo >= self.min_similarity).float().mean())

    def unit(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """States standardised and normalised: what the memory matches."""
        return F.normalize(self.spaces.standardize(x.float()), dim=-1)

    def nearest(self, x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """What pre-attention states x retrieve: their top-K cosines and memory indices (entry i < n_fit is
        the i-th fit triplet, later entries are the edits' in order)."""
        return self.retrieve(self.unit(x))

    def retrieve(self, q: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Tensor]:
        """Exact top-K cosines and indices of unit-norm standardised queries q."""
        return self.index.retrieve(q, min(self.top_k, len(self)), self.keys, int(self.n_fit))

    def fitted_top(self, q: Float[Tensor, "n d"]) -> Int[Tensor, "n k"]:
        """The indices of the top-K unmasked fitted entries of unit-norm queries q (exact), ascending."""
        n_fit, n_masked = int(self.n_fit), int(self.masked.sum())
        k = min(self.top_k, n_fit - n_masked)
        sims, idx = self.index.retrieve(q, min(k + n_masked + len(self) - n_fit, len(self)), self.keys, n_fit)
        out = (idx >= n_fit) | self.masked[idx.clamp(max=n_fit - 1)]
        return idx.gather(1, sims.masked_fill(out, float("-inf")).topk(k, dim=1).indices).sort(1).values

    @torch.no_grad()
    def decide(self, q: Float[Tensor, "n d"], gate: Bool[Tensor, "n e"] | None = None,
               pending: Bool[Tensor, " n"] | None = None, fitted: bool = True) -> Decision:
        """Where the memory acts, for unit-norm standardised queries q: relevant tokens (best fitted match at
        the gate; none unless `fitted`, `UniKEConfig.fitted_knowledge`) and open edits. `gate`: the router's
        g_e of the first `e` edits (theirs then); `pending`: the gate the next edit will get (while it is
        trained); any other edit is open where its entry is the best match and reaches the gate."""
        n_fit, limit = int(self.n_fit), self.min_similarity
        keys = self.keys[:n_fit]                                  # the fitted entries' keys
        if not fitted:
            relevant = torch.zeros(len(q), dtype=torch.bool, device=q.device)
        elif limit > -1:
            relevant = self.index.relevant(q, keys, n_fit, limit)
        else:
            relevant = torch.ones(len(q), dtype=torch.bool, device=q.device)
        routed = 0 if gate is None else gate.shape[1]
        opened = torch.zeros(len(q), max(self.edits, routed), dtype=torch.bool, device=q.device)
        if routed:
            opened[:, :routed] = gate.to(q.device)
        if pending is not None and opened.shape[1] > routed:
            opened[:, routed] = pending.to(q.device)
            routed += 1
        mine = self.owner >= routed                                 # the edits' entries not routed
        if mine.any():
            cos = q @ self.keys[n_fit:][mine].to(q).T
            near = (cos >= limit).any(1)
            if near.any() and n_fit:
                best = cos.new_full((len(q), 1), float("-inf"))
                best[near] = (self.index.matches(q[near], 1, keys, n_fit) if len(self.index.basis)
                              else (q[near] @ keys.to(q).T).amax(1, keepdim=True))     # not indexed yet
                cos = cos.masked_fill(cos < best, float("-inf"))
            hit = (cos >= limit).float() @ F.one_hot(self.owner[mine], opened.shape[1]).float().to(q)
            opened |= hit > 0
        return Decision(relevant, opened)

    @torch.no_grad()
    def relevance(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """Pre-attention states' best match (in the index for fitted entries, by cosine for the edits'),
        the number the relevance gate `min_similarity` compares."""
        return self.index.matches(self.unit(x), 1, self.keys, int(self.n_fit))[:, 0]

    def select(self, x: Float[Tensor, "n d"], decision: Decision | None = None) -> Retrieval:
        """What each token of x (pre-attention states) retrieves and its α; `decision`: where to act, decided at
        the first edited layer (None: decided here)."""
        x_std = self.spaces.standardize(x.float())
        q = F.normalize(x_std, dim=-1)
        n, n_fit = q.shape[0], int(self.n_fit)
        if decision is None or len(decision.relevant) != n:
            decision = self.decide(q)
        every = not self.prune or self.alpha.fixed is not None           # a fixed α acts on every token
        acts, rows, fit_rows, cols, opened = self._acting(decision, every)
        self.retrieved = (len(rows), n)
        free = n_fit - int(self.masked.sum())                             # fitted entries not masked
        with torch.no_grad():          # columns: the top-K fitted entries, then the edits' entries open here
            top = q.new_zeros(len(rows), min(self.top_k, free), dtype=torch.long)
            if fit_rows.any():
                top[fit_rows] = self.fitted_top(q[rows][fit_rows])
            idx = torch.cat([top, (n_fit + cols).expand(len(rows), -1)], 1)
            use = torch.cat([fit_rows[:, None].expand_as(top), opened], 1)
        sims = torch.einsum("md,mkd->mk", q[rows], self.keys.to(q)[idx])    # differentiable in x when training
        weights = torch.softmax((sims / self.temperature).masked_fill(~use, -1e9), dim=-1)   # finite: no NaN grads
        weights = weights.masked_fill(~use.any(1, keepdim=True), 0.0)
        h_state = self.state(weights, self.values, idx, rows, n)
        enc_know = h_state.index_copy(0, rows, self.spaces.sem(self.spaces.standardize(h_state[rows])))
        got = torch.zeros_like(acts).index_copy(0, rows, use.any(1))       # tokens that retrieved something
        alpha = self.alpha(enc_know, x_std, (got if self.alpha.fixed is not None else got & acts).to(q.dtype),
                           decision.alpha)
        self.last_alpha = alpha.detach()
        return Retrieval(rows, idx, use, weights, alpha)

    def _acting(self, decision: Decision, every: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Where a decision has the memory act: (acting tokens [n], the rows computed (all of them if `every`),
        which of those take fitted entries, the edits' entries open at any, which rows each opens). Kept for
        this very decision (`kept`): an edit's steps and its deeper layers share the first layer's."""
        def make():
            n = len(decision.relevant)
            opened = (decision.open[:, self.owner] if decision.open.shape[1] >= self.edits
                      else decision.open.new_zeros(n, len(self.owner)))     # [n, edits' entries]
            on = opened.any(1)
            acts = decision.relevant | on
            rows = torch.arange(n, device=on.device) if every else acts.nonzero().squeeze(1)
            free = int(self.n_fit) - int(self.masked.sum())               # fitted entries not masked
            fit_rows = ~on[rows] if free else torch.zeros_like(rows, dtype=torch.bool)
            cols = opened[rows].any(0).nonzero().squeeze(1)     # (not all the edits': 1,000 edits × d per token)
            return acts, rows, fit_rows, cols, opened[rows][:, cols]
        return kept(self, "_acting_every_cache" if every else "_acting_cache",
                    (decision.open, decision.relevant, self.owner, self.masked), make)

    def forward(self, h_attn: Float[Tensor, "b t d"], x: Float[Tensor, "b t d"],
                decision: Decision | None = None) -> Float[Tensor, "b t d"]:
        """The shifted attention output (Eq. 7): (1 − α)·h_attn + α·Σ w v per token."""
        if len(self) == 0:
            return h_attn
        shape, dtype = h_attn.shape, h_attn.dtype
        r = self.select(x.reshape(-1, shape[-1]), decision)
        h_know = self.know(r.weights, self.attn_values, r.idx, r.rows, len(r.alpha))
        a = r.alpha[:, None]
        shifted = (1 - a) * h_attn.reshape(-1, shape[-1]).float() + a * h_know
        return shifted.reshape(shape).to(dtype)
