"""An exact speed-up of the neurons (`NeuronPatch`): with ReLU, only the committed edits whose neurons can
fire somewhere in the batch are computed, and their neurons' copies are kept between the steps of an edit.
An edit left out adds an exact zero and passes no gradient, so outputs are those of the full formula.
"""
from __future__ import annotations

import torch
from einops import rearrange, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn


def kept(owner, name: str, tensors: tuple[Tensor, ...], make, edits: Tensor | None = None):
    """make(), kept in `owner.<name>` until one of `tensors` is replaced or changed in place (its
    `_version`), or `edits` differ: what the exact speed-ups derive from tensors that rarely change."""
    cached = owner.__dict__.get(name)
    if not _fresh(cached, tensors) or (edits is not None and not torch.equal(cached[2], edits)):
        cached = owner.__dict__[name] = (tensors, _versions(tensors), edits, make())
    return cached[3]


def still_kept(owner, name: str, tensors: tuple[Tensor, ...]):
    """What `kept` keeps in `owner.<name>` for these tensors unchanged, or None."""
    cached = owner.__dict__.get(name)
    return cached[3] if _fresh(cached, tensors) else None


def carry(owner, name: str, value: tuple[Tensor, ...] | None, tensors: tuple[Tensor, ...], more) -> None:
    """Keep `value` (what was kept for the tensors before `tensors` extended them along the last dim) joined
    with more(), made from what was appended only, for `tensors`: so `commit` costs one edit."""
    if value is not None:
        joined = tuple(torch.cat([a, b], -1) for a, b in zip(value, more()))
        owner.__dict__[name] = (tensors, _versions(tensors), None, joined)


def _versions(tensors: tuple[Tensor, ...]) -> tuple[int, ...]:
    """In-place changes of each tensor; an inference tensor (made under `torch.inference_mode`, e.g. one
    forward's gate) has no counter and counts as unchanged: it can only be changed inside that mode."""
    return tuple(-1 if t.is_inference() else t._version for t in tensors)


def _fresh(cached, tensors: tuple[Tensor, ...]) -> bool:
    """Whether a `kept` entry was made from these very tensors, none of them changed in place since."""
    return (cached is not None and all(a is b for a, b in zip(cached[0], tensors))
            and cached[1] == _versions(tensors))


class Reachable:
    """Mixed into `NeuronPatch` (keys [d, E·n], bias [E·n], values [E·n, d], n neurons per edit)."""

    @torch.no_grad()
    def reachable(self, x: Float[Tensor, "... d"],
                  gate: Bool[Tensor, "... E"] | None = None) -> Int[Tensor, " e"] | None:
        """The committed edits with a neuron that may fire somewhere in x (and, given `gate`, that are let
        through somewhere); None when that is all of them (or the activation is not ReLU). By
        Cauchy–Schwarz every neuron j of edit e has

            x·k_j + b_j ≤ x·c_e + |x|·ρ_e + max_j b_j,   c_e the mean of its keys, ρ_e their largest distance to it,

        so an edit whose bound is ≤ 0 on every token adds an exact zero (ReLU) and passes no gradient. An
        edit's n neurons start from one or a few inputs, so ρ_e is small (0 for a one-token answer) and the
        bound costs 1/n of x·K."""
        if not isinstance(self.activation, nn.ReLU):
            return None
        x = x.reshape(-1, x.shape[-1])
        edits = (torch.arange(self.edits, device=x.device) if gate is None       # the gate first: the bound
                 else self.let_through(gate).to(x.device))                      # only where it lets through
        if not len(edits):
            return edits
        def gather():                 # kept while the gate lets the same edits through (an edit's steps)
            return tuple(t.to(x.device)[..., edits] for t in self._bound())
        centre, radius, top = kept(self, "_bound_gather", (self.keys, self.bias), gather, edits)
        upper = x @ centre + x.norm(dim=-1, keepdim=True) * radius + top
        edits = edits[(upper > 0).any(0)]
        return None if len(edits) == self.edits else edits

    def let_through(self, gate: Bool[Tensor, "... E"]) -> Int[Tensor, " e"]:
        """The edits `gate` lets through somewhere, kept for this very gate: an edit's steps share one."""
        return kept(self, "_through_cache", (gate,), lambda: gate.reshape(-1, gate.shape[-1]).any(0).nonzero()[:, 0])

    def _bound(self) -> tuple[Float[Tensor, "d E"], Float[Tensor, " E"], Float[Tensor, " E"]]:
        """(c_e, ρ_e, max_j b_j) of every committed edit, kept until the keys or biases change."""
        return kept(self, "_bound_cache", (self.keys, self.bias), lambda: self._bounds(self.keys, self.bias))

    def _bounds(self, keys: Float[Tensor, "d N"], bias: Float[Tensor, " N"]) -> tuple[Tensor, Tensor, Tensor]:
        per_edit = rearrange(keys.float(), "d (e n) -> d e n", n=self.n)
        centre = per_edit.mean(2)
        radius = (per_edit - centre[..., None]).norm(dim=0).amax(1) + 1e-4 * centre.norm(dim=0)  # + rounding
        return centre, radius, reduce(bias.float(), "(e n) -> e", "max", n=self.n)

    def _kept_bound(self) -> tuple[Tensor, Tensor, Tensor] | None:
        return still_kept(self, "_bound_cache", (self.keys, self.bias))

    def _carry_bound(self, bound: tuple | None, keys: Float[Tensor, "d n"], bias: Float[Tensor, " n"]) -> None:
        """After `commit` appended one edit's keys and bias: the bound kept before (`_kept_bound`) grows by
        that edit's own rather than being made anew over every edit at the next call."""
        carry(self, "_bound_cache", bound, (self.keys, self.bias), lambda: self._bounds(keys, bias))

    def _gathered(self, keys: Float[Tensor, "d N"], bias: Float[Tensor, " N"], values: Float[Tensor, "N d"],
                  edits: Int[Tensor, " e"]) -> tuple[Int[Tensor, " cols"], Tensor, Tensor, Tensor]:
        """(columns, K, b, V) of the given edits' neurons, kept while the edits and the tensors stay the same:
        between the steps of one edit the reachable set often does, and the copies are then made once."""
        def gather():
            cols = self.columns(edits)
            return cols, keys[:, cols], bias[cols], values[cols]
        return kept(self, "_gather_cache", (keys, bias, values), gather, edits)

    def columns(self, edits: Int[Tensor, " e"]) -> Int[Tensor, " cols"]:
        """The neuron columns of the given edits (each edit owns n consecutive ones)."""
        return (edits[:, None] * self.n + torch.arange(self.n, device=edits.device)).flatten()
