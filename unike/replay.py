"""An exact speed-up of an edit's training steps: what no trainable tensor reaches is computed once.

The steps of one edit repeat one call on one batch (`Scope.hold`). Every module that finishes before the
first edited block starts (the decoder blocks below it, a vision tower and its projector, the embeddings)
then returns the same output at every step. `Replay` runs the first step in full, keeps the outputs of
those modules, and hands them back at the later steps instead of running them: a step costs the edited
blocks and what follows them. The first edited block's input is checked to be the recorded one at every
replayed step.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .anatomy import get_path
from .hooks import Hooks


class ReplayError(RuntimeError):
    """A replayed step's input to the first edited block differs from the recorded one (a bug)."""


class Replay:
    """The modules of `model` that may run before `first` (the first edited block): the children off the
    path from the root to the decoder's layer list `layers_path`, and `below`, the decoder blocks under
    `first`. Those that ran before `first` in the first step are replayed. Call it for a context manager
    around one edit's training steps."""

    def __init__(self, model: nn.Module, layers_path: str, first: nn.Module, below: list[nn.Module]):
        self.model, self.first = model, first
        off, parent = [], model
        for part in layers_path.split("."):                 # the root's children, then each ancestor's
            if parent is None:
                break
            off += [m for name, m in parent.named_children() if name != part]
            parent = get_path(parent, part)
        self.candidates = list(dict.fromkeys(off + below))   # in order, each once
        self.replayed = 0                                     # how many modules the last use replayed

    @contextlib.contextmanager
    def __call__(self):
        """Inside: the first forward of `model` records, the later ones replay; nothing is replayed while the
        model is in training mode (dropout draws other outputs at every step)."""
        if self.model.training:
            self.replayed = 0
            yield
            return
        kept: dict[nn.Module, list] = {m: [] for m in self.candidates}
        late: set[nn.Module] = set()
        state = {"started": False, "x": None, "replaying": False, "calls": {}}
        patched: dict[nn.Module, object] = {}

        def begin(module, args, kwargs):          # each forward of the model
            state["started"], state["calls"] = False, dict.fromkeys(patched, 0)

        def reached(module, args, kwargs):        # the first edited block starts
            x = args[0] if args else kwargs["hidden_states"]
            if not state["replaying"]:
                state["started"], state["x"] = True, x
            elif not (x.shape == state["x"].shape and torch.equal(x, state["x"])):
                raise ReplayError("a replayed training step gave the first edited block another input than the "
                                  "first step (the edit was rolled back); edit with UniKEConfig(replay=False), "
                                  "which runs every step in full, and please report this model")

        def keep(module, args, output):
            if state["replaying"]:
                return
            if state["started"]:
                late.add(module)
            else:
                kept[module].append(_shallow(output))

        def recorded(module, args, kwargs, output):   # after the first forward: patch what ran before `first`
            if state["replaying"]:
                return
            state["replaying"] = True
            for m in self.candidates if state["started"] else ():   # `first` ran: the rest came before it
                if kept[m] and m not in late:
                    patched[m] = m.__dict__.get("forward")
                    m.forward = self._replayer(m, kept[m], state)

        with Hooks() as hooks:
            hooks.pre(self.model, begin, with_kwargs=True)
            hooks.pre(self.first, reached, with_kwargs=True)
            hooks.forward(self.model, recorded, with_kwargs=True)
            for m in self.candidates:
                hooks.forward(m, keep)
            try:
                yield
            finally:
                self.replayed = len(patched)
                for m, forward in patched.items():
                    del m.forward
                    if forward is not None:
                        m.forward = forward

    @staticmethod
    def _replayer(module: nn.Module, outputs: list, state: dict):
        run = module.forward

        def forward(*args, **kwargs):
            i = state["calls"].get(module, 0)
            state["calls"][module] = i + 1
            return _shallow(outputs[i]) if i < len(outputs) else run(*args, **kwargs)
        return forward


def _shallow(output):
    """A new container around the same tensors: a caller may set a field of the output it gets (GLM-4V
    splits its vision output's `pooler_output` in place)."""
    return output if isinstance(output, (torch.Tensor, tuple)) else copy.copy(output)
