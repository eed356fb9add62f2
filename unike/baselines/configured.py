"""Baselines that are UniKE with some switches fixed: T-Patcher and latent IKE alone."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..config import UniKEConfig
from ..editor import UniKE


class _Configured(UniKE):
    """UniKE whose config fixes the fields in `FIXED`; other fields may change (keyword arguments or a
    config that agrees on the fixed ones, as `load` passes)."""

    FIXED: dict = {}

    def __init__(self, model: nn.Module, processor=None, config: UniKEConfig | None = None, **changes):
        config = replace(config or UniKEConfig(**self.FIXED), **changes)
        wrong = {k: getattr(config, k) for k, v in self.FIXED.items() if getattr(config, k) != v}
        if wrong:
            raise ValueError(f"{type(self).__name__} fixes {', '.join(f'{k}={self.FIXED[k]!r}' for k in wrong)} "
                             f"(got {wrong}); for other settings use unike.UniKE(model, processor, UniKEConfig(...))")
        super().__init__(model, processor, config)


class TPatcher(_Configured):
    """T-Patcher (Huang et al., 2023): `n_neurons` key-value neurons per edit in the last decoder layer's
    FFN, keys initialised along q − μ, trained on the target with T-Patcher's activation and memory
    losses; the memory is the FFN inputs of the fit questions (`fit` builds only that). No latent
    memory, no spaces, no ζ, and our additions that have a switch are off: the neurons act ungated (no
    router), every memory input is pushed down, same-knowledge ones included (`neg_exclude_cos` above any
    cosine), no memory positives, no image negatives, no negatives at the edit's own answer positions."""

    FIXED = dict(layers=1, latent=False, collaboration=False, zeta="none", key_ridge=None, route=False,
                 image_negatives=0, memory_positives=False, neg_exclude_cos=2.0, own_answer_negatives=False)


class LatentIKE(_Configured):
    """Latent IKE alone (paper Table 4 row 2): the fitted latent memory with the edit written into it and
    dynamic α from the semantic space; no neurons. Needs `fit` before `edit`."""

    FIXED = dict(intrinsic=False, collaboration=True, fixed_alpha=None, write_edit_to_memory=True)

    def edit(self, item, *, progress: bool = False) -> dict[str, float]:
        self._check_attached()
        if not self.fitted:
            raise RuntimeError("LatentIKE edits through the latent memory, which fit(triplets) builds; "
                               "call fit() before edit()")
        return super().edit(item, progress=progress)
