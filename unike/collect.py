"""The base model's states at the edited layers: what `fit` stores and trains on, and what an edit starts
from. One forward pass with UniKE switched off, read by the layers' hooks; the attention-value trick gives
the value a knowledge token would carry (`Collector.attn_values`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data.case import EditCase, Triplet, load_image, missing_images
from .hooks import Hooks
from .layer import EditedLayer, Switch, first
from .locate import TextStack
from .prompting import IGNORE, answer_tokens, collate, encode, eos_id_of, on_model, pad_id_of, tokenizer_of
from .roles import answer_end_index, image_mask, last_index, last_prompt_index, target_positions
from .router import image_codes
from .subject import prompt_words


@dataclass
class FitStates:
    """The base model's states of the fit triplets, per edited layer (`UniKE.collect`), all on the CPU.

    `layers[l]` maps each key to a tensor: h_sem, h_pos, h_neg [n, d] (pre-attention states at the
    question's last token and at the final token of question + right / wrong answer), v_pos [n, d]
    (Attn(h_pos, h_pos, h_pos)), k_head, v_head [n, c] (the layer's key and value of h_pos per key head at
    position 0; c = 0 where the attention module does not dispatch through the AttentionInterface), q [n, d]
    (the FFN input at the question's last token), q_ans [m, d]
    (FFN inputs inside the answers and at their final token), other [o, d] (ordinary prompt tokens'
    pre-attention states, for the relevance gate) and q_other [p, d] (FFN inputs at every 7th image
    token, for `prompt_negatives`; empty unless the collecting editor's config sets it).
    img [n, d], has_img [n]: the mean state over each prompt's image tokens (zeros where it has none) and
    which prompts have them (for the router; at the first edited layer only, empty at the others).
    `questions`: the image questions (for image negatives); `words`: each row's prompt words
    (`unike.subject.prompt_words`, for the subject test of edits without an image).
    """

    KEYS = ("h_sem", "h_pos", "h_neg", "v_pos", "k_head", "v_head", "q", "q_ans", "other", "q_other", "img",
            "has_img")
    layers: dict[int, dict[str, Tensor]]
    questions: list[str] = field(default_factory=list)
    words: list[Tensor] = field(default_factory=list)
    trained: dict = field(default_factory=dict, repr=False)   # spaces trained on these states, per setting

    def __len__(self) -> int:
        return next(iter(self.layers.values()))["h_sem"].shape[0]

    def train_once(self, spaces: list[nn.Module], setting: tuple, train) -> list[dict[str, float]]:
        """The spaces' loss curve: `train()` them, or (seeded, so the same) load the weights trained on these
        states with the same `setting` before. Editors with other ablation switches then fit from one
        `collect` without training the encoders again."""
        if setting not in self.trained:
            losses = train()
            self.trained[setting] = ([{k: v.clone() for k, v in sp.state_dict().items()} for sp in spaces], losses)
            return losses
        weights, losses = self.trained[setting]
        for sp, w in zip(spaces, weights):
            sp.load_state_dict(w)
        return losses


@dataclass
class BatchStates:
    """One layer's base-model states of a batch with labels (fp32, on the model's device)."""

    x: Float[Tensor, "b t d"]        # pre-attention state at every position
    q: Float[Tensor, "b t d"]        # FFN input at every position
    h_sem: Float[Tensor, "b d"]      # x at the question's last token
    h_pos: Float[Tensor, "b d"]      # x at the answer's final token
    x_rms: Float[Tensor, ""]         # root mean square of x over the real tokens
    # the router's (i = b at the first edited layer, else 0): each row's mean x over its image tokens (zeros
    # where it has none) and which rows have image tokens
    img: Float[Tensor, "i d"]
    has_img: Bool[Tensor, " i"]

    @property
    def image(self) -> Float[Tensor, " d"] | None:
        """The mean image state of the rows that have one (an edit's image, for the router), or None."""
        return self.img[self.has_img].mean(0) if self.has_img.any() else None


def tokens(h: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """[B, T, d] states aligned with input_ids (flattened [B*T', d] unflattened; a prefix the model
    prepends inside, e.g. GIT's image features, dropped)."""
    b, t = inputs["input_ids"].shape
    return h.reshape(b, -1, h.shape[-1])[:, -t:]


class Collector:
    """Runs the unedited model and reads the edited layers' states."""

    def __init__(self, model: nn.Module, processor, stack: TextStack, layers: dict[int, EditedLayer],
                 switch: Switch, image_token: int | None):
        self.model, self.processor, self.stack, self.layers = model, processor, stack, layers
        self.switch, self.image_token = switch, image_token
        special = set(getattr(tokenizer_of(processor), "all_special_ids", None) or []) if processor else set()
        self.skip = torch.tensor(sorted(special | ({image_token} if image_token is not None else set())),
                                 dtype=torch.long)     # tokens that are no prompt's words (`unike.subject`)

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model: every UniKE component is bypassed inside this block."""
        before, self.switch.enabled = self.switch.enabled, False
        try:
            yield self.model
        finally:
            self.switch.enabled = before

    @torch.no_grad()
    def states(self, inputs: dict[str, Tensor]) -> dict[int, BatchStates]:
        """Base-model states of a batch with labels, per edited layer."""
        with self.disabled():
            self.model(**{k: v for k, v in inputs.items() if k != "labels"})
        sem = last_prompt_index(inputs["attention_mask"], inputs["labels"])
        fin = answer_end_index(inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                               eos_id_of(self.model, self.processor))
        rows = torch.arange(len(sem), device=sem.device)
        images = image_mask(inputs["input_ids"], self.image_token)
        out = {}
        for l, layer in self.layers.items():
            x = tokens(layer.x, inputs).float()
            # the router reads image codes at the first edited layer only; a model that does not run input_ids'
            # tokens as they are shows none
            marked = images if images.shape == x.shape[:2] else torch.zeros_like(x[..., 0], dtype=torch.bool)
            img, has = image_codes(x, marked) if l == min(self.layers) else (x[:0, 0], marked[:0, 0])
            out[l] = BatchStates(x=x, q=tokens(layer.q, inputs).float(), h_sem=x[rows, sem], h_pos=x[rows, fin],
                                 x_rms=x[inputs["attention_mask"].bool()].pow(2).mean().sqrt(), img=img,
                                 has_img=has)
        return out

    @torch.no_grad()
    def attn_values(self, l: int, h: Float[Tensor, "n d"], inputs: dict[str, Tensor],
                    ) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n c"], Float[Tensor, "n c"]]:
        """Attn(h, h, h) of layer l for each row's state h, and h's key and value in the layer's heads at
        position 0 (width 0 where the attention module does not dispatch through the AttentionInterface):
        `inputs` (one row per state) runs again with every position's state entering layer l set to that
        row's h. Attention then averages identical values, whatever its weights, positions or mask, so its
        output is o_proj(v_proj(norm(h))) — the value of a knowledge token — for any architecture, without
        knowing its projection names; `unike.reading` reads the key and value at the first position, where
        rotary embeddings are the identity."""
        block, attn, layer = self.stack[l].block, self.stack[l].attn, self.layers[l]
        out = []

        class Done(Exception):
            pass

        def put(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            hs = h.to(x).reshape(len(h), 1, -1).expand(len(h), x.numel() // (len(h) * x.shape[-1]), -1)
            hs = hs.reshape(x.shape)
            return ((hs,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hs})

        def take(module, args, output):
            o = first(output)
            out.append(o.reshape(len(h), -1, o.shape[-1])[:, -1].float())
            raise Done

        layer.captured = []
        try:
            with Hooks() as hooks, self.disabled():
                hooks.pre(block, put, with_kwargs=True, prepend=True)
                hooks.forward(attn, take, prepend=True)
                try:
                    self.model(**{k: v for k, v in inputs.items() if k != "labels"})
                except Done:
                    pass
            heads = layer.captured[0] if layer.captured else (h.new_zeros(len(h), 0),) * 2
        finally:
            layer.captured = None
        return out[0].to(h), heads[0].to(h), heads[1].to(h)

    def collect(self, pairs: Iterable[tuple[dict, dict]], prepare, *, prompt_negatives: bool,
                total: int | None = None, progress: bool = True) -> FitStates:
        """FitStates of batches of (question + right answer, question + wrong answer) inputs with labels
        (`prepare` turns a batch into the model's inputs); `prompt_negatives`: also keep FFN inputs at
        image tokens."""
        collected, words = {l: {k: [] for k in FitStates.KEYS} for l in self.layers}, []
        eos = eos_id_of(self.model, self.processor)
        for pos, neg in tqdm(pairs, total=total, desc="triplet states", disable=not progress):
            pos, neg = prepare(pos), prepare(neg)
            sem = last_prompt_index(pos["attention_mask"], pos["labels"])
            rows = torch.arange(len(sem), device=sem.device)
            other = pos["attention_mask"].bool() & (pos["labels"] == IGNORE)   # prompt tokens before the last
            other[rows, sem] = False
            inside = target_positions(pos["labels"])             # positions inside the answer that predict a token
            inside[rows, sem] = False
            inside[rows, answer_end_index(pos["input_ids"], pos["attention_mask"], pos["labels"], eos)] = True  # and
            # its end, which predicts the end of the answer: an edit must not fire there, or answers run on
            for l, st in self.states(pos).items():
                v_pos, k_head, v_head = self.attn_values(l, st.h_pos, pos)
                found = {"h_sem": st.h_sem, "h_pos": st.h_pos, "v_pos": v_pos, "k_head": k_head, "v_head": v_head,
                         "q": st.q[rows, sem], "q_ans": st.q[inside], "other": st.x[other][::7], "img": st.img,
                         "has_img": st.has_img}
                if prompt_negatives:                              # other images' patches
                    found["q_other"] = st.q[other & image_mask(pos["input_ids"], self.image_token)][::7]
                for k, v in found.items():
                    collected[l][k].append(v.cpu())
            for l, st in self.states(neg).items():
                collected[l]["h_neg"].append(st.h_pos.cpu())
            words += prompt_words(pos, self.skip)
        return FitStates({l: {k: torch.cat(v) if v else torch.zeros(0, self.stack.hidden_size)
                              for k, v in collected[l].items()} for l in self.layers}, words=words)

    @torch.no_grad()
    def image_negatives(self, case: EditCase, questions: list[str], n: int,
                        seed: int) -> tuple[dict[int, Float[Tensor, "n d"]], Float[Tensor, "n d"]] | None:
        """FFN inputs at the last token of n other fit `questions` asked over the edit's own image, per edited
        layer, and their states there at the first edited layer (for the router): the edit must not leak
        into the entity's other facts (paraphrases of the edited question are recognised as the same
        knowledge by `training.unrelated` and left out)."""
        if not (n and questions and case.image is not None and self.processor is not None):
            return None
        image = load_image(case.image)
        pool = [q for q in questions if q != case.prompt]
        picks = [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].tolist()]
        batch = on_model(collate([encode(self.processor, image, q) for q in picks], pad_id_of(self.processor)),
                         self.model)
        with self.disabled():
            self.model(**batch)
        last = last_index(batch["attention_mask"])
        rows = torch.arange(len(last), device=last.device)
        x = tokens(self.layers[min(self.layers)].x, batch)[rows, last].float()
        return {l: tokens(layer.q, batch)[rows, last].float() for l, layer in self.layers.items()}, x


def check_triplets(processor, triplets: list) -> None:
    """Every triplet is a Triplet whose answers tokenize and whose image exists, before any work."""
    for i, t in enumerate(triplets):
        if not isinstance(t, Triplet):
            raise TypeError(f"fit() takes unike.Triplet records; item {i} is a {type(t).__name__} "
                            "(for inputs dicts with labels, use fit_inputs)")
        try:
            answer_tokens(processor, t.right)
            answer_tokens(processor, t.wrong)
        except ValueError as err:
            raise ValueError(f"triplet {i}: {err}") from None
    missing = missing_images(t.image for t in triplets)
    if missing:
        raise FileNotFoundError(f"{len(missing)} triplet image(s) do not exist, e.g. {missing[:3]}")


def triplet_batches(processor, triplets: list, batch_size: int):
    """Batches of (question + right answer, question + wrong answer) inputs with labels, for `collect`."""
    pad = pad_id_of(processor)
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        images = [load_image(t.image) for t in chunk]
        yield tuple(collate([encode(processor, im, t.question, getattr(t, side)) for im, t in zip(images, chunk)],
                            pad, side="right") for side in ("right", "wrong"))
