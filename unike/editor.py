"""The UniKE editor: fit (latent memory + contrastive spaces), edit, reset, detach, save, load.

Attaching adds, in each edited decoder layer, two submodules (`unike_memory`, `unike_neurons`) and four
hooks: the block's input x (pre-attention state) is recorded, the attention output is shifted toward the
retrieved knowledge, the FFN input q is recorded, and the added neurons' output joins the FFN output.
`detach()` removes exactly those, so the model is bit-identical to before.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import types
import typing
import warnings
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from .data.case import EditCase, Triplet, load_image, missing_images
from .hooks import Hooks
from .inputs import edit_inputs
from .locate import LocateError, locate
from .memory import LatentMemory
from .neurons import NeuronPatch
from .prompting import IGNORE, answer_tokens, collate, device_of, encode, eos_id_of, on_model, pad_id_of
from .roles import answer_end_index, image_mask, image_token_id, last_index, last_prompt_index, target_positions
from .router import EditRouter, image_codes
from .spaces import Spaces, train_spaces

ZETA_CHOICES = ("truthful", "semantic", "random", "none")
MEMORY_BUFFERS = ("keys", "values", "attn_values", "n_fit", "min_similarity", "basis", "coords", "residual")
NEURON_BUFFERS = ("keys", "bias", "values", "zeta", "truth")
ROUTER_BUFFERS = tuple(name for name, _ in EditRouter(1).named_buffers())
POOLS = ("negatives", "answer_negatives", "prompt_negatives", "edited")   # FFN inputs the neurons are trained against
SPACE_FIELDS = ("encoder_hidden", "truth_dim", "encoder_steps", "encoder_lr", "encoder_batch", "encoder_tau", "seed")
STATE_FILE, CONFIG_FILE = "unike.safetensors", "unike.json"


@dataclass
class UniKEConfig:
    """Every choice of the method; docs/method.md says which come from the paper and which are ours."""

    layers: int | list[int] = 4          # the last N decoder layers, or explicit indices (paper: last 4)
    layers_path: str | None = None       # override for `locate` when an architecture is not recognised
    # intrinsic knowledge (neurons)
    intrinsic: bool = True
    n_neurons: int = 10                  # per edit and layer (paper: 10)
    neuron_act: str = "relu"             # exact zero on inputs the neurons do not match (ours)
    edit_steps: int = 60
    stop_prob: float = 0.5               # stop once every target token has at least this probability (an argmax)
    edit_lr: float = 0.05                # Adam step relative to each tensor's scale (keys, values: hidden rms)
    margin_pos: float = 2.0              # pre-activation on the edit's own positions ≥ this
    margin_neg: float = 1.0              # pre-activation on unrelated FFN inputs ≤ −this
    act_weight: float = 1.0
    neg_weight: float = 1.0
    neg_memory_size: int = 4096          # FFN inputs kept from fit() as negatives for the activation loss
    key_ridge: float | None = 0.1        # None: keys along q − μ (T-Patcher); else the ridge of Σ⁻¹(q − μ)
    memory_positives: bool = True        # fit inputs that are the same knowledge as the edit train the neurons to fire
    image_negatives: int = 16            # other fit questions over the edit's image, as negatives (EditCase edits)
    neg_exclude_cos: float = 0.9         # negatives this close to the edit input are not pushed down
    prompt_negatives: int = 0            # FFN inputs at the image tokens of fit prompts (other images' patches) kept
                                         # from fit() as negatives for the activation loss; 0: off
    route: bool = True                   # gate each edit's neurons by its scope, read at the first edited layer
                                         # (unike.router; ours); False: the paper's ungated neurons
    route_question: float = 0.85         # standardised cosine to one of the edit's target positions ≥ this
    route_image: float = 0.7             # and cosine of the prompt's image code to the edit's ≥ this
    # external knowledge (latent memory)
    latent: bool = True
    top_k: int = 40                      # paper: 40
    temperature: float = 0.1
    write_edit_to_memory: bool = True
    relevance_quantile: float | None = 0.99  # α = 0 where the best match is below this quantile of the prompt
                                             # tokens' (not question-final) best matches; None: off
    index_rank: int = 64                 # width of the index the relevance gate matches fitted entries in
    # collaboration
    collaboration: bool = True           # False: fixed α and no ζ (paper Table 4 row 4)
    fixed_alpha: float | None = None     # a number fixes α (Fig. 4b); None = dynamic α from the semantic space
    zeta: str = "truthful"               # truthful | semantic | random | none (Fig. 4c)
    beta: float = 1.0
    encoder_hidden: int = 256
    truth_dim: int = 64
    encoder_steps: int = 300
    encoder_lr: float = 1e-4             # paper: Adam 1e-4
    encoder_batch: int = 128
    encoder_tau: float = 0.1
    min_triplets: int = 16
    seed: int = 0

    def __post_init__(self):
        hints = typing.get_type_hints(UniKEConfig)
        for f in fields(self):
            value = getattr(self, f.name)
            if not _conforms(value, hints[f.name]):
                raise TypeError(f"UniKEConfig.{f.name} = {value!r} ({type(value).__name__}) must be {f.type}")
        for names, ok, rule in ((_AT_LEAST_ONE, lambda v: v >= 1, "at least 1"), (_POSITIVE, lambda v: v > 0, "> 0"),
                                (_NON_NEGATIVE, lambda v: v >= 0, ">= 0")):
            bad = [f"{n}={getattr(self, n)}" for n in names if not ok(getattr(self, n))]
            if bad:
                raise ValueError(f"UniKEConfig: {', '.join(bad)} must be {rule}")
        if self.zeta not in ZETA_CHOICES:
            raise ValueError(f"zeta must be one of {ZETA_CHOICES}, not {self.zeta!r}")
        if not (self.intrinsic or self.latent):
            raise ValueError("intrinsic and latent are both off: nothing would be edited; enable one")
        bad = [f"{n}={getattr(self, n)}" for n in ("route_question", "route_image") if not -1 <= getattr(self, n) <= 1]
        if bad:
            raise ValueError(f"UniKEConfig: {', '.join(bad)} must lie in [-1, 1] (cosines)")
        if self.fixed_alpha is not None and not 0.0 <= self.fixed_alpha <= 1.0:
            raise ValueError(f"fixed_alpha must lie in [0, 1], not {self.fixed_alpha}")

    @property
    def alpha(self) -> float | None:
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return None if self.collaboration else 0.5


_AT_LEAST_ONE = ("n_neurons", "top_k", "index_rank", "encoder_hidden", "truth_dim", "encoder_batch", "min_triplets")
_POSITIVE = ("temperature", "encoder_tau", "edit_lr", "encoder_lr")
_NON_NEGATIVE = ("edit_steps", "encoder_steps", "neg_memory_size", "image_negatives", "prompt_negatives")


def _conforms(value, hint) -> bool:
    """isinstance() for UniKEConfig's annotations (int, float, bool, str, None, list[int] and unions); an
    int is a float, a bool is neither an int nor a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_conforms(v, args[0]) for v in value))
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True


