"""The UniKE editor: a thin facade over the edited layers (`unike.layer`). fit (latent memory + contrastive
spaces), edit, reset, disabled, detach, save, load.

Attaching adds, in each edited decoder layer, the submodules `unike_memory` and `unike_neurons` (and
`unike_router` in the first) and their hooks; `detach()` removes exactly those, so the model is
bit-identical to before. The algorithm lives beside: states in `collect`, an edit's neurons in `training`,
files in `persist`, the gate's plumbing in `scope`.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import persist
from .collect import BatchStates, Collector, FitStates, check_triplets, triplet_batches
from .config import UniKEConfig, edited_layers
from .data.case import EditCase, load_image
from .hooks import Hooks
from .inputs import edit_inputs
from .layer import EditedLayer, Edits
from .locate import LocateError, locate
from .metrics import Probe, generations
from .prompting import device_of, eos_id_of
from .replay import Replay
from .roles import image_token_id
from .scope import Pending, Scope
from .spaces import train_spaces
from .subject import prompt_words
from .training import targets, train_neurons, unrelated

SPACE_FIELDS = ("encoder_hidden", "truth_dim", "encoder_steps", "encoder_lr", "encoder_batch", "encoder_tau", "seed")


def atomic(spaces: bool):
    """Decorator: when the method raises (a bad input found late, out of memory, Ctrl-C), the editor is put
    back as it was before the call; `spaces`: the method may train the spaces (their weights are copied)."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            counters = (self.fitted, self.n_edits, self.fit_questions, list(self.asked))
            try:
                with self.edits.transaction(spaces):
                    return method(self, *args, **kwargs)
            except BaseException:
                self.fitted, self.n_edits, self.fit_questions, self.asked = counters
                raise
        return run
    return wrap


