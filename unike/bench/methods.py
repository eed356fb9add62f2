"""The method registry of `unike bench`: names → editing methods with UniKE's interface.

Every method has `.model`, `.processor`, `edit(case)`, `reset()`, `disabled()` and, where it needs one,
`fit(triplets, progress=)` and `detach()`. Names:

* ``base`` — the unedited model;
* ``unike`` — UniKE with the default `UniKEConfig`;
* ``ftlast``, ``tpatcher``, ``grace``, ``promptike``, ``latentike`` — the baselines of `unike.baselines`;
* ablations through `UniKEConfig` (paper Table 4, Fig. 4): ``intrin-only``, ``latent-only``,
  ``intrin+prompt-ike`` (prompt IKE around an intrinsic-only UniKE), ``no-collab``, ``zeta-none``,
  ``zeta-random``, ``zeta-semantic`` and ``alpha-<x>`` (a fixed α = x in [0, 1]);
* our additions switched off: ``unrouted`` (the paper's ungated neurons), ``no-subject`` (text-only edits
  gated by their question test alone).
"""
from __future__ import annotations

import inspect
import re

import torch

from ..config import UniKEConfig
from ..editor import UniKE
from ..metrics import Unedited

MAIN = ("base", "ftlast", "tpatcher", "grace", "promptike", "latentike", "unike")
ABLATIONS = ("intrin-only", "latent-only", "intrin+prompt-ike", "no-collab")
ZETAS = ("zeta-none", "zeta-random", "zeta-semantic")
ALPHAS = ("alpha-0.0", "alpha-0.2", "alpha-0.4", "alpha-0.6", "alpha-0.8")
OURS = ("unrouted", "no-subject")   # our additions to the paper's method, switched off one at a time
GROUPS = {"main": MAIN, "ablations": ABLATIONS, "zeta": ZETAS, "alpha": ALPHAS, "ours": OURS,
          "all": MAIN + ABLATIONS + ZETAS + ALPHAS + OURS}
BASELINES = {"ftlast": "FTLast", "tpatcher": "TPatcher", "grace": "GRACE", "promptike": "PromptIKE",
             "latentike": "LatentIKE"}
VARIANTS = {  # UniKEConfig switches of each UniKE variant
    "unike": {}, "intrin-only": {"latent": False}, "latent-only": {"intrinsic": False},
    "no-collab": {"collaboration": False}, "zeta-none": {"zeta": "none"}, "zeta-random": {"zeta": "random"},
    "zeta-semantic": {"zeta": "semantic"}, "unrouted": {"route": False}, "no-subject": {"route_subject": False},
}
ALPHA = re.compile(r"alpha-(\d+(?:\.\d+)?)$")


def expand(names: str | list[str]) -> list[str]:
    """Method names from a comma list that may hold group names (main, ablations, zeta, alpha, all);
    unknown names raise before anything runs."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for name in (n.strip() for n in items if n.strip()):
        for m in GROUPS.get(name, (name,)):
            check(m)
            if m not in out:
                out.append(m)
    if not out:
        raise ValueError("no method given; pass e.g. --methods unike,tpatcher")
    return out


def check(name: str) -> None:
    if name in MAIN or name in VARIANTS or name == "intrin+prompt-ike":
        return
    m = ALPHA.match(name)
    if m and 0.0 <= float(m.group(1)) <= 1.0:
        return
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(GROUPS['all'])}, alpha-<x> with x in "
                     f"[0, 1], or a group: {', '.join(GROUPS)}")


def config_of(name: str, seed: int) -> UniKEConfig | None:
    """The UniKEConfig of a UniKE variant (None for other methods)."""
    if name in VARIANTS:
        return UniKEConfig(seed=seed, **VARIANTS[name])
    if name == "intrin+prompt-ike":
        return UniKEConfig(seed=seed, latent=False)
    m = ALPHA.match(name)
    return UniKEConfig(seed=seed, fixed_alpha=float(m.group(1))) if m else None


def baselines_module():
    try:
        from .. import baselines
    except ImportError as err:
        raise ImportError(f"the baselines (ftlast, tpatcher, grace, promptike, latentike) need unike.baselines, "
                          f"which could not be imported ({err}); run only UniKE and its ablations, e.g. "
                          "--methods unike,ablations") from err
    return baselines


def takes_seed(cls) -> bool:
    """Whether a baseline's constructor takes `seed=` (the UniKE-configured ones pass it to UniKEConfig)."""
    params = inspect.signature(cls).parameters.values()
    return any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in params)


def build(name: str, model, processor, seed: int = 0):
    """A fresh, unfitted method attached to `model` (seeded)."""
    check(name)
    torch.manual_seed(seed)
    if name == "base":
        return Unedited(model, processor)
    if name in BASELINES:
        cls = getattr(baselines_module(), BASELINES[name])
        return cls(model, processor, **({"seed": seed} if takes_seed(cls) else {}))
    config = config_of(name, seed)
    if name == "intrin+prompt-ike":
        return baselines_module().PromptIKE(model, processor, inner=UniKE(model, processor, config))
    return UniKE(model, processor, config)


def fit(method, triplets, seed: int = 0, progress: bool = True) -> None:
    """Fit a method that has a fit step (memory, spaces, demonstrations); others need none."""
    if hasattr(method, "fit"):
        torch.manual_seed(seed)
        method.fit(triplets, progress=progress)


def release(method) -> None:
    """Detach a method (and a wrapped `inner` one) from its model: hooks, added modules, changed weights."""
    for m in (method, getattr(method, "inner", None)):
        if m is not None and hasattr(m, "detach"):
            m.detach()


def unike_of(method) -> UniKE | None:
    """The UniKE editor inside a method (itself, or the `inner` of a wrapper), if any."""
    if isinstance(method, UniKE):
        return method
    inner = getattr(method, "inner", None)
    return inner if isinstance(inner, UniKE) else None
