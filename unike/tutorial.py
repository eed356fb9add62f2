"""What the tutorial notebooks share: a model and data to edit (`setup`), an edit case's probes by name
(`probes`), and model inputs for one probe (`inputs`, `first_token`).

    from unike.tutorial import setup
    run = setup()                      # the shipped tiny VLM on the CPU, SynthWorld data
    run = setup("llava-hf/llava-1.5-7b-hf", dict(train=..., vqa=..., caption=..., images=...),
                dtype=torch.bfloat16)  # a Hugging Face VLM (device_map="auto") with MMEdit data
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .data.case import EditCase, Triplet, load_image
from .data.mmedit import load_mmedit
from .data.world import SynthWorld
from .metrics import probes as metric_probes
from .prompting import answer_tokens, encode, on_model
from .tiny import load_tiny

TASKS = ("vqa", "caption")
PROBE_NAMES = {   # metric (unike.metrics.probes) -> what the probe asks
    "rel": "the edit",
    "t_gen": "rephrased question",
    "m_gen": "another image of it",
    "port": "two-hop question",
    "ci_loc": "same image, other fact",
    "ri_loc": "other entity, same question",
    "m_loc": "unrelated image question",
    "t_loc": "unrelated text question",
}


@dataclass
class Setup:
    """A model, its processor and the data to fit and edit it with."""

    model: object
    processor: object
    world: SynthWorld | None                 # None with MMEdit data
    triplets: list[Triplet]                  # (image, question, right answer, wrong answer) to fit on
    cases: dict[str, list[EditCase]]         # edit cases per task ("vqa", "caption")
    held_out: list[Triplet] = field(default_factory=list)   # triplets not in `triplets`

    def __str__(self) -> str:
        counts = ", ".join(f"{len(v)} {task} cases" for task, v in self.cases.items())
        extra = f", {len(self.held_out)} held-out triplets" if self.held_out else ""
        return f"{type(self.model).__name__} on {self.model.device}, {len(self.triplets)} fit triplets, {counts}{extra}"


def load_model(model=None, device="cpu", dtype=None):
    """(model, processor): the shipped tiny VLM on `device` when `model` is None, else the Hugging Face
    checkpoint `model` (AutoModelForImageTextToText, placed by device_map="auto"), in eval mode."""
    if model is None:
        return load_tiny(device=device, dtype=dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, device_map="auto").eval()
    return loaded, AutoProcessor.from_pretrained(model)


def setup(model=None, data=None, device="cpu", dtype=None, n_triplets: int = 500, n_eval: int = 1,
          n_held_out: int = 0, seed: int = 3) -> Setup:
    """Load a model (`load_model`) and the data to edit it with.

    `data` None: `SynthWorld(seed=0)`, the world the tiny model was trained on; fit triplets are drawn
    with `seed`, held-out ones with `seed + 2`, edit cases with `seed + 8` (the defaults: 3, 5, 11).
    Else a dict of MMEdit files: `train` (its records' `alt` is the right answer and `pred` the model's
    wrong one: the paper's (Q_I, A_pos, A_neg) triplets), `vqa` and/or `caption` (edit cases) and
    `images` (their image root). The first `n_triplets` train triplets fit, the next `n_held_out` are
    held out; each task keeps its first `n_eval` cases.
    """
    loaded, processor = load_model(model, device, dtype)
    if data is None:
        world = SynthWorld(seed=0)
        triplets = world.triplets(n=n_triplets, seed=seed)
        held_out = world.triplets(n=n_held_out, seed=seed + 2) if n_held_out else []
        cases = {task: world.edit_cases(task, n=n_eval, seed=seed + 8) for task in TASKS}
        return Setup(loaded, processor, world, triplets, cases, held_out)
    pool = [Triplet(c.image, c.prompt, c.target, c.ground_truth)
            for c in load_mmedit(data["train"], data["images"]) if c.ground_truth]
    cases = {task: load_mmedit(data[task], data["images"])[:n_eval] for task in TASKS if task in data}
    return Setup(loaded, processor, None, pool[:n_triplets], cases, pool[n_triplets:n_triplets + n_held_out])


def probes(case: EditCase) -> dict[str, tuple]:
    """The probes `unike.evaluate` scores an edit on, as {what it asks: (image, prompt)}; the names are
    `PROBE_NAMES`'s, in its order (MMEdit cases lack the SynthWorld-only CI and RI probes)."""
    found = {p.metric: (p.image, p.prompt) for p in metric_probes(case)}
    return {name: found[metric] for metric, name in PROBE_NAMES.items() if metric in found}


def inputs(model, processor, image, prompt: str, answer: str | None = None) -> dict:
    """Model inputs for one (image, prompt), as `unike.answer` and `UniKE.edit` build them (the processor's
    chat template when it has one), on the model's device; with `answer`, `labels` mark its tokens."""
    return on_model(encode(processor, load_image(image), prompt, answer), model)


def first_token(processor, answer: str) -> int:
    """The id of the first token of `answer` as it follows a prompt (the token its probability is read at)."""
    return answer_tokens(processor, answer)[0]


__all__ = ["Setup", "setup", "load_model", "probes", "inputs", "first_token", "PROBE_NAMES"]
