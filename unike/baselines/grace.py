"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of (key, value, ε, label) at one layer's MLP
down-projection, as EasyEdit runs it on VLMs (`replace_last`, cold values, Adam at lr 1.0 for 20 steps).

Deferral: at every position t, the down-projection's input q_t is the query; if its nearest key k_i (by
Euclidean distance) lies within ε_i, the layer's output at t is replaced by the value v_i. EasyEdit
replaces at the query token and, at each cached decoding step, queries the new token with its own
activation; we apply that per-position rule at every position, so a whole-sequence pass (no cache,
teacher forcing, padding) decides each position exactly as a cached step does. Each query is read
before its own replacement, and replacements only reach later layers, so keys never move.

Editing, with q = the query at the last prompt token and label = the target tokens: no key within
ε_init + ε_nearest → a new entry (q, random value, ε_init); a nearer key with the same label → its ε
grows to the distance; with another label → a new entry and both radii split to half the distance
(at distance 0, the same key, the entry is relabelled instead: a split would leave both radii empty).
Then the value of the entry that q falls in is trained on the target's cross-entropy.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..hooks import Hooks
from ..inputs import edit_inputs
from ..locate import locate
from ..prompting import IGNORE
from ..training import answer_logits, only_trainable


def _down_projection(mlp: nn.Module) -> nn.Module:
    """The last `nn.Linear` inside an FFN (the FFN itself for OPT's `fc2`)."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"found no nn.Linear inside {type(mlp).__name__}; pass GRACE(..., module='dotted.path') "
                         "of the down-projection to edit")
    return linears[-1]


class GRACE:
    """GRACE at `layer` (default: round(0.64·L), EasyEdit's 18 of 28 and 23 of 36 layers): `eps` is ε_init,
    `lr` / `steps` train each value; `module` (a dotted path) replaces the layer's down-projection."""

    def __init__(self, model: nn.Module, processor=None, *, layer: int | None = None, eps: float = 1.0,
                 lr: float = 1.0, steps: int = 20, module: str | None = None, layers_path: str | None = None):
        if eps <= 0 or lr <= 0 or steps < 1:
            raise ValueError(f"GRACE needs eps > 0, lr > 0 and steps >= 1, not eps={eps}, lr={lr}, steps={steps}")
        self.stack = locate(model, layers=layers_path)
        n = len(self.stack)
        layer = min(n - 1, round(0.64 * n)) if layer is None else layer
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} is outside the decoder's {n} layers; pick one in [{-n}, {n - 1}]")
        self.layer = layer % n
        self.module = model.get_submodule(module) if module else _down_projection(self.stack[self.layer].mlp)
        self.model, self.processor, self.eps_init, self.lr, self.steps = model, processor, eps, lr, steps
        self.keys = self.values = self.eps = None      # [N, d_in], [N, d_out], [N]: set by the first edit
        self.labels: list[tuple[int, ...]] = []         # the target token ids of each entry
        self._enabled, self._pending = True, None      # _pending: (entry, its value in training, key position)
        self.hooks: Hooks | None = Hooks()
        self.hooks.forward(self.module, self._defer)

    @property
    def n_edits(self) -> int:
        """Codebook entries (an edit that expands or relabels an entry adds none)."""
        return len(self.labels)

    def _check_attached(self) -> None:
        if self.hooks is None:
            raise RuntimeError("this GRACE was detached; build a new GRACE(model, processor) to edit again")

    def nearest(self, query: Float[Tensor, "n d_in"]) -> tuple[Float[Tensor, " n"], Tensor]:
        """Distance to the nearest key and its index, per query row (exact, float32)."""
        dist = torch.cdist(query.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        return dist.min(-1)

    def _defer(self, module, args, out):
        if not self._enabled or not self.labels:
            return None
        x = args[0].reshape(-1, args[0].shape[-1])
        dist, idx = self.nearest(x)
        hit = dist <= self.eps[idx]
        values = self.values
        if self._pending is not None:              # training: the key token takes the entry being trained
            i, v, at = self._pending
            hit[-at], idx[-at] = True, i
            values = values.index_put((torch.tensor([i], device=v.device),), v[None])
        if not hit.any():
            return None
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(hit[:, None], values[idx].to(out.dtype), flat).reshape(out.shape)

    def fit(self, triplets=None, *, progress: bool = True) -> GRACE:
        """Nothing to fit: GRACE needs no data beyond the edits."""
        return self

    @torch.no_grad()
    def _query(self, inputs: dict, at: int) -> tuple[Float[Tensor, " d_in"], int]:
        """The down-projection's input `at` positions from the end of the sequence, and its output width."""
        seen = []
        with Hooks() as h:
            h.forward(self.module, lambda mod, args, out: seen.append((args[0], out.shape[-1])))
            self.model(**inputs)
        x, width = seen[0]
        return x.reshape(-1, x.shape[-1])[-at].float(), width

    def _add(self, key: Tensor, value: Tensor, eps: float, label: tuple) -> int:
        self.keys, self.values = torch.cat([self.keys, key[None]]), torch.cat([self.values, value[None]])
        self.eps = torch.cat([self.eps, key.new_tensor([eps])])
        self.labels.append(label)
        return len(self.labels) - 1

    def _update(self, query: Tensor, label: tuple, value: Tensor) -> tuple[int, str]:
        """GRACE's codebook rules; the entry whose value trains, and which rule applied."""
        if not self.labels:
            return self._add(query, value, self.eps_init, label), "new"
        dist, i = (t.item() for t in self.nearest(query[None]))
        if dist > self.eps_init + self.eps[i]:
            return self._add(query, value, self.eps_init, label), "new"
        if label != self.labels[i]:
            if dist == 0:
                self.labels[i], self.values[i] = label, value
                return i, "relabel"
            self.eps[i] = dist / 2 - 1e-5
            return self._add(query, value, dist / 2, label), "split"
        if dist > self.eps[i]:
            self.eps[i] = dist
            return i, "expand"
        return i, "inside"

    def edit(self, item, *, progress: bool = False) -> dict:
        """One edit: an EditCase or an HF inputs dict with labels (one row). Returns the final loss, the
        codebook size and the rule applied (new, split, expand, relabel or inside)."""
        self._check_attached()
        inputs = edit_inputs(self.model, self.processor, item, self.stack.text_config)
        labels = inputs.pop("labels")
        if labels.shape[0] != 1:
            raise ValueError(f"GRACE edits one fact at a time (one key each): pass one row, not {labels.shape[0]}")
        answer = (labels[0] != IGNORE).nonzero()[:, 0]
        at = labels.shape[1] - int(answer[0]) + 1            # the last prompt token, from the end
        query, width = self._query(inputs, at)
        if not self.labels:
            self.keys, self.values, self.eps = (query.new_zeros(shape) for shape in ((0, len(query)), (0, width), 0))
        entry, rule = self._update(query, tuple(labels[0, answer].tolist()),
                                   torch.rand(width, device=query.device))        # EasyEdit's cold init
        value = nn.Parameter(self.values[entry].clone())
        self._pending, opt, tgt = (entry, value, at), torch.optim.Adam([value], lr=self.lr), labels[:, 1:]
        try:
            with only_trainable(self.model, []), torch.enable_grad():
                for step in tqdm(range(self.steps + 1), desc="edit", disable=not progress):
                    logits = answer_logits(self.model, inputs, labels)
                    loss = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE)
                    if step == self.steps:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            self._pending = None
            self.values[entry] = value.detach()
        return {"steps": self.steps, "loss": loss.item(), "keys": self.n_edits, "rule": rule}

    def reset(self) -> GRACE:
        """Drop every edit: an empty codebook."""
        self._check_attached()
        self.keys = self.values = self.eps = None
        self.labels = []
        return self

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model inside this block (the codebook is kept)."""
        self._check_attached()
        before, self._enabled = self._enabled, False
        try:
            yield self.model
        finally:
            self._enabled = before

    def detach(self) -> nn.Module:
        """Remove the hook and the codebook: the model as it was (GRACE changes no weight)."""
        if self.hooks is not None:
            self.reset()
            self.hooks.remove()
            self.hooks = None
        return self.model
