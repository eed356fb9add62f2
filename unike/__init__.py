"""unike: UniKE multimodal knowledge editing for any Hugging Face VLM, through forward hooks."""

from .data.case import EditCase, Triplet
from .editor import UniKE, UniKEConfig
from .hooks import Hooks
from .locate import LocateError, TextStack, locate
from .metrics import evaluate

__version__ = "0.1.0"

__all__ = ["EditCase", "Triplet", "UniKE", "UniKEConfig", "Hooks", "LocateError", "TextStack", "locate",
           "evaluate", "SynthWorld", "load_tiny", "answer", "load_mmedit"]


def __getattr__(name):
    # the embedded world, the tiny model and MMEdit I/O load on first use
    if name == "SynthWorld":
        from .data.world import SynthWorld
        return SynthWorld
    if name == "load_tiny":
        from .tiny import load_tiny
        return load_tiny
    if name == "answer":
        from .answer import answer
        return answer
    if name == "load_mmedit":
        from .data.mmedit import load_mmedit
        return load_mmedit
    raise AttributeError(f"module 'unike' has no attribute {name!r}")
