"""The router's plumbing: each forward pass's gate g_e, computed at the first edited layer's input, and
the prompts' image codes, taken from the image tokens where a call has them and kept with its KV cache for
the generated tokens (a cached generate step sees one token), so cached and uncached generation agree."""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers.cache_utils import Cache

from .collect import tokens
from .hooks import Hooks
from .layer import Switch, follow
from .reach import kept
from .roles import image_mask
from .router import EditRouter, image_codes, yield_to
from .subject import named, occurred


class Pending(NamedTuple):
    """The edit being trained, as the router will hold it: its states at the target positions, its image
    code, its image radius, and the earlier edits it updates (`EditRouter.precede`)."""

    targets: Float[Tensor, "p d"]
    image: Float[Tensor, " d"] | None
    radius: float | None
    updates: Int[Tensor, " u"]
    subject: Int[Tensor, " s"] | None = None


class Scope:
    """Sets `switch.gate` from `router` at every forward of the first edited block."""

    def __init__(self, router: EditRouter, switch: Switch, image_token: int | None):
        self.router, self.switch, self.image_token = router, switch, image_token
        self.call: tuple = (None, None)                  # (input_ids, KV cache) of the current call
        self.images = weakref.WeakKeyDictionary()       # a KV cache -> its prompts' image codes
        self.words = weakref.WeakKeyDictionary()        # a KV cache -> which edits' subjects its prompts held
        self.pending: Pending | None = None     # the edit being trained
        self.holding = False                # while the pending edit trains: keep the last call's gates
        self.held: tuple | None = None      # (input_ids, x, gate, pending gate) of that call

    def attach(self, model: nn.Module, block: nn.Module, hooks: Hooks) -> None:
        hooks.pre(block, self._gate, with_kwargs=True)
        hooks.pre(model, self._record_call, with_kwargs=True)

    def detach(self) -> None:
        self.call, self.switch.gate = (None, None), None

    def _record_call(self, module, args, kwargs):
        cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)   # `cache` or `past_key_values`
        self.call = (kwargs.get("input_ids", args[0] if args else None), cache)

    def _gate(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ids, held = self.call[0], self.held
        if held is not None and _same(ids, held[0]) and _same(x, held[1]):
            self.switch.gate, self.switch.pending = held[2:]    # the same call again: the same gates
            self.switch.repeat = True
            return
        self.switch.repeat = False
        gate, pending = self.route(x), self.pending_gate(x)
        if gate is not None and pending is not None and len(self.pending.updates):   # the edits it updates yield
            olds = self.pending.updates.to(gate.device)
            gate = yield_to(gate, olds, pending[..., None].expand(*pending.shape, len(olds)))
        self.switch.gate, self.switch.pending = gate, pending
        if self.holding:
            self.held = (ids, x.detach().clone(), self.switch.gate, self.switch.pending)
            self.switch.held = {} if self.switch.config.replay else None   # and the first edited layer's

    def hold(self, pending: Pending) -> None:
        """While the edit `pending` trains, its steps repeat one call, whose first edited layer's input no
        edit moves: a forward whose input_ids and input there equal the last one's reuses its gates, and that
        layer what the committed edits did there (`EditedLayer._hold`)."""
        self.pending, self.holding = pending, True

    def release(self) -> None:
        self.pending, self.holding, self.held = None, False, None
        self.switch.held, self.switch.repeat = None, False

    def route(self, x: Float[Tensor, "b t d"]) -> Bool[Tensor, "b t e"] | None:
        """g_e at every position of x (the first edited layer's input), or None where nothing is gated."""
        cfg = self.switch.config
        if not (self.switch.enabled and cfg.route and (cfg.intrinsic or cfg.latent) and self.router.edits):
            return None
        image, has = self.image_codes(x)
        subjects = self.router.subject            # whether any edit has one: kept until an edit is added
        any_subject = kept(self.router, "_subject_cache", (subjects,), lambda: bool((subjects >= 0).any()))
        holds = self.holds(x, subjects, keep=True) if any_subject else None
        return follow(self.router, x)(x, image, has, holds)

    def pending_gate(self, x: Float[Tensor, "b t d"]) -> Bool[Tensor, "b t"] | None:
        """The gate the edit being trained will get once committed (`EditRouter.reaches` at every position of
        x), so that its memory entry opens during training where it will open after; None when no edit is
        being trained or routing is off."""
        cfg = self.switch.config
        if self.pending is None or not (self.switch.enabled and cfg.route):
            return None
        codes, has = self.image_codes(x)
        b, t = x.shape[:2]
        z = self.router.standardize(x.reshape(b * t, -1))
        if codes is None or not len(self.router.image_mean):
            codes = has = None                      # no image test (as `EditRouter.forward`)
        else:                          # the prompts' mean image states, as the router's codes, for each position
            codes, has = self.router.image_code(codes).repeat_interleave(t, 0), has.repeat_interleave(t, 0)
        p = self.pending
        holds = None if p.subject is None else self.holds(x, p.subject[None])
        return self.router.reaches(p.targets, p.image, z, codes, has, p.radius,
                                   None if holds is None else holds.reshape(b * t)).reshape(b, t)

    def holds(self, x: Float[Tensor, "b t d"], subjects: Int[Tensor, "k w"],
              keep: bool = False) -> Bool[Tensor, "b t k"] | None:
        """Whether every word of each of `subjects` (`unike.subject`; none: held everywhere) has occurred in
        the prompts up to each position of x; with `keep`, what occurred is carried with the KV cache for
        the generated tokens. None where the model does not run input_ids' tokens as they are."""
        ids, cache = self.call
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] > x.shape[1]:
            return None
        words = subjects.flatten()
        before = self.words.get(cache) if keep and cache is not None else None
        if before is not None and before.shape != (len(ids), len(words)):
            before = None
        seen = occurred(ids, words, before)
        if keep and cache is not None:
            self.words[cache] = seen[:, -1]
        prefix = seen.new_zeros(len(ids), x.shape[1] - ids.shape[1], len(words))   # what the model prepends
        return named(torch.cat([prefix, seen], 1), subjects)

    def image_codes(self, x: Float[Tensor, "b t d"]) -> tuple[Tensor | None, Tensor | None]:
        """The prompts' image codes and which prompts have one; (None, None) where the model does not mark
        image tokens in input_ids (it is then routed on the question alone)."""
        ids, cache = self.call
        if self.image_token is None or not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] > x.shape[1]:
            return None, None       # no image marks, or a model that does not run input_ids' tokens as they are
        mask = image_mask(ids, self.image_token)
        if mask.any():
            codes = image_codes(tokens(x, {"input_ids": ids}), mask.to(x.device))
            if cache is not None:
                self.images[cache] = codes
            return codes
        if cache is not None and cache in self.images:
            return self.images[cache]
        return x.new_zeros(len(ids), x.shape[-1]).float(), torch.zeros(len(ids), dtype=torch.bool, device=x.device)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
