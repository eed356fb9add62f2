"""Vanilla in-context knowledge editing (IKE): edits kept as text demonstrations, the most similar ones
written in front of each prompt.

`rewrite(prompt)` returns the prompt the edited model sees: the k stored demonstrations
"<question> <target>" most similar to the prompt, least similar first (the best one right before the
question), then the prompt, joined by `sep` (default " ; ", the tiny model's demonstration separator: a
word in its vocabulary, where a newline would vanish in its whitespace tokenizer). The rewritten text
goes through `prompting.encode` as the user's text, so the demonstrations land inside the user turn
(after the image, where the chat template puts it). Similarity: cosine of the mean input embedding of the
tokens (the model's own embedding table, no forward pass, independent of any edit made by an inner method).
`unike.evaluate` applies `rewrite` to every probe when scoring the edited model (never for the unedited
predictions); to query by hand:
`unike.answer(ike.model, ike.processor, image, ike.rewrite(prompt))`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.case import EditCase
from ..prompting import tokenizer_of


class PromptIKE:
    """In-context editing with `k` retrieved demonstrations (default 4); `inner` (e.g. an intrinsic-only
    `UniKE`) also receives every fit / edit / reset / disabled / detach (paper Table 4 row 3)."""

    def __init__(self, model: nn.Module, processor, *, k: int = 4, inner=None, sep: str = " ; "):
        if processor is None:
            raise ValueError("PromptIKE writes the edits into the prompt text: it needs the model's processor")
        if k < 1:
            raise ValueError(f"k is the number of demonstrations per prompt and must be >= 1, not {k}")
        if inner is not None and inner.model is not model:
            raise ValueError("inner edits another model; build it on the same model as PromptIKE")
        self.model, self.processor, self.k, self.inner, self.sep = model, processor, k, inner, sep
        self.demos: list[str] = []
        self.keys = torch.zeros(0, model.get_input_embeddings().embedding_dim)
        self._enabled = True

    @property
    def n_edits(self) -> int:
        return len(self.demos)

    @torch.no_grad()
    def _embed(self, text: str) -> Tensor | None:
        """Mean input embedding of the text's tokens, or None when it has no token."""
        ids = tokenizer_of(self.processor)(text, add_special_tokens=False)["input_ids"]
        if not ids:
            return None
        table = self.model.get_input_embeddings()
        return table(torch.tensor(ids, device=table.weight.device)).float().mean(0).cpu()

    def rewrite(self, prompt: str) -> str:
        """The prompt with the k most similar demonstrations in front (unchanged while disabled or empty)."""
        key = self._embed(prompt) if self._enabled and self.demos else None
        if key is None:
            return prompt
        sims = F.cosine_similarity(self.keys, key[None], dim=-1)
        best = sims.topk(min(self.k, len(sims))).indices.flip(0).tolist()
        return self.sep.join([self.demos[i] for i in best] + [prompt])

    def fit(self, triplets=None, *, progress: bool = True) -> PromptIKE:
        """Nothing to fit for the demonstrations; fits `inner` if there is one."""
        if self.inner is not None:
            self.inner.fit(triplets, progress=progress)
        return self

    def edit(self, case: EditCase, *, progress: bool = False) -> dict[str, float]:
        """Store the edit as a demonstration (and edit `inner`)."""
        if not isinstance(case, EditCase):
            raise TypeError("PromptIKE keeps edits as text demonstrations: pass an EditCase (prompt and target "
                            f"strings), not {type(case).__name__}")
        key = self._embed(case.prompt)
        if key is None or not case.target.strip():
            raise ValueError(f"the edit needs a non-empty prompt and target, got {case.prompt!r} -> {case.target!r}")
        info = self.inner.edit(case, progress=progress) if self.inner is not None else {}
        self.demos.append(f"{case.prompt.strip()} {case.target.strip()}")
        self.keys = torch.cat([self.keys, key[None]])
        return info

    def reset(self) -> PromptIKE:
        """Drop every demonstration (and reset `inner`)."""
        if self.inner is not None:
            self.inner.reset()
        self.demos, self.keys = [], self.keys[:0]
        return self

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model: no demonstrations, `inner` disabled."""
        before, self._enabled = self._enabled, False
        try:
            with self.inner.disabled() if self.inner is not None else contextlib.nullcontext():
                yield self.model
        finally:
            self._enabled = before

    def detach(self) -> nn.Module:
        """Drop the demonstrations and detach `inner`: the model as it was."""
        if self.inner is not None:
            self.inner.detach()
        self.demos, self.keys = [], self.keys[:0]
        return self.model
