"""The subject test of an edit without an image (ours; docs/method.md, "Text-only edits").

An edit with an image is told apart from other knowledge by its image; one without has only its question
test, and a question-final state can hold the *answer* more than whom it is about (on the tiny model,
subjects of the same diet share it). So such an edit also keeps a *subject*: the word of its prompt found in
the fewest fit prompts its question test passes, then in the fewest fit prompts (a name, not "what" or
"eat"), and it opens only where that token has occurred in the prompt, as a rephrasing keeps it. Where
words tie (a fit set without prompts like the edit's sees neither "capital" nor "france"), the subject is
all of them, up to `WIDTH`, and every one must occur. Words are token ids, the prompt's own, with special
and image tokens left out; a subject is `WIDTH` ids, padded with -1 (all -1: none).
"""
from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .prompting import IGNORE

WIDTH = 4          # the most words a subject holds


def none(device=None) -> Int[Tensor, " s"]:
    """The subject of an edit that has none (an edit with an image): held everywhere."""
    return torch.full((WIDTH,), -1, dtype=torch.long, device=device)


def prompt_words(inputs: dict[str, Tensor], skip: Int[Tensor, " s"]) -> list[Int[Tensor, " w"]]:
    """Each row's distinct prompt token ids (not its answer's), those of `skip` left out."""
    ids = inputs["input_ids"]
    prompt = inputs["attention_mask"].bool() & (inputs["labels"] == IGNORE) & ~torch.isin(ids, skip.to(ids.device))
    return [row[keep].unique().cpu() for row, keep in zip(ids, prompt)]


def occurred(ids: Int[Tensor, "b t"], words: Int[Tensor, " k"],
             before: Bool[Tensor, "b k"] | None = None) -> Bool[Tensor, "b t k"]:
    """Whether each of `words` occurred at or before each position (or, per `before`, in an earlier call
    of the same generation)."""
    hit = ids[..., None] == words.to(ids.device)
    if before is not None:
        hit[:, 0] |= before.to(hit.device)
    return hit.cumsum(1) > 0


def named(seen: Bool[Tensor, "... k"], subjects: Int[Tensor, "e w"]) -> Bool[Tensor, "... e"]:
    """Per subject, whether the prompt named it: all its words seen (`occurred` over `subjects.flatten()`;
    -1 counts as seen)."""
    e, w = subjects.shape
    return (seen.unflatten(-1, (e, w)) | (subjects < 0).to(seen.device)).all(-1)


def rarest(words: Int[Tensor, " w"], negative_words: Int[Tensor, " m"], negative_rows: Int[Tensor, " m"],
           lookalike: Bool[Tensor, " n"]) -> Int[Tensor, " s"]:
    """The subject: the words found in the fewest `lookalike` fit prompts, then in the fewest fit prompts
    (their distinct words, flat, and the prompt of each), all that tie, up to `WIDTH`; none without words."""
    if not len(words) or not len(negative_words):
        return none()
    hit = negative_words[:, None] == words.to(negative_words.device)[None]        # [m, w]
    found = hit.sum(0)                                          # fit prompts holding each word (distinct words)
    among = (hit & lookalike.to(hit.device)[negative_rows][:, None]).sum(0)
    score = among * (len(lookalike) + 1) + found
    tied = words.to(score.device)[score == score.min()][:WIDTH].cpu()
    return torch.cat([tied, none()[len(tied):]])
