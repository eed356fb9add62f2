"""Intrinsic knowledge: extra key-value neurons in one layer's FFN (paper §3.2 Eq. 3 and 6, T-Patcher style).

    FFN_edit(q) = FFN(q) + act(q·K + b) · (V + β·ζ′)

Every edit adds `n` neurons (columns of K, entries of b, rows of V) and one ζ′ = W_ζ ζ, its
truthfulness direction mapped to the hidden space. All edits of a layer live in one tensor each, so
the cost of a forward pass does not grow with the number of modules. The neurons of the edit being
trained are `pending` parameters; `commit()` freezes them into the buffers.
"""
from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Zeta(nn.Module):
    """β·ζ′ per edit, [edits, d]: a module so nnsight can read or steer (e.g. zero) it."""

    def forward(self, zeta: Float[Tensor, "e d"], beta: float) -> Float[Tensor, "e d"]:
        return beta * zeta


class NeuronPatch(nn.Module):
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
        self.w_zeta: nn.Linear | None = None
        self.register_buffer("truth", torch.zeros(0))          # ζ in the truthfulness space (set by fit)

    @property
    def edits(self) -> int:
        return self.zeta.shape[0]

    def begin(self, keys: Float[Tensor, "d n"], bias: Float[Tensor, "n"], use_zeta: bool) -> None:
        """Start training a new edit's neurons from initial keys and biases (values start at zero)."""
        d = self.keys.shape[0]
        self.pending = nn.ParameterDict({
            "k": nn.Parameter(keys.clone().float()),
            "b": nn.Parameter(bias.clone().float()),
            "v": nn.Parameter(torch.zeros(keys.shape[1], d, device=keys.device)),
        })
        self.w_zeta = nn.Linear(self.truth.numel(), d, bias=False).to(keys.device) if use_zeta and self.truth.numel() else None
        if self.w_zeta is not None:
            nn.init.zeros_(self.w_zeta.weight)

    def pending_zeta(self) -> Tensor:
        d = self.keys.shape[0]
        if self.w_zeta is None:
            return torch.zeros(1, d, device=self.keys.device)
        return self.w_zeta(self.truth.to(self.w_zeta.weight))[None]

    @torch.no_grad()
    def commit(self) -> None:
        p = self.pending
        if p is None:
            return
        self.keys = torch.cat([self.keys, p["k"].detach()], 1)
        self.bias = torch.cat([self.bias, p["b"].detach()])
        self.values = torch.cat([self.values, p["v"].detach()])
        self.zeta = torch.cat([self.zeta, self.pending_zeta().detach()])
        self.pending, self.w_zeta = None, None

    def discard(self) -> None:
        self.pending, self.w_zeta = None, None

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

    def forward(self, q: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """The committed and the pending neurons run as two blocks, never concatenated: while an edit
        trains, the backward pass then reaches only its own n neurons, whatever the number committed."""
        if self.keys.shape[1] == 0 and self.pending is None:
            return torch.zeros_like(q)
        dev, x = q.device, q.float()
        zeta = self.zeta.to(dev)
        if self.pending is not None:
            zeta = torch.cat([zeta, self.pending_zeta().to(dev)])
        zeta = self.zeta_term(zeta, self.beta)                                  # [E (+1), d]
        blocks = [(self.keys, self.bias, self.values)]
        if self.pending is not None:
            blocks.append((self.pending["k"], self.pending["b"], self.pending["v"]))
        out, start = 0, 0
        for i, (keys, bias, values) in enumerate(blocks):
            e = keys.shape[1] // self.n
            if e == 0:
                continue
            keys, bias, values, z = keys.to(dev), bias.to(dev), values.to(dev), zeta[start:start + e]
            start += e
            if i == 0 and self.pending is not None and x.requires_grad and isinstance(self.activation, nn.ReLU):
                keys, bias, values, z = self.firing(x, keys, bias, values, z)
                if keys.shape[1] == 0:
                    continue
            a = self.activation(x @ keys + bias)                                # [..., n_block]
            per_edit = a.unflatten(-1, (-1, self.n)).sum(-1)                    # [..., e_block]
            if not torch.is_grad_enabled() and isinstance(self.activation, nn.ReLU):
                # inference: an edit none of whose neurons fires on any token adds an exact zero; skip it
                fired = per_edit.reshape(-1, e).gt(0).any(0).nonzero().squeeze(1)
                if len(fired) < e / 2:
                    cols = self.columns(fired)
                    a, values, per_edit, z = a[..., cols], values[cols], per_edit[..., fired], z[fired]
            out = out + a @ values + per_edit @ z
        return out.to(q.dtype)

    def firing(self, x: Float[Tensor, "... d"], keys: Float[Tensor, "d N"], bias: Float[Tensor, "N"],
               values: Float[Tensor, "N d"], zeta: Float[Tensor, "E d"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The committed edits with a neuron that fires somewhere in x (ReLU: the others add an exact zero
        and pass no gradient). While an edit trains, the backward pass then runs through those few edits
        instead of every committed neuron."""
        with torch.no_grad():
            fires = (x.reshape(-1, x.shape[-1]) @ keys + bias > 0).any(0)           # [N]
            edits = fires.unflatten(0, (-1, self.n)).any(1).nonzero().squeeze(1)    # [e_fired]
        cols = self.columns(edits)
        return keys[:, cols], bias[cols], values[cols], zeta[edits]

    def columns(self, edits: Int[Tensor, "e"]) -> Int[Tensor, "e*n"]:
        """The neuron columns of the given edits (each edit owns n consecutive ones)."""
        return (edits[:, None] * self.n + torch.arange(self.n, device=edits.device)).flatten()