@dataclass
class FitStates:
    """The base model's states of the fit triplets, per edited layer (`UniKE.collect`), all on the CPU.

    `layers[l]` maps each key to a tensor: h_sem, h_pos, h_neg [n, d] (pre-attention states at the
    question's last token and at the final token of question + right / wrong answer), v_pos [n, d]
    (Attn(h_pos, h_pos, h_pos)), q [n, d] (the FFN input at the question's last token), q_ans [m, d]
    (FFN inputs inside the answers and at their final token), other [o, d] (ordinary prompt tokens'
    pre-attention states, for the relevance gate) and q_other [p, d] (FFN inputs at every 7th image
    token, for `prompt_negatives`; empty unless the collecting editor's config sets it).
    img [i, d]: the mean state over the image tokens of each prompt that has them (for the router).
    `questions`: the image questions (for image negatives).
    """

    KEYS = ("h_sem", "h_pos", "h_neg", "v_pos", "q", "q_ans", "other", "q_other", "img")
    layers: dict[int, dict[str, Tensor]]
    questions: list[str] = field(default_factory=list)
    trained: dict = field(default_factory=dict, repr=False)   # spaces trained on these states, per setting

    def __len__(self) -> int:
        return next(iter(self.layers.values()))["h_sem"].shape[0]


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Turn off gradients of the model's own parameters (not unike's) for a while, then restore the flags."""
    flags = [(p, p.requires_grad) for n, p in model.named_parameters() if "unike_" not in n]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _follow(module: nn.Module, h: Tensor) -> nn.Module:
    """unike's modules compute in fp32 on the device of the activation they touch (and return its dtype):
    move one there the first time it differs, e.g. a layer placed by accelerate's `device_map`, or a
    `model.to(...)` after attaching that moved or cast it."""
    buffer = next(module.buffers())
    if buffer.device != h.device or buffer.dtype != torch.float32:
        module.to(h.device, torch.float32)
    return module


def atomic(spaces: bool):
    """Decorator: when the method raises (a bad input found late, out of memory, Ctrl-C), the editor is
    put back as it was before the call (`UniKE._transaction`); `spaces`: the method may train the spaces."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with self._transaction(spaces):
                return method(self, *args, **kwargs)
        return run
    return wrap


