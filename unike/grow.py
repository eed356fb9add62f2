"""Buffers that grow by appending, as a Python list does: each keeps spare room behind it, so appending m
rows copies m rows rather than every row so far (`NeuronPatch.commit`, `LatentMemory.add`: a lifelong
editor's commit would otherwise cost more with every edit). The buffer stays a plain tensor, a view of the
first rows of its room; replaced by another tensor (load, `to`, truncation), it starts a new room.
"""
from __future__ import annotations

from torch import Tensor, nn


def append(module: nn.Module, name: str, new: Tensor, dim: int = 0) -> None:
    """Set buffer `name` of `module` to itself with `new` appended along `dim`."""
    old = getattr(module, name).movedim(dim, 0)
    new = new.movedim(dim, 0).to(old)
    rooms = module.__dict__.setdefault("_rooms", {})
    room, n, m = rooms.get(name), len(old), len(new)
    if room is None or not _front(old, room) or n + m > len(room):
        size = n + m + (n + m) // 8 + 8         # an eighth spare, as a Python list: amortised O(m), and a
        room = rooms[name] = old.new_empty(size, *old.shape[1:])   # fitted memory not doubled in size
        room[:n] = old
    room[n:n + m] = new
    setattr(module, name, room[:n + m].movedim(0, dim))


def _front(old: Tensor, room: Tensor) -> bool:
    """Whether `old` is the first rows of `room` (what `append` last set)."""
    return (old.data_ptr() == room.data_ptr() and old.shape[1:] == room.shape[1:] and old.stride() == room.stride()
            and old.dtype == room.dtype and old.device == room.device)
