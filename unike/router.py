"""Each edit's scope, decided where no edit has moved the states (ours; docs/method.md, "Routing").

An edit's neurons are gated, in every edited layer, by a test read at the input of the *first* edited
layer, which no edit changes:

    g_e(t) = [max_j ẑ(x_t)·k_ej ≥ τ_q] ∧ [ĉ(x)·c_e ≥ r_e]

ẑ(x_t) is the state at position t standardised by the fit questions' statistics and normalised; k_ej are
the same for the edit's own target positions (the question's last token and the answer's); ĉ is the mean
over the prompt's image tokens, centred on the fit images' mean and normalised, and c_e the edit's; r_e is
the edit's image radius, τ_img or above it to keep out the fit's look-alikes (`lookalike_radius`). A
test whose centre is the edit's own state (every fit prompt the edit's) is not made for that edit. An
edit without an image skips the image test and takes a subject test instead (`unike.subject`,
`UniKEConfig.route_subject`): it opens only where its subject's words have occurred in the prompt. An edit
with an image never fires on a prompt without one. The
image code is a property of the whole prompt: `UniKE` computes it where the image tokens are and keeps it
with the KV cache for the generated tokens, so cached and uncached generation agree.

Rivals split overlapping scopes, as GRACE splits overlapping codebook balls: two edits whose question
tests overlap, that hold other knowledge and whose images lie within a radius of each other
(`split`) each open only where the prompt's image is closer to their own image than to the other's.
A later edit that updates an earlier one's knowledge (their question tests overlap, and the base model
answers the earlier edit's question over the new image as over its own) takes precedence instead: the
earlier edit closes wherever the later one opens (`precede`), so the newest value of a fact wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .grow import append
from .subject import WIDTH, none, rarest


class EditRouter(nn.Module):
    """The per-edit gate g_e of the first edited layer (`UniKEConfig.route`)."""

    def __init__(self, dim: int, tau_question: float = 0.85, tau_image: float = 0.7, tau_image_max: float = 0.8):
        super().__init__()
        self.tau_question, self.tau_image, self.tau_image_max = tau_question, tau_image, tau_image_max
        self.register_buffer("mean", torch.zeros(dim))          # fit questions' last-token states
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("image_mean", torch.zeros(0))      # fit images' code mean; empty: no images seen
        self.register_buffer("keys", torch.zeros(0, dim))       # ẑ of every edit's target positions
        self.register_buffer("owner", torch.zeros(0, dtype=torch.long))  # the edit of each key
        self.register_buffer("images", torch.zeros(0, dim))     # c_e (zeros where the edit has no image)
        self.register_buffer("has_image", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("radius", torch.zeros(0))                  # each edit's image threshold (≥ τ_img)
        self.register_buffer("open", torch.zeros(0, dtype=torch.bool))  # edits whose state is the fit mean
        # the fit negatives' ẑ and image codes (the rows every edited layer keeps as negatives), so that a new
        # edit can tell which of them its gate will reach (`UniKEConfig.scoped_negatives`)
        self.register_buffer("negatives", torch.zeros(0, dim))
        self.register_buffer("negative_images", torch.zeros(0, dim))
        self.register_buffer("negative_has", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("rows", torch.zeros(0, dtype=torch.long))   # their fit rows (memory entries)
        # (e, j): edit e opens only where the prompt's image is closer to c_e than to c_j (`split`)
        self.register_buffer("rivals", torch.zeros(0, 2, dtype=torch.long))
        # (j, e): edit j, whose knowledge the later edit e updates, is closed wherever e opens (`precede`)
        self.register_buffer("yields", torch.zeros(0, 2, dtype=torch.long))
        # each edit's subject (`unike.subject`: WIDTH token ids, -1 padded; none for an edit with an image) and
        # the fit negatives' prompt words (distinct token ids, flat, and the negative of each), to choose it
        self.register_buffer("subject", torch.zeros(0, WIDTH, dtype=torch.long))
        self.register_buffer("negative_words", torch.zeros(0, dtype=torch.long))
        self.register_buffer("negative_word_rows", torch.zeros(0, dtype=torch.long))

    @property
    def edits(self) -> int:
        return len(self.has_image)

    @torch.no_grad()
    def fit(self, questions: Float[Tensor, "n d"], images: Float[Tensor, "n d"], has: Bool[Tensor, " n"],
            picks: Tensor, words: list[Tensor] | None = None) -> None:
        """Statistics of the fit prompts: their last-token states, their image states (where `has`), and
        the scope features of the rows `picks` that the edited layers keep as negatives (with `words`, each
        fit prompt's `unike.subject.prompt_words`, their words)."""
        self.mean, self.std = questions.mean(0).to(self.mean), questions.std(0).clamp_min(1e-5).to(self.std)
        self.image_mean = images[has].mean(0).to(self.mean) if has.any() else self.mean.new_zeros(0)
        self.negatives = self.standardize(questions[picks].to(self.mean))
        self.negative_has = has[picks].to(self.mean.device)
        self.rows = picks.to(self.mean.device)
        self.negative_images = (self.image_code(images[picks].to(self.mean)) * self.negative_has[:, None]
                                if has.any() else torch.zeros_like(self.negatives))
        kept = [words[i] for i in picks.tolist()] if words is not None and len(words) == len(questions) else []
        self.negative_words = torch.cat([w.long() for w in kept] + [self.rows.new_zeros(0)]).to(self.mean.device)
        self.negative_word_rows = torch.arange(len(kept)).repeat_interleave(
            torch.tensor([len(w) for w in kept], dtype=torch.long)).to(self.mean.device)
        self.truncate(0)

    def standardize(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return F.normalize((x.float() - self.mean.to(x.device)) / self.std.to(x.device), dim=-1)

    def image_code(self, image: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return F.normalize(image.float() - self.image_mean.to(image.device), dim=-1)

    def entry(self, targets: Float[Tensor, "p d"],
              image: Float[Tensor, " d"] | None) -> tuple[Float[Tensor, "p d"], Float[Tensor, " d"], bool, bool]:
        """One edit's keys k_ej, image code c_e, whether it has an image test and whether it is open (no
        question test: its state is the fit mean)."""
        targets = targets.to(self.keys.device).float()
        seen = image is not None and len(self.image_mean) > 0 and not _at(image.to(self.keys), self.image_mean)
        code = self.image_code(image.to(self.keys.device)) if seen else self.images.new_zeros(self.images.shape[1])
        return self.standardize(targets), code, seen, _at(targets / self.std, self.mean / self.std)

    @torch.no_grad()
    def lookalike_radius(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None,
                         apart: Bool[Tensor, " m"]) -> float:
        """A new edit's image threshold: above the image code of every fit negative its question test passes
        that holds other knowledge (`apart`, e.g. `training.unrelated` over the fit negatives), so that the
        look-alikes among the fit prompts are kept out, but never above the fit prompts of the same
        knowledge (other renderings of the edited fact) nor above `tau_image_max`; τ_img where there are no
        look-alikes."""
        keys, code, seen, is_open = self.entry(targets, image)
        if not seen or is_open or len(self.negatives) != len(apart):
            return self.tau_image
        near = (self.negatives @ keys.T >= self.tau_question).any(-1) & self.negative_has
        apart = apart.to(near.device)
        sims = self.negative_images @ code
        if not (near & apart).any():
            return self.tau_image
        radius = float(sims[near & apart].max()) + 1e-3
        if (near & ~apart).any():
            radius = min(radius, float(sims[near & ~apart].min()))
        return max(self.tau_image, min(radius, self.tau_image_max))

    @torch.no_grad()
    def subject_of(self, words: Int[Tensor, " w"], targets: Float[Tensor, "p d"],
                   apart: Bool[Tensor, " m"] | None = None) -> Int[Tensor, " s"] | None:
        """An edit's subject (`unike.subject.rarest`): among its prompt's `words`, those in the fewest fit
        negatives its question test passes (that hold other knowledge, given `apart`), then in the fewest
        fit negatives; None where there are no words to choose from (or the router kept none of them)."""
        keys = self.standardize(targets.to(self.keys.device))
        near = (self.negatives @ keys.T >= self.tau_question).any(-1)
        if apart is not None and len(apart) == len(near):
            near = near & apart.to(near.device)
        subject = rarest(words, self.negative_words, self.negative_word_rows, near)
        return None if bool((subject < 0).all()) else subject

    def holding(self, subject: Int[Tensor, " s"] | None) -> Bool[Tensor, " m"] | None:
        """Which fit negatives' prompts hold every word of `subject`; None where that is not known."""
        if subject is None or not len(self.negative_words):
            return None
        words = subject[subject >= 0].to(self.negative_words.device)
        hit = (self.negative_words[:, None] == words[None]).any(1).float()
        count = hit.new_zeros(len(self.negatives)).index_add_(0, self.negative_word_rows, hit)
        return count == len(words)

    def same_subject(self, targets: Float[Tensor, "p d"], subject: Int[Tensor, " s"] | None) -> Int[Tensor, " j"]:
        """The committed edits with this very `subject` whose question tests overlap that of `targets`: a
        text-only edit of the same knowledge, which a new one updates (`precede`)."""
        if subject is None:
            return self.owner[:0]
        keys = self.standardize(targets.to(self.keys.device))
        return (self._overlap(keys) & (self.subject == subject.to(self.subject.device)).all(1)).nonzero()[:, 0]

    @torch.no_grad()
    def add(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None, everywhere: bool = False,
            radius: float | None = None, subject: Int[Tensor, " s"] | None = None) -> None:
        """Enter one edit: its states at the target positions and its image code (None: no image);
        `everywhere`: let it act at every position (the speed bench's synthetic edits); `radius`: its image
        threshold (None: τ_img); `subject`: its subject (`unike.subject`; None: none)."""
        keys, code, seen, is_open = self.entry(targets, image)
        append(self, "subject", (none() if subject is None else subject).to(self.subject)[None])
        append(self, "radius", self.radius.new_tensor([self.tau_image if radius is None else radius]))
        append(self, "open", self.open.new_tensor([everywhere or is_open]))
        append(self, "keys", keys)
        append(self, "owner", self.owner.new_full((len(keys),), self.edits))
        append(self, "images", code[None])
        append(self, "has_image", self.has_image.new_tensor([seen]))

    @torch.no_grad()
    def reaches(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None, z: Float[Tensor, "m d"],
                codes: Float[Tensor, "m d"] | None = None, has: Bool[Tensor, " m"] | None = None,
                radius: float | None = None, holds: Bool[Tensor, " m"] | None = None) -> Bool[Tensor, " m"]:
        """Where a new edit (its target states and image, its image threshold `radius`, None: τ_img) would be
        let through: at standardised states z of prompts with image codes `codes` (`has`: which have an
        image; None: the edit's own prompt) and, for an edit with a subject, `holds` (whether each prompt
        holds it there; None: not known, so it counts as held)."""
        keys, code, seen, is_open = self.entry(targets, image)
        z = z.to(keys)
        held = torch.ones(len(z), dtype=torch.bool, device=z.device) if holds is None else holds.to(z.device)
        if is_open:
            return held
        near = (z @ keys.T >= self.tau_question).any(-1) & held
        if not seen or codes is None:
            return near
        return near & has.to(near.device) & (codes.to(code) @ code >= (self.tau_image if radius is None else radius))

    def negative_scope(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None, fit: int,
                       prompt: Float[Tensor, "r d"], extra: Float[Tensor, "s d"] | None = None,
                       radius: float | None = None, subject: Int[Tensor, " s"] | None = None,
                       prompt_holds: Bool[Tensor, " r"] | None = None) -> Bool[Tensor, " m"]:
        """Which of a new edit's negatives its gate will reach, in `train_neurons`' order: the `fit`
        negatives, the earlier edits' target positions, the edit's own prompt positions and `extra` ones
        (other questions over the edit's image; both raw states, tested on their question). Negatives whose
        features this router lacks (a state saved before it kept them) count as reached. `radius`: the
        edit's image threshold; `subject`: its subject, and `prompt_holds`: where its own prompt holds it.
        An earlier edit's positions count as holding the subject unless that edit has another one."""
        fit_ok = (self.reaches(targets, image, self.negatives, self.negative_images, self.negative_has, radius,
                               self.holding(subject))
                  if len(self.negatives) == fit else torch.ones(fit, dtype=torch.bool, device=self.keys.device))
        other = torch.zeros_like(self.has_image)
        if subject is not None:
            other = (self.subject >= 0).any(1) & ~(self.subject == subject.to(self.subject.device)).all(1)
        earlier = self.reaches(targets, image, self.keys, self.images[self.owner], self.has_image[self.owner], radius,
                               ~other[self.owner])
        own = self.reaches(targets, image, self.standardize(prompt.to(self.keys.device)), holds=prompt_holds)
        extra = own[:0] if extra is None else self.reaches(targets, image, self.standardize(extra.to(own.device)))
        return torch.cat([fit_ok, earlier, own, extra])

    @torch.no_grad()
    def changed(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None,
                radius: float | None = None, subject: Int[Tensor, " s"] | None = None) -> Tensor:
        """The fit rows (memory entries) a new edit's gate reaches, whose facts it changes; none where the
        router lacks their features or the gate would reach every one (an edit at the fit mean)."""
        if not len(self.rows) or len(self.rows) != len(self.negatives):
            return self.rows[:0]
        hit = self.reaches(targets, image, self.negatives, self.negative_images, self.negative_has, radius,
                           self.holding(subject))
        return self.rows[:0] if hit.all() else self.rows[hit]

    @torch.no_grad()
    def split(self, apart: Bool[Tensor, " e"]) -> Tensor:
        """Make the newest edit and each earlier one rivals where their question tests overlap (a target state
        of one within τ_q of one of the other's) and they hold other knowledge (`apart`, per earlier edit)
        (`rival`). Returns the new (e, j) pairs."""
        e = self.edits - 1
        overlap = self._overlap(self.keys[self.owner == e])
        overlap[e] = False
        js = overlap.nonzero().squeeze(1)
        return self.rival(e, js[apart.to(js.device)[js]])

    @torch.no_grad()
    def within(self, e: int) -> Tensor:
        """The other edits with an image within a radius of edit e's (theirs or e's): where rivals may be."""
        if not self.has_image[e] or self.open[e]:
            return self.owner[:0]
        near = self._near(self.images[e], self.radius[e])
        near[e] = False
        return near.nonzero().squeeze(1)

    def _near(self, code: Float[Tensor, " d"], radius: Tensor | float) -> Bool[Tensor, " e"]:
        return (self.images @ code >= self.radius.clamp_max(float(radius))) & self.has_image & ~self.open

    @torch.no_grad()
    def neighbours(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None,
                   radius: float | None = None) -> tuple[Tensor, Bool[Tensor, " j"]]:
        """For a new edit, before `add`: the committed edits with an image within a radius of its own (theirs
        or its, as `within`), and which of them its question test overlaps (a target state of one within
        τ_q of one of the other's, as `split`)."""
        keys, code, seen, is_open = self.entry(targets, image)
        if not seen or is_open:
            return self.owner[:0], self.has_image[:0]
        js = self._near(code, self.tau_image if radius is None else radius).nonzero().squeeze(1)
        return js, self._overlap(keys)[js]

    def _overlap(self, keys: Float[Tensor, "p d"]) -> Bool[Tensor, " e"]:
        """Which edits' question tests overlap the one of `keys` (standardised target states): a key of the
        edit within τ_q of one of `keys`."""
        hit = (self.keys @ keys.T >= self.tau_question).any(-1).float()
        return hit.new_zeros(self.edits).index_add_(0, self.owner, hit) > 0

    def questions(self) -> Bool[Tensor, " k"]:
        """Which keys are an edit's first (the state at its question's last token): one per edit."""
        starts = torch.ones_like(self.owner, dtype=torch.bool)
        starts[1:] = self.owner[1:] != self.owner[:-1]
        return starts

    @torch.no_grad()
    def precede(self, e: int, js: Tensor) -> None:
        """Edit e updates the knowledge of each earlier edit of `js`: where e opens, they close."""
        self.yields = torch.cat([self.yields, torch.stack([js, torch.full_like(js, e)], 1)])

    @torch.no_grad()
    def rival(self, e: int, js: Tensor) -> Tensor:
        """Make edit e and each edit of `js` (of other knowledge) rivals wherever the image of one lies within
        the other's radius: that edit then opens only where the prompt's image is closer to its own than to
        the other's. Pairs already there are not repeated; returns the new (e, j) pairs."""
        js = js[torch.isin(js, self.within(e))]
        cos = self.images[js] @ self.images[e]
        pairs = torch.cat([torch.stack([torch.full_like(js, e), js], 1)[cos >= self.radius[e]],
                           torch.stack([js, torch.full_like(js, e)], 1)[cos >= self.radius[js]]])
        pairs = pairs[~(pairs[:, None] == self.rivals[None]).all(-1).any(-1)]
        self.rivals = torch.cat([self.rivals, pairs])
        return pairs

    @torch.no_grad()
    def truncate(self, edits: int) -> None:
        """Keep the first `edits` edits (0: none)."""
        keep = self.owner < edits
        self.keys, self.owner = self.keys[keep], self.owner[keep]
        self.images, self.has_image, self.open = self.images[:edits], self.has_image[:edits], self.open[:edits]
        self.radius, self.rivals = self.radius[:edits], self.rivals[(self.rivals < edits).all(1)]
        self.yields, self.subject = self.yields[(self.yields < edits).all(1)], self.subject[:edits]

    def forward(self, x: Float[Tensor, "b t d"], image: Float[Tensor, "b d"] | None,
                has: Bool[Tensor, " b"] | None = None,
                holds: Bool[Tensor, "b t e"] | None = None) -> Bool[Tensor, "b t e"]:
        """g_e(t) for every committed edit; `image`: the prompts' mean image-token states, `has`: which
        prompts show an image (None: unknown, e.g. a model fed embeddings; the image test is then skipped);
        `holds`: whether each edit's subject has occurred up to each position (`unike.subject.named`; None:
        not known, skipped).
        An edit with rivals passes the image test only where the image is closer to its own than to theirs.
        The image test comes first, and only the keys of edits it lets through somewhere are tested, so
        that the cost follows the edits near the prompts' images rather than every edit committed."""
        b, t, _ = x.shape
        dev, owner, is_open = x.device, self.owner.to(x.device), self.open.to(x.device)
        let = torch.ones(b, self.edits, dtype=torch.bool, device=dev)          # the image test, per prompt
        if has is not None and len(self.image_mean):
            sims = self.image_code(image) @ self.images.to(dev).T                # [b, e]
            same = (sims >= self.radius.to(dev)) & has[:, None]
            if len(self.rivals):                                                 # closer to a rival: not e's
                e, j = self.rivals.to(dev).T
                same = same & ~(sims.new_zeros(sims.shape).index_add_(1, e, (sims[:, e] < sims[:, j]).float()) > 0)
            let = same | ~self.has_image.to(dev)
        tested = (let.any(0) & ~is_open)[owner].nonzero().squeeze(1)            # keys worth the question test
        z = self.standardize(x) @ self.keys.to(dev)[tested].T >= self.tau_question   # [b, t, keys tested]
        near = x.new_zeros(b, t, self.edits, dtype=torch.float).index_add_(-1, owner[tested], z.float()) > 0
        gate, (js, later) = (near | is_open) & let[:, None], self.yields.to(dev).T
        if holds is not None:
            gate = gate & holds.to(dev)
        return yield_to(gate, js, gate[..., later])

    def extra_repr(self) -> str:
        return (f"edits={self.edits}, tau_question={self.tau_question}, tau_image={self.tau_image}, "
                f"tau_image_max={self.tau_image_max}")


def yield_to(gate: Bool[Tensor, "... e"], js: Tensor, later: Bool[Tensor, "... j"]) -> Bool[Tensor, "... e"]:
    """Close each edit js[i] of `gate` wherever the later edit it yields to opens (`later[..., i]`); an edit
    that yields to several closes where any of them opens."""
    if not len(js):
        return gate
    closed = gate.new_zeros(gate.shape, dtype=torch.float).index_add_(-1, js, later.float()) > 0
    return gate & ~closed


def image_codes(x: Float[Tensor, "b t d"],
                mask: Bool[Tensor, "b t"]) -> tuple[Float[Tensor, "b d"], Bool[Tensor, " b"]]:
    """Mean state over each row's image tokens, and which rows have any (rows without: zeros)."""
    m = mask.to(x.device, x.dtype)[..., None]
    return (x * m).sum(1).float() / m.sum(1).clamp_min(1).float(), mask.any(1).to(x.device)


def _at(x: Float[Tensor, "... d"], centre: Float[Tensor, " d"]) -> bool:
    """Whether some row of x is the centre itself (as when every fit prompt was the edit's own): its
    direction from the centre means nothing, so that test is not made for the edit."""
    return bool(((x - centre).norm(dim=-1) <= 1e-4 * x.norm(dim=-1).clamp_min(1e-12)).any())

