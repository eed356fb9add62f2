"""One small manager for forward hooks and pre-hooks that removes exactly what it added.

    with Hooks() as h:
        h.forward(layer.mlp, lambda mod, args, out: out * 2)
        model(**inputs)
    # every hook added through `h` is gone; hooks registered by other code are untouched

Hooks registered on a module fire on every call, so they fire at each `generate` step, with and without
the KV cache (the prefill step sees the whole prompt, cached steps see one new token).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """Registers forward (pre-)hooks and remembers their handles; `remove()` is idempotent."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False,
                prepend: bool = False) -> RemovableHandle:
        """`fn(module, args, output) -> new output or None` (with_kwargs: `fn(module, args, kwargs, output)`)."""
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self._handles.append(handle)
        return handle

    def pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False,
            prepend: bool = False) -> RemovableHandle:
        """`fn(module, args) -> new args or None`
        (with_kwargs: `fn(module, args, kwargs) -> (args, kwargs) or None`)."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook this manager added, newest first. Safe to call twice."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
