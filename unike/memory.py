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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .spaces import Spaces


class Knowledge(nn.Module):
    """A softmax-weighted sum of retrieved rows; a module so nnsight can read or steer h_know."""

    def forward(self, weights: Float[Tensor, "n k"], values: Float[Tensor, "n k d"]) -> Float[Tensor, "n d"]:
        return torch.einsum("nk,nkd->nd", weights, values)


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

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def add(self, h_sem: Float[Tensor, "n d"], h_pos: Float[Tensor, "n d"], v_pos: Float[Tensor, "n d"]) -> None:
        keys = F.normalize(self.spaces.standardize(h_sem.float()), dim=-1)
        self.keys = torch.cat([self.keys, keys.to(self.keys)])
        self.values = torch.cat([self.values, h_pos.float().to(self.values)])
        self.attn_values = torch.cat([self.attn_values, v_pos.float().to(self.attn_values)])

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        """Keep the first n entries (drop the edits' entries)."""
        self.keys, self.values = self.keys[:n].clone(), self.values[:n].clone()
        self.attn_values = self.attn_values[:n].clone()

    @torch.no_grad()
    def calibrate(self, h_sem: Float[Tensor, "n d"], other: Float[Tensor, "m d"], quantile: float | None) -> None:
        """Set the relevance gate: a token whose best retrieval cosine is below the `quantile` of the
        best cosines of ordinary prompt tokens (`other`) gets α = 0. Question-final states (`h_sem`,
        scored without their own entry) should pass; the fraction that does is returned."""
        if quantile is None or len(other) == 0:
            self.min_similarity.fill_(-1.0)
            return None
        self.min_similarity.fill_(float(torch.quantile(self.nearest(other)[0][:, 0], quantile)))
        best = self.nearest(h_sem)[0]
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

    def forward(self, h_attn: Float[Tensor, "b t d"], x: Float[Tensor, "b t d"]) -> Float[Tensor, "b t d"]:
        if len(self) == 0:
            return h_attn
        shape, dtype = h_attn.shape, h_attn.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        sims, idx = self.nearest(x2)
        x_std = self.spaces.standardize(x2)
        weights = torch.softmax(sims / self.temperature, dim=-1)
        h_state = self.state(weights, self.values.to(x2)[idx])
        relevant = (sims[:, 0] >= self.min_similarity).to(x_std)
        alpha = self.alpha(self.spaces.sem(self.spaces.standardize(h_state)), x_std, relevant)
        h_know = self.know(weights, self.attn_values.to(x2)[idx])
        a = alpha[:, None]
        shifted = (1 - a) * h_attn.reshape(-1, shape[-1]).float() + a * h_know
        return shifted.reshape(shape).to(dtype)