class UniKE:
    """UniKE on any HF (vision-)language model. See DESIGN.md for the public API."""

    def __init__(self, model: nn.Module, processor=None, config: UniKEConfig | None = None):
        self.model, self.processor = model, processor
        mcfg = getattr(model, "config", None)
        text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        if getattr(mcfg, "is_encoder_decoder", False) or getattr(text_cfg, "is_encoder_decoder", False):
            raise NotImplementedError(f"{type(model).__name__} is an encoder-decoder model: its answer lives in "
                                      "decoder_input_ids, which UniKE does not edit yet; use a decoder-only VLM")
        config = config or UniKEConfig()
        try:
            self.stack = locate(model, layers=config.layers_path)
        except LocateError as err:
            raise LocateError(f"{err}\nwith UniKE, pass that path as UniKEConfig(layers_path=...)") from None
        config, self.layer_ids = edited_layers(config, len(self.stack))
        torch.manual_seed(config.seed)
        self.edits = Edits(self.layer_ids, self.stack.hidden_size, config)
        image_token = image_token_id(model, processor)
        self.collector = Collector(model, processor, self.stack, self.layers, self.edits.switch, image_token)
        self.scope = Scope(self.router, self.edits.switch, image_token)
        self.fitted, self.n_edits, self._warned = False, 0, False
        self.fit_questions: list[str] = []      # image questions seen in fit (for image negatives)
        self.asked: list[list[str] | None] = []  # per edit: [question, the base model's answer] (for rivals)
        self.hooks = Hooks()
        for l, layer in self.layers.items():
            layer.attach(self.stack[l], self.hooks, self._extra(l))
        self.scope.attach(model, self.stack[self.layer_ids[0]].block, self.hooks)
        self.replay = Replay(model, self.stack.layers_path, self.stack[self.layer_ids[0]].block,
                             [layer.block for layer in self.stack[:self.layer_ids[0]]])

    # ----------------------------------------------------------------------------------------- parts
    @property
    def config(self) -> UniKEConfig:
        return self.edits.switch.config

    @config.setter
    def config(self, value: UniKEConfig) -> None:
        self.edits.switch.config = value
        r = self.router          # its thresholds follow the config (they were fixed when it was built)
        r.tau_question, r.tau_image, r.tau_image_max = value.route_question, value.route_image, value.route_image_max

    @property
    def layers(self) -> dict[int, EditedLayer]:
        return {int(l): layer for l, layer in self.edits.layers.items()}

    memory = property(lambda self: {l: ly.memory for l, ly in self.layers.items()}, doc="LatentMemory per layer")
    neurons = property(lambda self: {l: ly.neurons for l, ly in self.layers.items()}, doc="NeuronPatch per layer")
    spaces = property(lambda self: {l: ly.spaces for l, ly in self.layers.items()}, doc="Spaces per layer")

    @property
    def router(self):
        return self.edits.router

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    def _extra(self, l: int) -> dict[str, nn.Module]:
        return {"unike_router": self.router} if l == self.layer_ids[0] else {}

    def __repr__(self) -> str:
        state = "detached" if self.hooks is None else f"fitted={self.fitted}, edits={self.n_edits}"
        return f"UniKE({type(self.model).__name__}, layers={self.layer_ids}, {state})"

    def __enter__(self) -> UniKE:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model: every UniKE component is bypassed inside this block."""
        with self.collector.disabled() as model:
            yield model

    @contextlib.contextmanager
    def full_retrieval(self):
        """Every token retrieves its top-K inside this block, also where the relevance gate is shut (by
        default those tokens skip retrieval: α = 0 there either way, so outputs are the same, to float
        rounding). Use it to read h_know for every token or to steer α where the gate is shut."""
        before = {l: m.prune for l, m in self.memory.items()}
        for m in self.memory.values():
            m.prune = False
        try:
            yield self.model
        finally:
            for l, m in self.memory.items():
                m.prune = before[l]

    def _check_attached(self) -> None:
        if self.hooks is None:
            raise RuntimeError("this editor was detached; build a new UniKE(model, processor) to edit again")

    def _check_count(self, n: int) -> None:
        if n < self.config.min_triplets:
            raise ValueError(f"fit() got {n} triplets; it needs at least {self.config.min_triplets} "
                             "to train the contrastive spaces (the paper uses more than 15,000)")

    def _inputs(self, item) -> dict[str, Tensor]:
        return edit_inputs(self.model, self.processor, item, self.stack.text_config)

    # ----------------------------------------------------------------------------------------- fit
    def fit(self, triplets: Iterable, *, batch_size: int = 16, progress: bool = True) -> UniKE:
        """Build the latent memory from (image, question, right, wrong) triplets and train the spaces."""
        return self.fit_states(self.collect(triplets, batch_size=batch_size, progress=progress), progress=progress)

    def fit_inputs(self, pairs: Iterable[tuple[dict, dict]], *, total: int | None = None,
                   progress: bool = True) -> UniKE:
        """`fit` from batches of (question + right answer, question + wrong answer) inputs with labels."""
        return self.fit_states(self.collect_inputs(pairs, total=total, progress=progress), progress=progress)

    def collect(self, triplets: Iterable, *, batch_size: int = 16, progress: bool = True) -> FitStates:
        """The base model's states of the triplets at the edited layers: the first half of `fit`."""
        self._check_attached()
        triplets = list(triplets)
        self._check_count(len(triplets))
        if self.processor is None:
            raise ValueError("fit(triplets) needs a processor: UniKE(model, processor); without one, "
                             "call fit_inputs() with inputs dicts that carry labels")
        check_triplets(self.processor, triplets)
        states = self.collect_inputs(triplet_batches(self.processor, triplets, batch_size),
                                     total=-(-len(triplets) // batch_size), progress=progress)
        states.questions = sorted({t.question for t in triplets if t.image is not None})
        return states

    def collect_inputs(self, pairs: Iterable[tuple[dict, dict]], *, total: int | None = None,
                       progress: bool = True) -> FitStates:
        """`collect` from batches of (question + right answer, question + wrong answer) inputs with labels."""
        self._check_attached()
        states = self.collector.collect(pairs, self._inputs, prompt_negatives=bool(self.config.prompt_negatives),
                                        total=total, progress=progress)
        self._check_count(len(states))
        if states.layers[self.layer_ids[0]]["h_neg"].shape[0] != len(states):
            raise ValueError("fit_inputs() needs as many wrong-answer rows as right-answer rows")
        return states

    @atomic(spaces=True)
    def fit_states(self, states: FitStates, *, progress: bool = True) -> UniKE:
        """The second half of `fit`: the latent memory, the relevance gate and the negatives from collected
        states, and the contrastive spaces trained on them (loss curve in `self.losses`). Spaces trained
        on the same states with the same encoder settings are reused, so editors with other ablation
        switches fit from one `collect` without running the model or training the encoders again."""
        self._check_attached()
        if sorted(states.layers) != self.layer_ids:
            raise ValueError(f"the states were collected at layers {sorted(states.layers)}, but this editor edits "
                             f"{self.layer_ids}; collect them again with this editor (or the same `layers`)")
        self._check_count(len(states))
        cfg, stacked = self.config, [states.layers[l] for l in self.layer_ids]
        if cfg.prompt_negatives and not all(len(st.get("q_other", ())) for st in stacked):
            raise ValueError("prompt_negatives needs FFN inputs at the fit prompts' image tokens, which these states "
                             "lack: collect them with an editor whose config sets prompt_negatives (from a model "
                             "whose input_ids mark image tokens)")
        spaces = [self.spaces[l].cpu() for l in self.layer_ids]
        steps = cfg.encoder_steps if cfg.latent or (cfg.collaboration and cfg.zeta != "none") else 0  # α, ζ use them
        setting = (steps,) + tuple(getattr(cfg, name) for name in SPACE_FIELDS)
        self.losses = states.train_once(spaces, setting, lambda: train_spaces(
            spaces, stacked, steps=steps, batch_size=cfg.encoder_batch, lr=cfg.encoder_lr, tau=cfg.encoder_tau,
            seed=cfg.seed, progress=progress))
        gen, dev, first = torch.Generator().manual_seed(cfg.seed), self.device, stacked[0]
        # the same fit rows are negatives at every layer, so a negative's layers (and its scope) go together
        picks = tuple(torch.randperm(len(first[k]), generator=gen)[:cfg.neg_memory_size] for k in ("q", "q_ans"))
        for layer, st in zip(self.layers.values(), stacked):
            layer.fit(st, picks, gen, dev)
        self.router.to(dev).fit(first["h_sem"], first["img"], first["has_img"], picks[0],
                                getattr(states, "words", None))       # (states collected before words: none)
        self.fit_questions = list(states.questions)
        self.fitted = True
        self.reset()
        return self

    # ----------------------------------------------------------------------------------------- edit
    @atomic(spaces=False)
    def edit(self, item, *, progress: bool = False) -> dict[str, float]:
        """Edit one fact: an EditCase or an HF inputs dict with labels. Repeated calls accumulate. Returns
        what the edit reached (steps, loss, reached, margins_held, target_prob); warns when it fell short."""
        self._check_attached()
        inputs, cfg = self._inputs(item), self.config
        if not self.fitted and not self._warned:
            warnings.warn("the external memory is empty (fit() was not called): editing with the intrinsic "
                          "neurons alone; call editor.fit(triplets) for UniKE's latent knowledge", stacklevel=3)
            self._warned = True
        states = self.collector.states(inputs)
        at = targets(inputs["labels"], eos_id_of(self.model, self.processor))
        first, radius, subject = states[self.layer_ids[0]], None, None
        text = cfg.route and cfg.route_subject and first.image is None
        if cfg.route and (cfg.route_lookalikes or text):   # the edit's image radius or subject (its gate), known
            apart = unrelated({l: st.q[at] for l, st in states.items()},      # before training
                              {l: self.layers[l].negatives.to(st.q) for l, st in states.items()}, cfg.neg_exclude_cos)
            if cfg.route_lookalikes:
                radius = self.router.lookalike_radius(first.x[at], first.image, apart)
            if text:
                subject = self.router.subject_of(prompt_words(inputs, self.collector.skip)[0], first.x[at], apart)
        asked, other, olds = None, None, self.router.owner[:0]
        if cfg.route and cfg.route_rivals and cfg.route_asked:
            asked, other, olds = self._ask(item, first.x[at], first.image, radius)
        if text:                                      # an earlier edit of the same subject and question: updated
            olds = self.router.same_subject(first.x[at], subject)
        olds = olds if cfg.route_updates else olds[:0]
        if cfg.latent and self.fitted and cfg.write_edit_to_memory:
            for l, st in states.items():
                v_pos, k_head, v_head = self.collector.attn_values(l, st.h_pos, inputs)
                self.memory[l].add(st.h_sem, st.h_pos, v_pos, edit=self.n_edits, heads=(k_head, v_head))
        info = {"steps": 0, "loss": 0.0}
        if cfg.intrinsic:
            extra = None if not isinstance(item, EditCase) else self.collector.image_negatives(
                item, self.fit_questions, cfg.image_negatives, cfg.seed + self.n_edits)
            # its memory entry opens as it will
            self.scope.hold(Pending(first.x[at], first.image, radius, olds, subject))
            replay = self.replay() if cfg.replay else contextlib.nullcontext()
            try:
                with replay:            # its steps repeat one call: what comes before the edited layers, once
                    info = train_neurons(self.model, self.layers, cfg, inputs, states, at, extra,
                                         self.router if cfg.route and cfg.scoped_negatives else None, progress,
                                         radius, self._questions_of(olds), subject)
            finally:
                self.scope.release()
        if self.fitted:                               # the fitted entries of the facts it changes leave retrieval
            changed = self.router.changed(first.x[at], first.image, radius, subject)
            for memory in self.memory.values():
                memory.mask(changed)
        self.router.add(first.x[at], first.image, radius=radius, subject=subject)
        if cfg.route and cfg.route_rivals:            # split its scope from look-alike edits of other knowledge
            apart = self._apart(states, at)
            apart[olds] = False                       # ... and take precedence over those it updates
            self.router.split(apart)
            if other is not None:
                self.router.rival(self.router.edits - 1, other)
            self.router.precede(self.router.edits - 1, olds)
        self.asked += [None] * (self.router.edits - 1 - len(self.asked)) + [asked]   # by router index
        self.n_edits += 1
        return info

    def _ask(self, item, targets: Tensor, image: Tensor | None,
             radius: float | None) -> tuple[list[str] | None, Tensor | None, Tensor]:
        """For an EditCase with an image: the base model (greedy, one batch) answers its question over its
        image, and each earlier edit whose image lies within a radius of it (`EditRouter.neighbours`) is asked
        its own question over that image too. Where that answer is not its own, the two images hold other
        knowledge: the two edits become rivals (`EditRouter.rival`). Where it is and their question tests
        overlap, the new edit updates that edit's knowledge (`EditRouter.precede`). Returns [question, its
        answer] (kept in `asked` for later edits to ask), the rivals and the edits it updates; (None, None,
        none) for other edits."""
        if not (isinstance(item, EditCase) and item.image is not None):
            return None, None, self.router.owner[:0]
        js, overlap = self.router.neighbours(targets, image, radius)
        known = torch.tensor([j < len(self.asked) and self.asked[j] is not None for j in js.tolist()],
                             dtype=torch.bool, device=js.device)
        js, overlap = js[known], overlap[known]
        questions = list(dict.fromkeys([item.prompt] + [self.asked[j][0] for j in js.tolist()]))
        image = load_image(item.image)
        with self.disabled():                      # each question once: earlier edits often share one
            said = dict(zip(questions, generations(self.model, self.processor,
                                                   [Probe("rel", image, q, "") for q in questions])))
        same = torch.tensor([said[self.asked[j][0]] == self.asked[j][1] for j in js.tolist()],
                            dtype=torch.bool, device=js.device)
        return [item.prompt, said[item.prompt]], js[~same], js[same & overlap]

    def _questions_of(self, edits: Tensor) -> Tensor | None:
        """The rows of the edited layers' `edited` pool (one per router key) at the question's last token of
        `edits`; None where there are none or the layers do not keep one row per key."""
        if not len(edits) or not self._row_per_key():
            return None
        return torch.isin(self.router.owner, edits.to(self.router.owner.device)) & self.router.questions()

    def _row_per_key(self) -> bool:
        """Whether every edited layer keeps one `edited` row per router key (not with intrinsic off, nor in
        a state saved before)."""
        return all(len(layer.edited) == len(self.router.owner) for layer in self.layers.values())

    def _apart(self, states: dict[int, BatchStates], at: Tensor) -> Tensor:
        """Which committed edits hold other knowledge than the one just added: the FFN input at the question's
        last token of each (`EditedLayer.edited`, one row per router key) is not the same knowledge as the new
        edit's target positions (`training.unrelated`, standardised as the fit negatives); none where the
        layers do not keep one row per key (intrinsic off, or a state saved before)."""
        owner = self.router.owner
        apart = torch.zeros(self.router.edits, dtype=torch.bool, device=owner.device)
        if not self.fitted or not self._row_per_key():
            return apart
        starts = self.router.questions()
        apart[owner[starts]] = unrelated({l: st.q[at] for l, st in states.items()},
                                         {l: self.layers[l].edited[starts.cpu()].to(st.q) for l, st in states.items()},
                                         self.config.neg_exclude_cos,
                                         {l: self.layers[l].negatives for l in states}).to(apart.device)
        return apart

    # ----------------------------------------------------------------------------------------- lifecycle
    def reset(self) -> UniKE:
        """Drop every edit (neurons and the edits' memory entries); keep the fitted memory and spaces."""
        self._check_attached()
        self.router.truncate(0)
        for layer in self.layers.values():
            layer.reset()
        self.n_edits, self.asked = 0, []
        return self

    def detach(self) -> nn.Module:
        """Remove every hook and unike_* module: the model is bit-identical to before attaching."""
        if self.hooks is None:
            return self.model
        self.hooks.remove()
        for l, layer in self.layers.items():
            for name, _ in layer.named_parts(self._extra(l)):
                if hasattr(self.stack[l].block, name):
                    delattr(self.stack[l].block, name)
            layer.release(self.stack[l])
        self.scope.detach()
        self.hooks = None
        return self.model

    # ----------------------------------------------------------------------------------------- save / load
    def state(self) -> dict[str, Tensor]:
        """Every tensor of the editor by name, on the CPU (what `save` writes)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.edits.state().items()}

    def save(self, path):
        """Write `unike.safetensors` and `unike.json` into the folder `path` (created if needed); the JSON
        holds the tensor file's SHA-256, which `load` checks."""
        self._check_attached()
        return persist.save(self, path)

    @classmethod
    def load(cls, model: nn.Module, processor, path) -> UniKE:
        """Rebuild an editor saved with `save` onto `model`: safetensors and JSON only, never pickle. The
        files, fields, checksum and every tensor's name and shape are checked before the editor is kept; on
        any error the model is left as it was."""
        meta, state, config = persist.read(path)
        stack = locate(model, layers=config.layers_path)
        if (len(stack), stack.hidden_size) != (meta["num_layers"], meta["hidden_size"]):
            raise ValueError(f"the saved state is for a model with {meta['num_layers']} layers of width "
                             f"{meta['hidden_size']}; this model has {len(stack)} of width {stack.hidden_size}")
        if meta["model_class"] != type(model).__name__:
            warnings.warn(f"the saved state was made on a {meta['model_class']}, this model is a "
                          f"{type(model).__name__}; the edits only mean something on the same weights", stacklevel=2)
        editor = cls(model, processor, config)
        try:
            persist.restore(editor, meta, state)
        except Exception:
            editor.detach()
            raise
        return editor
