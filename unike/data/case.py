"""The records every editor and metric speaks: `EditCase` (MMEdit fields) and `Triplet`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

ImageLike = Any  # a PIL image, a path to one, or None


def load_image(image: ImageLike) -> Image.Image | None:
    """Open a path lazily; pass PIL images and None through."""
    if image is None or isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the image_root you passed")
    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass
class EditCase:
    """One edit and its probes, as in MMEdit (E-VQA / E-IC), plus two harder locality probes.

    `ci_*`: the edited image with a question about another fact of the same entity (must not change).
    `ri_*`: the edited question over another entity's image (must not change). Empty for MMEdit files.
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
    task: str = "vqa"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("EditCase.prompt is empty: give the question (or caption prompt) to edit")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("EditCase.target is empty: give the new answer the model should produce")

    def resolved(self) -> "EditCase":
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
