"""UniKEConfig: every choice of the method, checked when it is made (docs/method.md says which come from
the paper and which are ours). Annotations are evaluated (no `from __future__ import annotations`), so
each field's `type` is the type its value is checked against."""

import typing
import warnings
from dataclasses import dataclass, fields, replace

from beartype import BeartypeConf
from beartype.door import is_bearable

ZETA_CHOICES = ("truthful", "semantic", "random", "none")
READ_CHOICES = ("shift", "heads")
_TOWER = BeartypeConf(is_pep484_tower=True)     # an int is a float, as in Python's numeric tower


def conforms(value, hint) -> bool:
    """isinstance() for annotations (unions, list[int], ...): an int is a float; a bool is neither an int nor a
    float unless the annotation names bool."""
    if bool not in (hint, *typing.get_args(hint)) and any(isinstance(v, bool) for v in
                                                        (value if isinstance(value, (list, tuple)) else [value])):
        return False
    return is_bearable(value, hint, conf=_TOWER)


@typing.no_type_check        # checked by __post_init__, whose errors name the fix (not by an import-time checker)
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
    replay: bool = True                  # an edit's steps compute what they share once: the modules before the
                                         # edited layers (unike.replay), the first edited layer's committed edits
                                         # (exact speed-ups); False: every step in full
    edit_lr: float = 0.05                # Adam step relative to each tensor's scale (keys, values: hidden rms)
    margin_pos: float = 2.0              # pre-activation on the edit's own positions ≥ this
    margin_neg: float = 1.0              # pre-activation on unrelated FFN inputs ≤ −this
    act_weight: float = 1.0
    neg_weight: float = 1.0
    neg_memory_size: int = 4096          # FFN inputs kept from fit() as negatives for the activation loss
    key_ridge: float | None = 0.1        # None: keys along q − μ (T-Patcher); else the ridge of Σ⁻¹(q − μ)
    memory_positives: bool = True        # fit inputs that are the same knowledge as the edit train the neurons to fire
    own_answer_negatives: bool = True    # each neuron silent at the edit's other answer positions (ours)
    image_negatives: int = 16            # other fit questions over the edit's image, as negatives (EditCase edits)
    neg_exclude_cos: float = 0.9         # negatives this close to the edit input are not pushed down
    prompt_negatives: int = 0            # FFN inputs at the image tokens of fit prompts (other images' patches) kept
                                         # from fit() as negatives for the activation loss; 0: off
    route: bool = True                   # gate each edit's neurons by its scope, read at the first edited layer
                                         # (unike.router; ours); False: the paper's ungated neurons
    route_question: float = 0.85         # standardised cosine to one of the edit's target positions ≥ this
    route_image: float = 0.7             # and cosine of the prompt's image code to the edit's ≥ this
    route_lookalikes: bool = True        # raise each edit's image threshold above the fit look-alikes its question
                                         # test passes (other knowledge), up to route_image_max (ours)
    route_image_max: float = 0.8
    route_rivals: bool = True            # edits whose questions overlap, that hold other knowledge and whose images
                                         # are within a radius of each other each open only nearer their own image
                                         # (GRACE's split of overlapping scopes; ours)
    route_asked: bool = True             # and an earlier edit whose radius lets a new edit's image in, asked its
                                         # question over it by the base model, is its rival where the answer differs
    route_updates: bool = True           # and where it is the same and their questions overlap, the new edit updates
                                         # that edit's knowledge: it takes precedence wherever it opens (ours)
    route_subject: bool = True           # an edit without an image opens only where its subject (its prompt's word
                                         # rarest among the fit prompts its question test passes) has occurred in
                                         # the prompt; a later one of the same subject updates it (unike.subject; ours)
    scoped_negatives: bool = True        # with route: train each edit only against the negatives its gate reaches
    # external knowledge (latent memory)
    latent: bool = True
    latent_read: str = "shift"           # "heads": each head attends over the retrieved entries' own keys and
                                         # values (unike.reading); "shift": one value for every head (ours).
                                         # Read when the editor is built, like fixed_alpha
    top_k: int = 40                      # paper: 40
    temperature: float = 0.1
    write_edit_to_memory: bool = True
    fitted_knowledge: bool = False       # tokens about fitted knowledge (not an edit's) shift toward it too; off:
                                         # only edits' knowledge acts (with a dynamic α; ours)
    relevance_quantile: float | None = 0.99  # with fitted_knowledge: α = 0 where the best fitted match is below this
                                             # quantile of the prompt tokens' (not question-final) best matches
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
        for f in fields(self):
            value = getattr(self, f.name)
            if not conforms(value, f.type):
                want = f.type.__name__ if isinstance(f.type, type) else f.type
                raise TypeError(f"UniKEConfig.{f.name} = {value!r} ({type(value).__name__}) must be {want}")
        for names, ok, rule in ((_AT_LEAST_ONE, lambda v: v >= 1, "at least 1"), (_POSITIVE, lambda v: v > 0, "> 0"),
                                (_NON_NEGATIVE, lambda v: v >= 0, ">= 0")):
            bad = [f"{n}={getattr(self, n)}" for n in names if not ok(getattr(self, n))]
            if bad:
                raise ValueError(f"UniKEConfig: {', '.join(bad)} must be {rule}")
        if self.zeta not in ZETA_CHOICES:
            raise ValueError(f"zeta must be one of {ZETA_CHOICES}, not {self.zeta!r}")
        if self.latent_read not in READ_CHOICES:
            raise ValueError(f"latent_read must be one of {READ_CHOICES}, not {self.latent_read!r}")
        if not (self.intrinsic or self.latent):
            raise ValueError("intrinsic and latent are both off: nothing would be edited; enable one")
        bad = [f"{n}={getattr(self, n)}" for n in ("route_question", "route_image", "route_image_max")
               if not -1 <= getattr(self, n) <= 1]
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


def edited_layers(config: UniKEConfig, n: int) -> tuple[UniKEConfig, list[int]]:
    """The indices of the edited layers of a decoder of n layers: `layers` is a count of last layers (more
    than n: all n, with a warning) or explicit indices (negative ones count from the end)."""
    if isinstance(config.layers, int) and config.layers > n:
        warnings.warn(f"layers={config.layers} but the decoder has {n} layers: editing all {n}", stacklevel=3)
        config = replace(config, layers=n)
    ids = list(range(n - config.layers, n)) if isinstance(config.layers, int) else sorted(config.layers)
    if not ids or any(not -n <= i < n for i in ids) or (isinstance(config.layers, int) and not 0 < config.layers <= n):
        raise ValueError(f"layers={config.layers!r} is out of range for a decoder of {n} layers; "
                         f"pass a count in 1..{n} or indices in 0..{n - 1}")
    return config, sorted({i % n for i in ids})
