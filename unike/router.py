"""Each edit's scope, decided where no edit has moved the states (ours; docs/method.md, "Routing").

An edit's neurons are gated, in every edited layer, by a test read at the input of the *first* edited
layer, which no edit changes:

    g_e(t) = [max_j ẑ(x_t)·k_ej ≥ τ_q] ∧ [ĉ(x)·c_e ≥ τ_img]

ẑ(x_t) is the state at position t standardised by the fit questions' statistics and normalised; k_ej are
the same for the edit's own target positions (the question's last token and the answer's); ĉ is the mean
over the prompt's image tokens, centred on the fit images' mean and normalised, and c_e the edit's. A
test whose centre is the edit's own state (every fit prompt the edit's) is not made for that edit. An
edit without an image skips the image test; an edit with one never fires on a prompt without one. The
image code is a property of the whole prompt: `UniKE` computes it where the image tokens are and keeps it
with the KV cache for the generated tokens, so cached and uncached generation agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn


class EditRouter(nn.Module):
    """The per-edit gate g_e of the first edited layer (`UniKEConfig.route`)."""

    def __init__(self, dim: int, tau_question: float = 0.85, tau_image: float = 0.7):
        super().__init__()
        self.tau_question, self.tau_image = tau_question, tau_image
        self.register_buffer("mean", torch.zeros(dim))          # fit questions' last-token states
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("image_mean", torch.zeros(0))      # fit images' code mean; empty: no images seen
        self.register_buffer("keys", torch.zeros(0, dim))       # ẑ of every edit's target positions
        self.register_buffer("owner", torch.zeros(0, dtype=torch.long))  # the edit of each key
        self.register_buffer("images", torch.zeros(0, dim))     # c_e (zeros where the edit has no image)
        self.register_buffer("has_image", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("open", torch.zeros(0, dtype=torch.bool))  # edits whose state is the fit mean

    @property
    def edits(self) -> int:
        return len(self.has_image)

    @torch.no_grad()
    def fit(self, questions: Float[Tensor, "n d"], images: Float[Tensor, "m d"]) -> None:
        """Statistics of the fit prompts: their last-token states and their image codes (m may be 0)."""
        self.mean, self.std = questions.mean(0).to(self.mean), questions.std(0).clamp_min(1e-5).to(self.std)
        self.image_mean = images.mean(0).to(self.mean) if len(images) else self.mean.new_zeros(0)
        self.truncate(0)

    def standardize(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return F.normalize((x.float() - self.mean.to(x.device)) / self.std.to(x.device), dim=-1)

    def image_code(self, image: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return F.normalize(image.float() - self.image_mean.to(image.device), dim=-1)

    @torch.no_grad()
    def add(self, targets: Float[Tensor, "p d"], image: Float[Tensor, " d"] | None, everywhere: bool = False) -> None:
        """Enter one edit: its states at the target positions and its image code (None: no image);
        `everywhere`: let it act at every position (the speed bench's synthetic edits)."""
        targets = targets.to(self.keys.device).float()
        seen = image is not None and len(self.image_mean) > 0 and not _at(image.to(self.keys), self.image_mean)
        everywhere = everywhere or _at(targets / self.std, self.mean / self.std)
        self.open = torch.cat([self.open, self.open.new_tensor([everywhere])])
        self.keys = torch.cat([self.keys, self.standardize(targets)])
        self.owner = torch.cat([self.owner, self.owner.new_full((len(targets),), self.edits)])
        code = self.image_code(image.to(self.keys.device)) if seen else self.images.new_zeros(self.images.shape[1])
        self.images = torch.cat([self.images, code[None]])
        self.has_image = torch.cat([self.has_image, self.has_image.new_tensor([seen])])

    @torch.no_grad()
    def truncate(self, edits: int) -> None:
        """Keep the first `edits` edits (0: none)."""
        keep = self.owner < edits
        self.keys, self.owner = self.keys[keep], self.owner[keep]
        self.images, self.has_image, self.open = self.images[:edits], self.has_image[:edits], self.open[:edits]

    def forward(self, x: Float[Tensor, "b t d"], image: Float[Tensor, "b d"] | None,
                has: Bool[Tensor, " b"] | None = None) -> Bool[Tensor, "b t e"]:
        """g_e(t) for every committed edit; `image`: the prompts' mean image-token states, `has`: which
        prompts show an image (None: unknown, e.g. a model fed embeddings; the image test is then skipped)."""
        z = self.standardize(x) @ self.keys.to(x.device).T                      # [b, t, keys]
        owner = F.one_hot(self.owner.to(x.device), self.edits).float()          # [keys, e]
        gate = ((z >= self.tau_question).float() @ owner > 0) | self.open.to(x.device)   # any key close
        if has is None or not len(self.image_mean):
            return gate
        same = (self.image_code(image) @ self.images.to(x.device).T >= self.tau_image) & has[:, None]  # [b, e]
        return gate & (same | ~self.has_image.to(x.device))[:, None]

    def extra_repr(self) -> str:
        return f"edits={self.edits}, tau_question={self.tau_question}, tau_image={self.tau_image}"


def image_codes(x: Float[Tensor, "b t d"],
                mask: Bool[Tensor, "b t"]) -> tuple[Float[Tensor, "b d"], Bool[Tensor, " b"]]:
    """Mean state over each row's image tokens, and which rows have any (rows without: zeros)."""
    m = mask.to(x.device, x.dtype)[..., None]
    return (x * m).sum(1).float() / m.sum(1).clamp_min(1).float(), mask.any(1).to(x.device)


def _at(x: Float[Tensor, "... d"], centre: Float[Tensor, " d"]) -> bool:
    """Whether some row of x is the centre itself (as when every fit prompt was the edit's own): its
    direction from the centre means nothing, so that test is not made for the edit."""
    return bool(((x - centre).norm(dim=-1) <= 1e-4 * x.norm(dim=-1).clamp_min(1e-12)).any())

