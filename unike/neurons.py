"""Intrinsic knowledge: extra key-value neurons in one layer's FFN (paper §3.2 Eq. 3 and 6, T-Patcher style).

    FFN_edit(q) = FFN(q) + act(q·K + b) · (V + β·ζ′)

Every edit adds `n` neurons (columns of K, entries of b, rows of V) and carries ζ′, the truthfulness
direction mapped to the hidden space (`Spaces.zeta_prime`, fixed at fit time; β scales it). All edits
of a layer live in one tensor each, so the cost of a forward pass does not grow with the number of
modules; with ReLU, only the edits whose neurons can fire in the batch are computed (`unike.reach`, an
exact speed-up). The neurons of the edit being trained are `pending` parameters; `commit()` freezes them
into the buffers.
"""
from __future__ import annotations

import torch
from einops import reduce, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .grow import append
from .reach import Reachable, kept

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Zeta(nn.Module):
    """β·ζ′ per edit, [edits, d]: a module so nnsight can read or steer (e.g. zero) it."""

    def forward(self, zeta: Float[Tensor, "e d"], beta: float) -> Float[Tensor, "e d"]:
        return beta * zeta


class NeuronPatch(Reachable, nn.Module):
    """One layer's added neurons, batched across edits."""

    def __init__(self, dim: int, n_per_edit: int = 10, act: str = "relu", beta: float = 1.0):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown neuron activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        self.n, self.beta = n_per_edit, beta
        self.activation = ACTIVATIONS[act]()
        self.zeta_term = Zeta()
        self.register_buffer("keys", torch.zeros(dim, 0))
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("values", torch.zeros(0, dim))
        self.register_buffer("zeta", torch.zeros(0, dim))     # ζ′ of each committed edit
        self.pending: nn.ParameterDict | None = None
        self.register_buffer("truth", torch.zeros(0))          # ζ′ [d] for new edits (set by fit; empty: none)

    @property
    def edits(self) -> int:
        return self.zeta.shape[0]

    def begin(self, keys: Float[Tensor, "d n"], bias: Float[Tensor, " n"]) -> None:
        """Start training a new edit's neurons from initial keys and biases (values start at zero)."""
        d = self.keys.shape[0]
        self.pending = nn.ParameterDict({
            "k": nn.Parameter(keys.clone().float()),
            "b": nn.Parameter(bias.clone().float()),
            "v": nn.Parameter(torch.zeros(keys.shape[1], d, device=keys.device)),
        })

    def pending_zeta(self) -> Float[Tensor, "1 d"]:
        """The new edit's ζ′: the fitted direction, or zeros where there is none."""
        if not self.truth.numel():
            return self.keys.new_zeros(1, self.keys.shape[0])
        return self.truth.to(self.keys)[None]

    @torch.no_grad()
    def commit(self) -> None:
        p = self.pending
        if p is None:
            return
        bound = self._kept_bound()           # before appending: an append marks the old buffers changed
        self.keys = torch.cat([self.keys, p["k"].detach()], 1)   # copied: q·K on a column view of a room
                                                                   # rounds otherwise than on the K `load` puts
        append(self, "bias", p["b"].detach())
        append(self, "values", p["v"].detach())
        append(self, "zeta", self.pending_zeta().detach())
        self._carry_bound(bound, p["k"].detach(), p["b"].detach())
        self.pending = None

    def discard(self) -> None:
        self.pending = None

    @torch.no_grad()
    def clear(self) -> None:
        d = self.keys.shape[0]
        self.keys, self.bias = self.keys.new_zeros(d, 0), self.bias.new_zeros(0)
        self.values, self.zeta = self.values.new_zeros(0, d), self.zeta.new_zeros(0, d)
        self.discard()

    def parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(K, b, V, ζ′) over committed and pending edits (concatenated: for reading, not the forward)."""
        if self.pending is None:
            return self.keys, self.bias, self.values, self.zeta
        p = self.pending
        return (torch.cat([self.keys, p["k"]], 1), torch.cat([self.bias, p["b"]]),
                torch.cat([self.values, p["v"]]), torch.cat([self.zeta, self.pending_zeta()]))

    def preactivation(self, q: Float[Tensor, "... d"]) -> Float[Tensor, "... N"]:
        keys, bias, _, _ = self.parts()
        return q.float() @ keys.to(q.device) + bias.to(q.device)

    def pending_preactivation(self, q: Float[Tensor, "... d"]) -> Float[Tensor, "... n"]:
        """q·K + b of the edit being trained only: its cost does not grow with the committed edits."""
        p = self.pending
        return q.float() @ p["k"].to(q.device) + p["b"].to(q.device)

    def forward(self, q: Float[Tensor, "... d"], gate: Bool[Tensor, "... e"] | None = None,
                held: dict | None = None) -> Float[Tensor, "... d"]:
        """The committed and the pending neurons run as two blocks, never concatenated: while an edit
        trains, the backward pass then reaches only its own n neurons and the committed edits that can
        fire in q (`reachable`), whatever the number committed. `gate`: where each committed edit may act
        (`unike.router`); the pending edit is never gated. `held`: the committed block's output of a call with
        the same q and gate, or an empty dict to keep this one's in (`EditedLayer._hold`)."""
        if self.keys.shape[1] == 0 and self.pending is None:
            return torch.zeros_like(q)
        dev, x = q.device, q.float()
        zeta = self.zeta.to(dev)
        if self.pending is not None:       # kept while the edit trains: not a copy of every ζ′ at each step
            zeta = kept(self, "_zeta_cache", (self.zeta, self.truth),
                        lambda: torch.cat([zeta, self.pending_zeta().to(dev)]))
        zeta = self.zeta_term(zeta, self.beta)                                  # [E (+1), d]
        e, out = self.edits, 0
        if held:
            out = held["out"]
        elif e and (self.pending is None or gate is None or len(self.let_through(gate))):
            reached = self.reachable(x, gate)
            gate = None if gate is None else gate.reshape(*x.shape[:-1], e).to(dev)
            # while an edit trains, no reachable edit adds an exact zero, left out (an edit's steps keep what
            # its gate lets through); outside, `activation` still runs on every neuron, for readers (nnsight)
            skip = self.pending is not None and reached is not None and not len(reached)
            out = 0 if skip else self._block(x, self.keys.to(dev), self.bias.to(dev), self.values.to(dev), zeta[:e],
                                             reached, gate)
            if held is not None and not (isinstance(out, Tensor) and out.requires_grad):
                held["out"] = out
        if self.pending is not None:
            p = self.pending
            out = out + self._block(x, p["k"], p["b"], p["v"], zeta[e:])
        return out.to(q.dtype) if isinstance(out, Tensor) else torch.zeros_like(q)

    def _block(self, x: Float[Tensor, "... d"], keys: Float[Tensor, "d N"], bias: Float[Tensor, " N"],
               values: Float[Tensor, "N d"], zeta: Float[Tensor, "E d"], edits: Int[Tensor, " e"] | None = None,
               gate: Bool[Tensor, "... E"] | None = None) -> Float[Tensor, "... d"]:
        """act(x·K + b)·V + (per-edit activation)·β ζ′ of one block, each edit's activations times its
        `gate`; given `edits`, only their neurons are computed. Outside training the others' pre-activation
        is set to 0, so `activation` still sees every neuron; while an edit trains it sees the computed ones
        only, so that no step's forward or backward holds a tensor as wide as all the committed neurons."""
        if edits is None:
            a = self.activation(x @ keys + bias)                                # [..., N]
        else:
            cols, keys_e, bias_e, values_e = self._gathered(keys, bias, values, edits)
            pre = x @ keys_e + bias_e                                           # [..., e*n]
            if self.pending is None:
                a = self.activation(pre.new_zeros(*pre.shape[:-1], keys.shape[1]).index_copy(-1, cols, pre))[..., cols]
            else:
                a = self.activation(pre)
            values, zeta = values_e, zeta[edits]
            gate = None if gate is None else gate[..., edits]
        if gate is not None:
            a = a * repeat(gate, "... e -> ... (e n)", n=self.n).to(a.dtype)
        return a @ values + reduce(a, "... (e n) -> ... e", "sum", n=self.n) @ zeta