class UniKE:
    """UniKE on any HF (vision-)language model. See DESIGN.md for the public API."""

    def __init__(self, model: nn.Module, processor=None, config: UniKEConfig | None = None):
        self.model, self.processor = model, processor
        self.config = cfg = config or UniKEConfig()
        mcfg = getattr(model, "config", None)
        text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        if getattr(mcfg, "is_encoder_decoder", False) or getattr(text_cfg, "is_encoder_decoder", False):
            raise NotImplementedError(f"{type(model).__name__} is an encoder-decoder model: its answer lives in "
                                      "decoder_input_ids, which UniKE does not edit yet; use a decoder-only VLM")
        try:
            self.stack = locate(model, layers=cfg.layers_path)
        except LocateError as err:
            raise LocateError(f"{err}\nwith UniKE, pass that path as UniKEConfig(layers_path=...)") from None
        n = len(self.stack)
        if isinstance(cfg.layers, int) and cfg.layers > n:
            warnings.warn(f"layers={cfg.layers} but the decoder has {n} layers: editing all {n}", stacklevel=2)
            self.config = cfg = replace(cfg, layers=n)
        ids = list(range(n - cfg.layers, n)) if isinstance(cfg.layers, int) else sorted(cfg.layers)
        if not ids or any(not -n <= i < n for i in ids) or (isinstance(cfg.layers, int) and not 0 < cfg.layers <= n):
            raise ValueError(f"layers={cfg.layers!r} is out of range for a decoder of {n} layers; "
                             f"pass a count in 1..{n} or indices in 0..{n - 1}")
        self.layer_ids = sorted({i % n for i in ids})
        d = self.stack.hidden_size
        torch.manual_seed(cfg.seed)
        self.spaces = {l: Spaces(d, cfg.encoder_hidden, cfg.truth_dim) for l in self.layer_ids}
        self.memory = {l: LatentMemory(d, self.spaces[l], cfg.top_k, cfg.temperature, cfg.alpha, cfg.index_rank)
                       for l in self.layer_ids}
        self.neurons = {l: NeuronPatch(d, cfg.n_neurons, cfg.neuron_act, cfg.beta) for l in self.layer_ids}
        self.router = EditRouter(d, cfg.route_question, cfg.route_image)   # at the first edited layer
        self._image_token = image_token_id(model, processor)
        self.negatives = {l: torch.zeros(0, d) for l in self.layer_ids}   # FFN inputs of fit questions
        self.answer_negatives = {l: torch.zeros(0, d) for l in self.layer_ids}  # ... inside fit answers
        self.prompt_negatives = {l: torch.zeros(0, d) for l in self.layer_ids}  # ... at fit prompts' image tokens
        self.edited = {l: torch.zeros(0, d) for l in self.layer_ids}      # FFN inputs of earlier edits' targets
        self.fitted, self.n_edits, self._enabled, self._warned = False, 0, True, False
        self._fit_questions: list[str] = []      # image questions seen in fit (for image negatives)
        self._x: dict[int, Tensor] = {}
        self._q: dict[int, Tensor] = {}
        self._gate: Tensor | None = None                  # the router's g_e of the current forward pass
        self._call: tuple = (None, None)                  # (input_ids, past_key_values) of the current call
        self._images = weakref.WeakKeyDictionary()       # a KV cache -> its prompts' image codes
        self.hooks = Hooks()
        self._attach()

    # ----------------------------------------------------------------------------------------- hooks
    def _modules(self, l: int) -> tuple[tuple[str, nn.Module], ...]:
        """The unike_* submodules of layer l's block."""
        own = (("unike_memory", self.memory[l]), ("unike_neurons", self.neurons[l]))
        return own + ((("unike_router", self.router),) if l == self.layer_ids[0] else ())

    def _attach(self) -> None:
        for l in self.layer_ids:
            layer = self.stack[l]
            dev = device_of(layer.block)      # not its weights' device: offloaded weights wait on "meta"
            for name, mod in self._modules(l):
                if hasattr(layer.block, name):
                    raise RuntimeError(f"layer {l} already carries {name}: another UniKE editor is attached; "
                                       "detach it first")
                layer.block.add_module(name, mod.to(dev))
            self.hooks.pre(layer.block, self._record_x(l), with_kwargs=True)
            self.hooks.forward(layer.attn, self._shift(l))
            self.hooks.pre(layer.mlp_in, self._record_q(l), with_kwargs=True)
            self.hooks.forward(layer.mlp, self._add_neurons(l))
        self.hooks.pre(self.model, self._record_call, with_kwargs=True)   # the call's input_ids and KV cache

    def _record_call(self, module, args, kwargs):
        cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)   # named `cache` or `past_key_values`
        self._call = (kwargs.get("input_ids", args[0] if args else None), cache)

    def _record_x(self, l):
        def hook(module, args, kwargs):
            self._x[l] = args[0] if args else kwargs["hidden_states"]
            if l == self.layer_ids[0]:
                self._gate = self._route(self._x[l])
        return hook

    def _route(self, x: Tensor) -> Tensor | None:
        """g_e at every position of x (the first edited layer's input), or None where nothing is gated."""
        if not (self._enabled and self.config.route and self.config.intrinsic and self.router.edits):
            return None
        image, has = self._image_codes(x)
        return _follow(self.router, x)(x, image, has)

    def _image_codes(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The prompts' image codes: from the image tokens where this call has them, else those kept with its
        KV cache at the prefill step (a cached generate step sees one token); (None, None) where the model
        does not mark image tokens in input_ids (it is then routed on the question alone)."""
        ids, cache = self._call
        if self._image_token is None or not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] > x.shape[1]:
            return None, None       # no image marks, or a model that does not run input_ids' tokens as they are
        mask = image_mask(ids, self._image_token)
        if mask.any():
            codes = image_codes(self._tokens(x, {"input_ids": ids}), mask.to(x.device))
            if cache is not None:
                self._images[cache] = codes
            return codes
        if cache is not None and cache in self._images:
            return self._images[cache]
        return x.new_zeros(len(ids), x.shape[-1]).float(), torch.zeros(len(ids), dtype=torch.bool, device=x.device)

    def _record_q(self, l):
        def hook(module, args, kwargs):
            self._q[l] = args[0] if args else next(iter(kwargs.values()))
        return hook

    def _shift(self, l):
        def hook(module, args, output):
            memory = self.memory[l]
            if not (self._enabled and self.config.latent and len(memory)):
                return None
            h = _first(output)
            x = self._x[l].to(h.device)   # the block's input may arrive from another device (device_map)
            if x.shape != h.shape:
                return None        # e.g. cross-attention layers whose output is not per input token
            shifted = _follow(memory, h)(h, x)
            return (shifted,) + tuple(output[1:]) if isinstance(output, tuple) else shifted
        return hook

    def _add_neurons(self, l):
        def hook(module, args, output):
            patch = self.neurons[l]
            if not (self._enabled and self.config.intrinsic) or (patch.keys.shape[1] == 0 and patch.pending is None):
                return None
            out = _first(output)
            if self._gate is not None and self._gate.shape[-1] != patch.edits:
                raise RuntimeError(f"the router holds {self._gate.shape[-1]} edits but layer {l} has {patch.edits}: "
                                   "neurons were added without editor.edit(); add them through it (or route=False)")
            delta = _follow(patch, out)(self._q[l].to(out.device), self._gate).reshape(out.shape)
            out = out + delta
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model: every UniKE component is bypassed inside this block."""
        before, self._enabled = self._enabled, False
        try:
            yield self.model
        finally:
            self._enabled = before

    @contextlib.contextmanager
    def full_retrieval(self):
        """Every token retrieves its top-K inside this block, also where the relevance gate is shut (by
        default those tokens skip retrieval: α = 0 there either way, so outputs are the same, to float
        rounding).
        Use it to read h_know for every token or to steer α where the gate is shut."""
        before = {l: m.prune for l, m in self.memory.items()}
        for m in self.memory.values():
            m.prune = False
        try:
            yield self.model
        finally:
            for l, m in self.memory.items():
                m.prune = before[l]

    @contextlib.contextmanager
    def _transaction(self, spaces: bool):
        """Restore the editor if the block raises. Fit and edit replace the memory's, the neurons' and the
        negatives' tensors rather than write into them, so references are kept; what is written in place
        (0-d counters, and the spaces' weights when `spaces`) is copied."""
        keep = lambda t: t.clone() if t.dim() == 0 else t  # noqa: E731
        memory = {l: {k: keep(getattr(m, k)) for k in MEMORY_BUFFERS} for l, m in self.memory.items()}
        neurons = {l: {k: getattr(p, k) for k in NEURON_BUFFERS} for l, p in self.neurons.items()}
        pools = {k: dict(getattr(self, k)) for k in POOLS}
        router = {k: getattr(self.router, k) for k in ROUTER_BUFFERS}
        counters = {k: getattr(self, k) for k in ("fitted", "n_edits", "_fit_questions")}
        weights = {l: {k: v.clone() for k, v in sp.state_dict().items()}
                   for l, sp in self.spaces.items()} if spaces else {}
        try:
            yield
        except BaseException:
            for l in self.layer_ids:
                for k, v in memory[l].items():
                    setattr(self.memory[l], k, v)
                self.neurons[l].discard()
                for k, v in neurons[l].items():
                    setattr(self.neurons[l], k, v)
                if spaces:
                    self.spaces[l].load_state_dict(weights[l])
            for k, v in {**pools, **counters}.items():
                setattr(self, k, v)
            for k, v in router.items():
                setattr(self.router, k, v)
            raise

    def _check_attached(self) -> None:
        if self.hooks is None:
            raise RuntimeError("this editor was detached; build a new UniKE(model, processor) to edit again")

    # ----------------------------------------------------------------------------------------- inputs
    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    def _inputs(self, item) -> dict[str, Tensor]:
        return edit_inputs(self.model, self.processor, item, self.stack.text_config)

    @torch.no_grad()
    def _states(self, inputs: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """Base-model states of a batch with labels: h_sem, h_pos (pre-attention) and q at every position."""
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        with self.disabled():
            self.model(**batch)
        sem = last_prompt_index(inputs["attention_mask"], inputs["labels"])
        fin = answer_end_index(inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                               eos_id_of(self.model, self.processor))
        rows = torch.arange(len(sem), device=sem.device)
        images = image_mask(inputs["input_ids"], self._image_token)
        out = {}
        for l in self.layer_ids:
            x = self._tokens(self._x[l], inputs).float()
            aligned = images.shape == x.shape[:2]       # else the model does not run input_ids' tokens as they are
            img = image_codes(x, images)[0][images.any(1)] if aligned else x[:0, 0]    # rows with an image
            out[l] = {"x": x, "h_sem": x[rows, sem], "h_pos": x[rows, fin], "q": self._tokens(self._q[l], inputs).float(),
                      "x_rms": x[inputs["attention_mask"].bool()].pow(2).mean().sqrt(), "img": img}
        return out

    @staticmethod
    def _tokens(h: Tensor, inputs) -> Tensor:
        """[B, T, d] states aligned with input_ids (flattened [B*T', d] unflattened; a prefix the model
        prepends inside, e.g. GIT's image features, dropped)."""
        b, t = inputs["input_ids"].shape
        return h.reshape(b, -1, h.shape[-1])[:, -t:]

    @torch.no_grad()
    def _attn_values(self, l: int, h: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """Attn(h, h, h) of layer l for each row's state h: `inputs` (one row per state) runs again with
        every position's state entering layer l set to that row's h. Attention then averages identical
        values, whatever its weights, positions or mask, so its output is o_proj(v_proj(norm(h))) — the
        value of a knowledge token — for any architecture, without knowing its projection names."""
        block, attn = self.stack[l].block, self.stack[l].attn
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        out = []

        class Done(Exception):
            pass

        def put(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            hs = h.to(x).reshape(len(h), 1, -1).expand(len(h), x.numel() // (len(h) * x.shape[-1]), -1)
            hs = hs.reshape(x.shape)
            return ((hs,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hs})

        def take(module, args, output):
            o = _first(output)
            out.append(o.reshape(len(h), -1, o.shape[-1])[:, -1].float())
            raise Done

        with Hooks() as hooks, self.disabled():
            hooks.pre(block, put, with_kwargs=True, prepend=True)
            hooks.forward(attn, take, prepend=True)
            try:
                self.model(**batch)
            except Done:
                pass
        return out[0].to(h)

    # ----------------------------------------------------------------------------------------- fit
    def fit(self, triplets: Iterable[Triplet], *, batch_size: int = 16, progress: bool = True) -> "UniKE":
        """Build the latent memory from (image, question, right, wrong) triplets and train the spaces."""
        return self.fit_states(self.collect(triplets, batch_size=batch_size, progress=progress), progress=progress)

    def fit_inputs(self, pairs: Iterable[tuple[dict, dict]], *, total: int | None = None,
                   progress: bool = True) -> "UniKE":
        """`fit` from batches of (question + right answer, question + wrong answer) inputs with labels."""
        return self.fit_states(self.collect_inputs(pairs, total=total, progress=progress), progress=progress)

    def collect(self, triplets: Iterable[Triplet], *, batch_size: int = 16, progress: bool = True) -> "FitStates":
        """The base model's states of the triplets at the edited layers: the first half of `fit`."""
        self._check_attached()
        triplets = list(triplets)
        self._check_count(len(triplets))
        if self.processor is None:
            raise ValueError("fit(triplets) needs a processor: UniKE(model, processor); without one, "
                             "call fit_inputs() with inputs dicts that carry labels")
        self._check_triplets(triplets)
        pad = pad_id_of(self.processor)

        def pairs():
            for start in range(0, len(triplets), batch_size):
                chunk = triplets[start:start + batch_size]
                images = [load_image(t.image) for t in chunk]
                yield tuple(collate([encode(self.processor, im, t.question, getattr(t, side))
                                     for im, t in zip(images, chunk)], pad, side="right")
                            for side in ("right", "wrong"))
        states = self.collect_inputs(pairs(), total=-(-len(triplets) // batch_size), progress=progress)
        states.questions = sorted({t.question for t in triplets if t.image is not None})
        return states

    def _check_triplets(self, triplets: list) -> None:
        """Every triplet is a Triplet whose answers tokenize and whose image exists, before any work."""
        for i, t in enumerate(triplets):
            if not isinstance(t, Triplet):
                raise TypeError(f"fit() takes unike.Triplet records; item {i} is a {type(t).__name__} "
                                "(for inputs dicts with labels, use fit_inputs)")
            try:
                answer_tokens(self.processor, t.right)
                answer_tokens(self.processor, t.wrong)
            except ValueError as err:
                raise ValueError(f"triplet {i}: {err}") from None
        missing = missing_images(t.image for t in triplets)
        if missing:
            raise FileNotFoundError(f"{len(missing)} triplet image(s) do not exist, e.g. {missing[:3]}")

    def _check_count(self, n: int) -> None:
        if n < self.config.min_triplets:
            raise ValueError(f"fit() got {n} triplets; it needs at least {self.config.min_triplets} "
                             "to train the contrastive spaces (the paper uses more than 15,000)")

    def collect_inputs(self, pairs: Iterable[tuple[dict, dict]], *, total: int | None = None,
                       progress: bool = True) -> "FitStates":
        """`collect` from batches of (question + right answer, question + wrong answer) inputs with labels."""
        self._check_attached()
        collected = {l: {k: [] for k in FitStates.KEYS} for l in self.layer_ids}
        eos = eos_id_of(self.model, self.processor)
        for pos, neg in tqdm(pairs, total=total, desc="triplet states", disable=not progress):
            pos, neg = self._inputs(pos), self._inputs(neg)
            sem = last_prompt_index(pos["attention_mask"], pos["labels"])
            rows = torch.arange(len(sem), device=sem.device)
            other = pos["attention_mask"].bool() & (pos["labels"] == IGNORE)   # prompt tokens before the last
            other[rows, sem] = False
            inside = target_positions(pos["labels"])             # positions inside the answer that predict a token
            inside[rows, sem] = False
            inside[rows, answer_end_index(pos["input_ids"], pos["attention_mask"], pos["labels"], eos)] = True  # and
            # its end, which predicts the end of the answer: an edit must not fire there, or answers run on
            if self.config.prompt_negatives:                      # other images' patches
                patches = other & image_mask(pos["input_ids"], image_token_id(self.model, self.processor))
            for l, st in self._states(pos).items():
                collected[l]["h_sem"].append(st["h_sem"].cpu())
                collected[l]["h_pos"].append(st["h_pos"].cpu())
                collected[l]["v_pos"].append(self._attn_values(l, st["h_pos"], pos).cpu())
                collected[l]["q"].append(st["q"][rows, sem].cpu())
                collected[l]["q_ans"].append(st["q"][inside].cpu())
                collected[l]["other"].append(st["x"][other][::7].cpu())
                collected[l]["img"].append(st["img"].cpu())
                if self.config.prompt_negatives:
                    collected[l]["q_other"].append(st["q"][patches][::7].cpu())
            for l, st in self._states(neg).items():
                collected[l]["h_neg"].append(st["h_pos"].cpu())
        states = FitStates({l: {k: torch.cat(v) if v else torch.zeros(0, self.stack.hidden_size)
                                for k, v in collected[l].items()} for l in self.layer_ids})
        self._check_count(len(states))
        if states.layers[self.layer_ids[0]]["h_neg"].shape[0] != len(states):
            raise ValueError("fit_inputs() needs as many wrong-answer rows as right-answer rows")
        return states

    @atomic(spaces=True)
    def fit_states(self, states: "FitStates", *, progress: bool = True) -> "UniKE":
        """The second half of `fit`: the latent memory, the relevance gate and the negatives from collected
        states, and the contrastive spaces trained on them (loss curve in `self.losses`). Spaces trained
        on the same states with the same encoder settings are reused, so editors with other ablation
        switches fit from one `collect` without running the model or training the encoders again."""
        self._check_attached()
        if sorted(states.layers) != self.layer_ids:
            raise ValueError(f"the states were collected at layers {sorted(states.layers)}, but this editor edits "
                             f"{self.layer_ids}; collect them again with this editor (or the same `layers`)")
        self._check_count(len(states))
        cfg = self.config
        stacked = [states.layers[l] for l in self.layer_ids]
        if cfg.prompt_negatives and not all(len(st.get("q_other", ())) for st in stacked):
            raise ValueError("prompt_negatives needs FFN inputs at the fit prompts' image tokens, which these states "
                             "lack: collect them with an editor whose config sets prompt_negatives (from a model "
                             "whose input_ids mark image tokens)")
        dev = self.device
        spaces = [self.spaces[l].cpu() for l in self.layer_ids]
        steps = cfg.encoder_steps if cfg.latent or (cfg.collaboration and cfg.zeta != "none") else 0  # α, ζ use them
        setting = (steps,) + tuple(getattr(cfg, name) for name in SPACE_FIELDS)
        if setting in states.trained:       # seeded: these states and settings train exactly these spaces
            weights, self.losses = states.trained[setting]
            for sp, w in zip(spaces, weights):
                sp.load_state_dict(w)
        else:
            self.losses = train_spaces(spaces, stacked, steps=steps, batch_size=cfg.encoder_batch,
                                       lr=cfg.encoder_lr, tau=cfg.encoder_tau, seed=cfg.seed, progress=progress)
            states.trained[setting] = ([{k: v.clone() for k, v in sp.state_dict().items()} for sp in spaces],
                                       self.losses)
        gen = torch.Generator().manual_seed(cfg.seed)
        for l, st in zip(self.layer_ids, stacked):
            self.spaces[l].to(dev)
            mem = self.memory[l]
            mem.truncate(0)
            mem.add(st["h_sem"], st["h_pos"], st["v_pos"], fitted=True)
            mem.calibrate(st["h_sem"], st["other"], cfg.relevance_quantile)
            keep = torch.randperm(st["q"].shape[0], generator=gen)[:cfg.neg_memory_size]
            self.negatives[l] = st["q"][keep]
            inside = torch.randperm(st["q_ans"].shape[0], generator=gen)[:cfg.neg_memory_size]
            self.answer_negatives[l] = st["q_ans"][inside]
            # a generator of its own, so the other draws are the same with or without the option
            picks = torch.randperm(len(st["q_other"]), generator=torch.Generator().manual_seed(cfg.seed + l))
            self.prompt_negatives[l] = st["q_other"][picks[:cfg.prompt_negatives]]
            self.neurons[l].truth = self._zeta(l, st, gen).to(dev)
        first = stacked[0]
        self.router.to(dev).fit(first["h_sem"], first.get("img", first["h_sem"][:0]))
        self._fit_questions = list(states.questions)
        self.fitted = True
        self.reset()
        return self

    def _zeta(self, l: int, st: dict[str, Tensor], gen: torch.Generator) -> Tensor:
        """ζ′ of new edits at layer l, a hidden-space direction fixed here (Fig. 4c variants): the truthful
        Dec(ζ), the semantic space's right − wrong mean, a random direction of the truthful norm, or none."""
        sp, kind = self.spaces[l], self.config.zeta
        if kind == "none" or not self.config.collaboration:
            return torch.zeros(0)
        with torch.no_grad():
            truthful = sp.zeta_prime().detach().cpu()
            if kind == "semantic":
                s, dev = sp.standardize, sp.zeta.device     # the states were collected on the CPU
                sem = sp.sem(s(st["h_pos"].to(dev))).mean(0) - sp.sem(s(st["h_neg"].to(dev))).mean(0)
                return (sem * s.std).cpu()
            if kind == "random":
                return F.normalize(torch.randn(truthful.shape, generator=gen), dim=0) * truthful.norm()
            return truthful.clone()

    # ----------------------------------------------------------------------------------------- edit
    @atomic(spaces=False)
    def edit(self, item, *, progress: bool = False) -> dict[str, float]:
        """Edit one fact: an EditCase or an HF inputs dict with labels. Repeated calls accumulate."""
        self._check_attached()
        inputs = self._inputs(item)
        cfg = self.config
        if not self.fitted and not self._warned:
            warnings.warn("the external memory is empty (fit() was not called): editing with the intrinsic "
                          "neurons alone; call editor.fit(triplets) for UniKE's latent knowledge", stacklevel=3)
            self._warned = True
        states = self._states(inputs)
        if cfg.latent and self.fitted and cfg.write_edit_to_memory:
            for l in self.layer_ids:
                h_pos = states[l]["h_pos"]
                self.memory[l].add(states[l]["h_sem"], h_pos, self._attn_values(l, h_pos, inputs))
        info = {"steps": 0, "loss": 0.0}
        if cfg.intrinsic:
            extra = self._image_negatives(item) if isinstance(item, EditCase) else None
            info = self._train_neurons(inputs, states, progress, extra)
            first = states[self.layer_ids[0]]
            self.router.add(first["x"][self._targets(inputs["labels"])],
                            first["img"].mean(0) if len(first["img"]) else None)
        self.n_edits += 1
        return info

    def _init_keys(self, q: Tensor, neg: Tensor, mu: Tensor) -> Tensor:
        """Keys [d, n] along the discriminant direction Σ⁻¹(q − μ) of each neuron's input against the
        negatives (covariance Σ, ridge `key_ridge`), scaled so the pre-activation is margin_pos at q, 0 at μ."""
        delta = q - mu
        if len(neg) > 1 and self.config.key_ridge is not None:
            cov = torch.cov(neg.T.double())
            cov += self.config.key_ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
            w = torch.linalg.solve(cov, delta.T.double()).T.to(delta)
        else:
            w = delta
        return (w * self.config.margin_pos / (w * delta).sum(-1, keepdim=True).clamp_min(1e-6)).T

    def _negative_pool(self, l: int, q: Tensor, neg_mask: Tensor, extra: Tensor | None = None) -> Tensor:
        """Negatives of layer l: fit questions' FFN inputs, earlier edits' (so that a sequence of edits
        does not overwrite itself), the edit input's own prompt positions, and `extra` (other questions
        over the edit's own image)."""
        parts = [self.negatives[l].to(q), self.edited[l].to(q), q[neg_mask]]
        return torch.cat(parts + ([extra.to(q)] if extra is not None else []))

    @torch.no_grad()
    def _image_negatives(self, case: EditCase) -> dict[int, Tensor] | None:
        """FFN inputs at the last token of other fit questions asked over the edit's own image: the edit
        must not leak into the entity's other facts (paraphrases of the edited question are recognised as
        the same knowledge by `_unrelated` and left out)."""
        n = self.config.image_negatives
        if not (n and self._fit_questions and case.image is not None and self.processor is not None):
            return None
        image = load_image(case.image)
        gen = torch.Generator().manual_seed(self.config.seed + self.n_edits)
        pool = [q for q in self._fit_questions if q != case.prompt]
        picks = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:n].tolist()]
        batch = on_model(collate([encode(self.processor, image, q) for q in picks], pad_id_of(self.processor)), self.model)
        with self.disabled():
            self.model(**batch)
        last = last_index(batch["attention_mask"])
        rows = torch.arange(len(last), device=last.device)
        return {l: self._tokens(self._q[l], batch)[rows, last].float() for l in self.layer_ids}

    def _unrelated(self, states, rows, cols, pools: dict[int, Tensor]) -> Tensor:
        """Which negatives of the per-layer `pools` (`_negative_pool`) are unrelated to the edit.

        A negative is the *same knowledge* as the edit (another rendering or wording of the edited fact,
        which the edit should reach) when its FFN input agrees with the edit's at every edited layer:
        the mean over layers of the best cosine (standardised by the negatives' statistics) is at least
        `neg_exclude_cos`. Those are not pushed down.
        """
        cos = 0
        for l in self.layer_ids:
            q, neg = states[l]["q"], pools[l]
            mu, sd = neg.mean(0), neg.std(0).clamp_min(1e-5) if len(neg) > 1 else torch.ones_like(q[0, 0])
            cos = cos + (F.normalize((neg - mu) / sd, dim=-1) @ F.normalize((q[rows, cols] - mu) / sd, dim=-1).T).max(1).values
        return cos / len(self.layer_ids) < self.config.neg_exclude_cos

    def _targets(self, labels: Tensor) -> Tensor:
        """The positions an edit's neurons sit at: those that predict a target token. The answer's end
        (predicting EOS) is left out where others exist: it only trains through the loss, its state is the
        same "answer ends" state as every other answer's."""
        pos_mask = target_positions(labels)
        ends = pos_mask & (F.pad(labels[:, 1:], (0, 1), value=IGNORE) == eos_id_of(self.model, self.processor))
        return pos_mask & ~ends if (pos_mask & ~ends).any() else pos_mask

    def _train_neurons(self, inputs, states, progress, extra=None) -> dict[str, float]:
        cfg = self.config
        labels = inputs["labels"]
        pos_mask = target_positions(labels)                       # positions that predict target tokens
        neg_mask = inputs["attention_mask"].bool() & ~pos_mask & (labels == IGNORE)
        rows, cols = self._targets(labels).nonzero(as_tuple=True)
        assign = torch.arange(cfg.n_neurons, device=rows.device) % len(rows)   # neuron j ↔ target position
        negatives, positives, inside, prompts, groups = {}, {}, {}, {}, []
        pools = {l: self._negative_pool(l, states[l]["q"], neg_mask, extra and extra[l]) for l in self.layer_ids}
        keep = self._unrelated(states, rows, cols, pools)
        first = assign == 0                                       # neurons at the question's last token
        for l in self.layer_ids:
            q = states[l]["q"]
            q_pos = q[rows, cols]                                           # [P, d]
            neg = pools[l]
            mu = neg.mean(0)
            self.edited[l] = torch.cat([self.edited[l], q_pos.cpu()])
            negatives[l] = neg[keep]
            n_fit = len(self.negatives[l])                    # fit inputs that are the same knowledge: fire there too
            positives[l] = neg[:n_fit][~keep[:n_fit]] if cfg.memory_positives else neg[:0]
            keys = self._init_keys(q_pos[assign], neg, mu)
            bias = -(mu @ keys)
            inside[l] = self.answer_negatives[l].to(q)
            prompts[l] = self.prompt_negatives[l].to(q)
            if len(inside[l]) and not first.all():   # neurons inside a multi-token answer: against fit answers
                pool = torch.cat([inside[l], neg])
                k_in = self._init_keys(q_pos[assign[~first]], pool, pool.mean(0))
                keys[:, ~first], bias[~first] = k_in, -(pool.mean(0) @ k_in)
            patch = self.neurons[l]
            patch.begin(keys, bias)
            # step sizes relative to each tensor's natural scale, so one edit_lr fits every model width
            v_lr = cfg.edit_lr * float(states[l]["x_rms"])
            groups += [{"params": [patch.pending["k"]], "lr": cfg.edit_lr * float(keys.pow(2).mean().sqrt())},
                       {"params": [patch.pending["b"]], "lr": cfg.edit_lr * cfg.margin_pos},
                       {"params": [patch.pending["v"]], "lr": v_lr}]
        opt = torch.optim.Adam(groups)

        def violation(z: Tensor) -> Tensor:    # mean over the violating negatives: hard ones are not diluted
            hinge = F.relu(z + cfg.margin_neg)
            return hinge.sum() / (hinge > 0).sum().clamp_min(1)

        batch = {k: v for k, v in inputs.items() if k != "labels"}
        tgt = labels[:, 1:]
        loss = torch.zeros(())
        with frozen(self.model), torch.enable_grad():
            for step in tqdm(range(cfg.edit_steps + 1), desc="edit", disable=not progress):
                logits = self.model(**batch).logits[:, -labels.shape[1]:][:, :-1].float()
                ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE)
                probs = logits.softmax(-1)[tgt != IGNORE].gather(-1, tgt[tgt != IGNORE][:, None])
                reached = bool((probs > cfg.stop_prob).all())          # every target token generated
                act = neg_loss = torch.zeros((), device=logits.device)
                for l in self.layer_ids:
                    patch = self.neurons[l]
                    q = self._tokens(self._q[l], inputs)
                    z = patch.pending_preactivation(q[rows, cols][assign])         # [n, n] own positions
                    act = act + F.relu(cfg.margin_pos - z.diagonal()).mean()
                    if len(positives[l]):
                        zp = patch.pending_preactivation(positives[l])[:, first]
                        act = act + F.relu(cfg.margin_pos - zp).mean()
                    if len(negatives[l]):
                        neg_loss = neg_loss + violation(patch.pending_preactivation(negatives[l]))
                    if len(inside[l]) and not first.all():
                        neg_loss = neg_loss + violation(patch.pending_preactivation(inside[l])[:, ~first])
                    if len(prompts[l]):        # a term of its own: many easy rows do not dilute the others
                        neg_loss = neg_loss + violation(patch.pending_preactivation(prompts[l]))
                loss = ce + cfg.act_weight * act + cfg.neg_weight * neg_loss
                held = act.item() == 0 and neg_loss.item() == 0         # both margins, at every layer
                if (reached and held) or step == cfg.edit_steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        for l in self.layer_ids:
            self.neurons[l].commit()
        info = {"steps": step, "loss": loss.item(), "reached": reached, "margins_held": held,
                "target_prob": probs.min().item()}
        if not reached:
            warnings.warn(f"the edit did not reach its target in {step} steps (lowest target-token probability "
                          f"{info['target_prob']:.2f}): its answer may differ from the target; raise "
                          "UniKEConfig.edit_steps or edit_lr", stacklevel=4)
        return info

    # ----------------------------------------------------------------------------------------- lifecycle
    def reset(self) -> "UniKE":
        """Drop every edit (neurons and the edits' memory entries); keep the fitted memory and spaces."""
        self._check_attached()
        self.router.truncate(0)
        for l in self.layer_ids:
            self.neurons[l].clear()
            self.edited[l] = self.edited[l][:0]
            self.memory[l].truncate(int(self.memory[l].n_fit))
        self.n_edits = 0
        return self

    def detach(self) -> nn.Module:
        """Remove every hook and unike_* module: the model is bit-identical to before attaching."""
        if self.hooks is None:
            return self.model
        self.hooks.remove()
        for l in self.layer_ids:
            for name, _ in self._modules(l):
                if hasattr(self.stack[l].block, name):
                    delattr(self.stack[l].block, name)
        self.hooks, self._x, self._q, self._gate, self._call = None, {}, {}, None, (None, None)
        return self.model

    # ----------------------------------------------------------------------------------------- save / load
    def state(self) -> dict[str, Tensor]:
        out = {}
        for l in self.layer_ids:
            for k, v in self.spaces[l].state_dict().items():
                out[f"spaces.{l}.{k}"] = v
            mem, patch = self.memory[l], self.neurons[l]
            for k in MEMORY_BUFFERS:
                out[f"memory.{l}.{k}"] = getattr(mem, k)
            for k in NEURON_BUFFERS:
                out[f"neurons.{l}.{k}"] = getattr(patch, k)
            for k in POOLS:
                out[f"{k}.{l}"] = getattr(self, k)[l]
        out.update({f"router.{k}": getattr(self.router, k) for k in ROUTER_BUFFERS})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def save(self, path) -> Path:
        """Write `unike.safetensors` and `unike.json` into the folder `path` (created if needed).

        Each file is written under a temporary name and then renamed, so a failed save leaves an earlier
        one whole; the JSON holds the tensor file's SHA-256, which `load` checks."""
        self._check_attached()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; save() writes a folder (unike.safetensors + unike.json): "
                                  "pass a folder path")
        path.mkdir(parents=True, exist_ok=True)
        tmp_state, tmp_meta = path / f".{STATE_FILE}.tmp", path / f".{CONFIG_FILE}.tmp"
        try:
            save_file(self.state(), str(tmp_state))
            meta = {"config": asdict(self.config), "layer_ids": self.layer_ids, "num_layers": len(self.stack),
                    "hidden_size": self.stack.hidden_size, "fitted": self.fitted, "n_edits": self.n_edits,
                    "fit_questions": self._fit_questions, "model_class": type(self.model).__name__,
                    "sha256": _sha256(tmp_state)}
            tmp_meta.write_text(json.dumps(meta, indent=2))
            os.replace(tmp_state, path / STATE_FILE)
            os.replace(tmp_meta, path / CONFIG_FILE)
        finally:
            tmp_state.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, model: nn.Module, processor, path) -> "UniKE":
        """Rebuild an editor saved with `save` onto `model`: safetensors and JSON only, never pickle.

        The files, the JSON's fields and types, the checksum, and every tensor's name and shape are checked
        before the editor is kept; on any error the model is left as it was."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder; pass the folder written by editor.save()")
        for name in (STATE_FILE, CONFIG_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing; pass the folder written by editor.save()")
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            state = load_file(str(path / STATE_FILE))
        except Exception as err:
            raise ValueError(f"{path} holds a corrupt or truncated UniKE state ({err}); save it again") from err
        _check_meta(meta, path / CONFIG_FILE)
        if _sha256(path / STATE_FILE) != meta["sha256"]:
            raise ValueError(f"{path / STATE_FILE} does not match the checksum in {CONFIG_FILE}: the files come from "
                             "two different saves or one was altered; save the editor again")
        try:
            config = UniKEConfig(**meta["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path / CONFIG_FILE}: {err}") from None
        stack = locate(model, layers=config.layers_path)
        if (len(stack), stack.hidden_size) != (meta["num_layers"], meta["hidden_size"]):
            raise ValueError(f"the saved state is for a model with {meta['num_layers']} layers of width "
                             f"{meta['hidden_size']}; this model has {len(stack)} of width {stack.hidden_size}")
        if meta["model_class"] != type(model).__name__:
            warnings.warn(f"the saved state was made on a {meta['model_class']}, this model is a "
                          f"{type(model).__name__}; the edits only mean something on the same weights", stacklevel=2)
        editor = cls(model, processor, config)
        try:
            if meta["layer_ids"] != editor.layer_ids:
                raise ValueError(f"{CONFIG_FILE} lists layers {meta['layer_ids']}, but its config gives "
                                 f"{editor.layer_ids}; save the editor again")
            state, unindexed = editor._upgrade(state)
            editor._check_state(state, meta["n_edits"])
            editor._load_state(state)
            for l in unindexed:
                editor.memory[l].index()
        except Exception:
            editor.detach()
            raise
        editor.fitted, editor.n_edits = meta["fitted"], meta["n_edits"]
        editor._fit_questions = list(meta["fit_questions"])
        return editor

    def _upgrade(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[int]]:
        """What a state saved by an older version lacks: empty `prompt_negatives` pools (the option's
        default), an empty router (routing then off, with a warning), ζ′ decoders (new edits without ζ′,
        with a warning) and, where the memory's index has no residuals (none at any layer; older states have no
        index at all), an empty index, to be rebuilt from the saved keys after loading (the layers
        returned). Other states pass unchanged."""
        d = self.stack.hidden_size
        state = {**{f"prompt_negatives.{l}": torch.zeros(0, d) for l in self.layer_ids}, **state}
        old_zeta = [l for l in self.layer_ids if f"spaces.{l}.decoder" not in state]
        if old_zeta:
            warnings.warn("this state was saved when each edit learned its own W_ζ: its edits keep their ζ′, and "
                          "edits made after loading carry none (fit again for the fixed ζ′ = Dec(ζ))", stacklevel=3)
            for l in old_zeta:
                state[f"spaces.{l}.decoder"] = torch.zeros(self.config.truth_dim, d)
                state[f"neurons.{l}.truth"] = torch.zeros(0)
        if "router.keys" not in state:
            if self.config.route:
                warnings.warn("this state was saved before edits were routed (unike.router): its edits act "
                              "ungated, as then; loading it with route=False", stacklevel=3)
                self.config = replace(self.config, route=False)
            state = {**{f"router.{k}": v for k, v in EditRouter(d).state_dict().items()}, **state}
        if (any(f"memory.{l}.residual" in state for l in self.layer_ids)
                or any(f"memory.{l}.n_fit" not in state for l in self.layer_ids)):
            return state, []
        warnings.warn("this state was saved before the latent memory had its index (or the index's residuals); "
                      "rebuilding it from the saved keys (save the editor again to store it)", stacklevel=3)
        empty = {}
        for l in self.layer_ids:
            n_fit = int(state[f"memory.{l}.n_fit"])
            empty.update({f"memory.{l}.basis": torch.zeros(0, d), f"memory.{l}.coords": torch.zeros(n_fit, 0),
                          f"memory.{l}.residual": torch.zeros(n_fit)})
        return {**state, **empty}, list(self.layer_ids)

    def _check_state(self, state: dict[str, Tensor], n_edits: int) -> None:
        """A saved state has this editor's tensor names and shapes (sizes that grow with fit and edits, 0 in
        a fresh editor, excepted) and consistent counts."""
        template = self.state()
        missing, extra = sorted(set(template) - set(state)), sorted(set(state) - set(template))
        if missing or extra:
            raise ValueError(f"the saved state lacks {missing[:3]} and has unexpected {extra[:3]}: it belongs to "
                             "another editor layout or unike version; save it again")
        for k, t in template.items():
            v = state[k]
            if (v.dim() != t.dim() or v.is_floating_point() != t.is_floating_point()
                    or any(a != b and b != 0 for a, b in zip(v.shape, t.shape))):
                want = tuple("any" if b == 0 else b for b in t.shape)
                raise ValueError(f"saved tensor {k} is {v.dtype} {tuple(v.shape)}; this editor needs "
                                 f"{t.dtype} {want}: the state is from another model or was altered")
        for l in self.layer_ids:
            sizes = {k: state[f"memory.{l}.{k}"].shape[0] for k in ("keys", "values", "attn_values")}
            neurons = [state[f"neurons.{l}.keys"].shape[1], len(state[f"neurons.{l}.bias"]),
                       len(state[f"neurons.{l}.values"]), len(state[f"neurons.{l}.zeta"]) * self.config.n_neurons]
            edits = len(state[f"neurons.{l}.zeta"]) if self.config.intrinsic else n_edits
            n_fit = int(state[f"memory.{l}.n_fit"])
            if (len(set(sizes.values())) > 1 or n_fit > sizes["keys"]
                    or {len(state[f"memory.{l}.{k}"]) for k in ("coords", "residual")} != {n_fit}
                    or state[f"memory.{l}.coords"].shape[1] != len(state[f"memory.{l}.basis"])
                    or len(set(neurons)) > 1 or edits != n_edits
                    or state[f"neurons.{l}.truth"].numel() not in (0, self.stack.hidden_size)):
                raise ValueError(f"the saved state of layer {l} is inconsistent (memory sizes {sizes}, n_fit "
                                 f"{int(state[f'memory.{l}.n_fit'])}, neurons {neurons}, {n_edits} edits): "
                                 "it was altered or truncated; save it again")
        routed, owner = len(state["router.has_image"]), state["router.owner"]
        if ({len(state[f"router.{k}"]) for k in ("images", "open")} != {routed}
                or len(owner) != len(state["router.keys"]) or (len(owner) and int(owner.max()) >= routed)
                or (self.config.intrinsic and self.config.route and routed != n_edits)):
            raise ValueError(f"the saved router is inconsistent ({routed} edits routed, {len(owner)} keys, "
                             f"{n_edits} edits): it was altered or truncated; save it again")

    def _load_state(self, state: dict[str, Tensor]) -> None:
        def cast(t: Tensor, device) -> Tensor:   # the state is fp32; a hand-made one may not be
            return t.to(device, torch.float32) if t.is_floating_point() else t.to(device)

        for l in self.layer_ids:
            dev = self.spaces[l].standardize.mean.device
            sp = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"spaces.{l}.")}
            self.spaces[l].load_state_dict(sp)
            mem, patch = self.memory[l], self.neurons[l]
            for k in MEMORY_BUFFERS:
                setattr(mem, k, cast(state[f"memory.{l}.{k}"], dev))
            for k in NEURON_BUFFERS:
                setattr(patch, k, cast(state[f"neurons.{l}.{k}"], dev))
            for k in POOLS:
                getattr(self, k)[l] = cast(state[f"{k}.{l}"], "cpu")
        dev = self.router.mean.device
        for k in ROUTER_BUFFERS:
            setattr(self.router, k, cast(state[f"router.{k}"], dev))


META_FIELDS = {"config": dict, "layer_ids": list[int], "num_layers": int, "hidden_size": int, "fitted": bool,
               "n_edits": int, "fit_questions": list[str], "model_class": str, "sha256": str}


def _check_meta(meta, where: Path) -> None:
    """unike.json has every field with its type, and its config no field UniKEConfig lacks."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where} holds a {type(meta).__name__}, not a UniKE record; save the editor again")
    wrong = [f"{k} (needs {t if typing.get_origin(t) else t.__name__})" for k, t in META_FIELDS.items()
             if not _conforms(meta.get(k), t)]
    if wrong:
        raise ValueError(f"{where} has missing or mistyped fields: {', '.join(wrong)}; "
                         "it was altered or written by another tool; save the editor again")
    unknown = sorted(set(meta["config"]) - {f.name for f in fields(UniKEConfig)})
    if unknown:
        raise ValueError(f"{where} sets config fields UniKEConfig does not have: {unknown}; it was written by "
                         "another unike version or altered; remove them or save the editor again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
