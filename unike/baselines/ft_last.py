"""FT-L: fine-tune the last decoder layer's FFN on the edit's target (the base model otherwise frozen)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..inputs import edit_inputs
from ..locate import locate
from ..prompting import IGNORE
from ..training import answer_logits, only_trainable


class FTLast:
    """Fine-tuning of `locate(model)[-1].mlp`: Adam at `lr` on the cross-entropy of the target tokens for
    at most `steps` steps, stopping as soon as every target token is the argmax. Edits accumulate
    (sequential editing continues from the current weights); the original FFN weights are kept, so
    `reset`/`detach` restore them exactly and `disabled()` swaps them in for a while."""

    def __init__(self, model: nn.Module, processor=None, *, lr: float = 1e-3, steps: int = 30,
                 layers_path: str | None = None):
        if lr <= 0 or steps < 1:
            raise ValueError(f"FTLast needs lr > 0 and steps >= 1, not lr={lr}, steps={steps}")
        self.model, self.processor, self.lr, self.steps = model, processor, lr, steps
        self.stack = locate(model, layers=layers_path)
        self.params = dict(self.stack[-1].mlp.named_parameters())
        self.original: dict[str, Tensor] | None = {n: p.detach().clone() for n, p in self.params.items()}
        self.n_edits = 0

    def _check_attached(self) -> None:
        if self.original is None:
            raise RuntimeError("this FTLast was detached; build a new FTLast(model, processor) to edit again")

    @torch.no_grad()
    def _load(self, weights: dict[str, Tensor]) -> None:
        for n, p in self.params.items():
            p.copy_(weights[n])

    def fit(self, triplets=None, *, progress: bool = True) -> FTLast:
        """Nothing to fit: FT-L needs no data beyond the edit."""
        return self

    def edit(self, item, *, progress: bool = False) -> dict[str, float]:
        """Fine-tune on one fact: an EditCase or an HF inputs dict with labels."""
        self._check_attached()
        inputs = edit_inputs(self.model, self.processor, item, self.stack.text_config)
        labels = inputs.pop("labels")
        tgt = labels[:, 1:]
        mask = tgt != IGNORE
        opt = torch.optim.Adam(self.params.values(), lr=self.lr)
        step, loss = 0, torch.zeros(())
        with only_trainable(self.model, self.params.values()), torch.enable_grad():
            for step in tqdm(range(self.steps + 1), desc="edit", disable=not progress):
                logits = answer_logits(self.model, inputs, labels)
                loss = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE)
                if step == self.steps or bool((logits.argmax(-1)[mask] == tgt[mask]).all()):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.n_edits += 1
        return {"steps": step, "loss": loss.item()}

    def reset(self) -> FTLast:
        """Drop every edit: the original FFN weights, bit for bit."""
        self._check_attached()
        self._load(self.original)
        self.n_edits = 0
        return self

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model: the original FFN weights inside this block, the edited ones after."""
        self._check_attached()
        edited = {n: p.detach().clone() for n, p in self.params.items()}
        self._load(self.original)
        try:
            yield self.model
        finally:
            self._load(edited)

    def detach(self) -> nn.Module:
        """Restore the original weights and let go of the model (bit-identical to before)."""
        if self.original is not None:
            self.reset()
            self.original = None
        return self.model
