"""`EditMethod`: what `unike.evaluate` and `unike bench` need of an editing method. `UniKE` and every
baseline (`unike.baselines`) satisfy it, so they are scored alike (tests/test_baselines.py checks it)."""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class EditMethod(Protocol):
    """An editor attached to `model`: `fit` once (a method that needs no triplets ignores them), then
    `edit` one fact at a time (calls accumulate), `reset` to drop every edit, `disabled()` for the unedited
    model, `detach` to give the model back as it was."""

    model: nn.Module
    processor: Any

    def fit(self, triplets: Iterable, *, progress: bool = True) -> EditMethod: ...

    def edit(self, item, *, progress: bool = False) -> dict[str, Any]:
        """Edit one fact (an `EditCase`, or an inputs dict with labels where the method takes one)."""
        ...

    def reset(self) -> EditMethod: ...

    def disabled(self) -> AbstractContextManager[nn.Module]: ...

    def detach(self) -> nn.Module: ...
