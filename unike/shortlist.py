"""Exact speed-ups of the latent memory's retrieval (`LatentMemory.index`): the same top-K and relevance,
computed without touching most of the fitted keys.

The index holds the top r principal directions of the fitted keys (`basis`, unit-norm standardised
states) and every fitted key's coordinates in them (`coords`). A query's match with fitted entry i is
measured in the index as q_r · k_r,i, its cosine less what lies outside; the edits' entries, few and not
part of the basis, are matched by exact cosine. A query's fitted matches are at most |q_r|·max|k_r|, so
where that is below the relevance gate the index is not scanned for it.

Retrieval is an exact top-K, shortlisted through the same index. With ρ_i = |k_i − k_r,i·basis|, what
of a fitted key lies outside the index (`residual`), and q⊥ likewise for the query,

    q · k_i = q_r · k_r,i + q⊥ · k⊥,i   lies within   q_r · k_r,i ± |q⊥| ρ_i,

so an entry whose upper bound is below the K-th best lower bound (the edits' entries count exactly)
cannot be in the top K. Exact cosines are computed only for the others, and for every entry when the
shortlist would not be much shorter than the memory.
"""
from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .reach import kept

SLACK = 1e-4   # float rounding in the bounds (cosines of unit vectors, computed in fp32)


class Index(nn.Module):
    """The fitted keys' principal directions and coordinates, and the searches that use them. Every
    method takes the memory's unit-norm keys [N, d], of which the first `n_fit` are the fitted ones."""

    def __init__(self, dim: int, chunk: int = 16384):
        super().__init__()
        self.chunk = chunk
        self.register_buffer("basis", torch.zeros(0, dim))     # [r, d] principal directions ...
        self.register_buffer("coords", torch.zeros(0, 0))      # ... and the fitted keys in them, [n_fit, r]
        self.register_buffer("residual", torch.zeros(0))       # |what of each fitted key is outside|, [n_fit]

    @torch.no_grad()
    def build(self, fitted: Float[Tensor, "n d"], rank: int) -> None:
        """The top `rank` right singular vectors of the fitted keys (`torch.svd_lowrank`, seeded: a randomized
        range finder with two power iterations) and every fitted key's coordinates in them."""
        r = min(rank, *fitted.shape)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if fitted.is_cuda else []):
            torch.manual_seed(0)                              # the range finder's random probe
            self.basis = torch.svd_lowrank(fitted, q=min(r + 8, *fitted.shape), niter=2)[2][:, :r].T.contiguous()
        self.coords, self.residual = self.project(fitted)

    def project(self, keys: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n r"], Float[Tensor, " n"]]:
        """Unit keys' coordinates in the index and the norm of what lies outside it."""
        coords = keys @ self.basis.T
        return coords, (keys - coords @ self.basis).norm(dim=1)

    @torch.no_grad()
    def extend(self, keys: Float[Tensor, "n d"]) -> None:
        """Place more fitted keys in the index as it is."""
        if len(self.basis):
            coords, residual = self.project(keys)
            self.coords, self.residual = torch.cat([self.coords, coords]), torch.cat([self.residual, residual])

    @torch.no_grad()
    def truncate(self, n: int) -> None:
        self.coords, self.residual = self.coords[:n].clone(), self.residual[:n].clone()

    @torch.no_grad()
    def relevant(self, q: Float[Tensor, "m d"], keys: Float[Tensor, "N d"], n_fit: int,
                 gate: Tensor) -> Bool[Tensor, " m"]:
        """Whether each query's best match reaches the gate. Its fitted matches are at most
        |q_r|·max_i |k_r,i|; where that is below the gate they are not computed, only the edits' cosines (on
        the mid-size bench config that spares about 85% of the tokens the index scan)."""
        best = q.new_full(q.shape[:1], float("-inf"))
        coords = self.coords              # max_i |k_r,i| (0 without fitted entries), kept until the index changes
        reach = kept(self, "_reach_cache", (coords,),
                     lambda: coords.norm(dim=1).max() if coords.numel() else coords.new_zeros(()))
        scan = (q @ self.basis.T).norm(dim=1) * reach + SLACK >= gate
        if scan.any():
            best[scan] = self.matches(q[scan], 1, keys, n_fit)[:, 0]
        if len(keys) > n_fit and not scan.all():
            best[~scan] = (q[~scan] @ keys[n_fit:].T).amax(1)
        return best >= gate

    def matches(self, q: Float[Tensor, "m d"], k: int, keys: Float[Tensor, "N d"], n_fit: int) -> Float[Tensor, "m k"]:
        """The k best matches of unit-norm standardised queries: fitted entries in the index, edits' by cosine."""
        best = q.new_full((q.shape[0], k), float("-inf"))
        for scores in self._scores(q, keys, n_fit):
            if k == 1:                     # the forward's case: a max, not a top-k
                best = torch.maximum(best, scores.amax(1, keepdim=True))
            else:
                best = torch.cat([best, scores], 1).topk(k, dim=1).values
        return best

    def _scores(self, q: Float[Tensor, "m d"], keys: Float[Tensor, "N d"], n_fit: int):
        """Blocks of match scores, in chunks: the fitted entries in the index, then the edits' by cosine."""
        q_r = q @ self.basis.to(q).T
        for start in range(0, n_fit, self.chunk):
            yield q_r @ self.coords[start:min(start + self.chunk, n_fit)].to(q).T
        for start in range(n_fit, len(keys), self.chunk):
            yield q @ keys[start:start + self.chunk].to(q).T

    def retrieve(self, q: Float[Tensor, "m d"], k: int, keys: Float[Tensor, "N d"],
                 n_fit: int) -> tuple[Float[Tensor, "m k"], Int[Tensor, "m k"]]:
        """Top-k cosines and indices of unit-norm queries: exact, the fitted entries shortlisted through
        the index, in blocks of queries."""
        if not len(self.basis) or not len(q):
            return self.scan(q, k, keys)
        found = []
        for block in q.split(max(1, self.chunk * 256 // len(keys))):
            q_r = block @ self.basis.T
            near = q_r @ self.coords.T                                          # [m, n_fit]
            spread = (block - q_r @ self.basis).norm(dim=1, keepdim=True) * self.residual + SLACK
            edits = block @ keys[n_fit:].T                                      # exact, [m, n_edits]
            floor = torch.cat([near - spread, edits], 1).topk(k, dim=1).values[:, -1:]
            short = (near + spread >= floor).any(0).nonzero().squeeze(1)        # every possible top-K entry
            if len(short) > n_fit // 2:                                         # no cheaper than all of them
                found.append(self.scan(block, k, keys))
                continue
            sims, pos = torch.cat([block @ keys[short].T, edits], 1).topk(k, dim=1)
            rows = torch.cat([short, torch.arange(n_fit, len(keys), device=q.device)])
            found.append((sims, rows[pos]))
        return torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])

    def scan(self, q: Float[Tensor, "m d"], k: int, keys: Float[Tensor, "N d"]) -> tuple[Tensor, Tensor]:
        """Top-k of q against every key, in chunks of the memory (linear in its size)."""
        best_s = q.new_full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, len(keys), self.chunk):
            sims = q @ keys[start:start + self.chunk].to(q).T
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + start], 1).gather(1, order)
        return best_s, best_i
