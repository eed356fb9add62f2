"""The records every editor and metric speaks: `EditCase` (MMEdit fields) and `Triplet`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

ImageLike = Any  # a PIL image, a path to one, or None


def load_image(image: ImageLike) -> Image.Image | None:
    """Open a path lazily; pass PIL images and None through."""
    if image is None or isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image is a PIL image, a path to one, or None, not {type(image).__name__}; "
                        "convert arrays with PIL.Image.fromarray")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the image_root you passed")
    with Image.open(path) as im:
        return im.convert("RGB")


def missing_images(images) -> list[str]:
    """The paths among `images` that are not files (PIL images and None are never missing)."""
    return [str(i) for i in images if isinstance(i, (str, os.PathLike)) and not Path(i).is_file()]


def _require_text(record: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{record}.{name} is empty: give the {name} answer" if name != "question"
                             else f"{record}.question is empty: give the question")


@dataclass
class EditCase:
    """One edit and its probes, as in MMEdit (E-VQA / E-IC), plus two harder locality probes and a two-hop one.

    `ci_*`: the edited image with a question about another fact of the same entity (must not change).
    `ri_*`: the edited question over another entity's image (must not change).
    `port_*`: portability (VLKEB, MMKE-Bench): a two-hop question about the edited image whose answer
    follows from the edited fact ("the capital of this creature's country"); `port_answer` is the answer
    after the edit. Empty for MMEdit files and for cases without a two-hop question.
    """

    image: ImageLike
    prompt: str
    target: str
    ground_truth: str = ""
    rephrase_prompt: str = ""
    rephrase_image: ImageLike = None
    loc_prompt: str = ""
    loc_answer: str = ""
    mloc_image: ImageLike = None
    mloc_prompt: str = ""
    mloc_answer: str = ""
    ci_prompt: str = ""
    ci_answer: str = ""
    ri_image: ImageLike = None
    ri_answer: str = ""
    port_prompt: str = ""
    port_answer: str = ""
    task: str = "vqa"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("EditCase.prompt is empty: give the question (or caption prompt) to edit")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("EditCase.target is empty: give the new answer the model should produce")
        if self.image is None:      # a text-only edit: no probe may be about the edit's image
            needs = [name for name, given in (("task='caption'", self.task == "caption"),
                                              ("rephrase_image", self.rephrase_image is not None),
                                              ("ci_prompt", bool(self.ci_prompt)),
                                              ("port_prompt", bool(self.port_prompt)),
                                              ("ri_image", self.ri_image is not None)) if given]
            if needs:
                raise ValueError(f"EditCase.image is None, but {', '.join(needs)} needs the edit's image: "
                                 "give image=..., or drop those fields for a text-only edit")
        for prompt, answer in (("loc_prompt", "loc_answer"), ("mloc_prompt", "mloc_answer"),
                               ("ci_prompt", "ci_answer"), ("ri_image", "ri_answer"),
                               ("port_prompt", "port_answer")):
            if (getattr(self, prompt) not in (None, "")) and not str(getattr(self, answer)).strip():
                raise ValueError(f"EditCase.{prompt} is given without {answer}: give the probe's answer, "
                                 f"or drop {prompt}")

    def resolved(self) -> EditCase:
        """A copy whose image fields are PIL images (paths opened)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("image", "rephrase_image", "mloc_image", "ri_image"):
            kw[name] = load_image(kw[name])
        return EditCase(**kw)


@dataclass
class Triplet:
    """(image, question, right answer, wrong answer) for the latent memory and the contrastive spaces."""

    image: ImageLike
    question: str
    right: str
    wrong: str

    def __post_init__(self):
        _require_text("Triplet", question=self.question, right=self.right, wrong=self.wrong)
        if self.right.strip() == self.wrong.strip():
            raise ValueError(f"Triplet right and wrong answers are both {self.right!r}: the wrong answer must "
                             "differ (the truthfulness space contrasts them)")
