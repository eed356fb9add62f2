"""unike: UniKE multimodal knowledge editing for any Hugging Face VLM, through forward hooks."""

from . import baselines
from .answer import answer
from .config import UniKEConfig
from .data.case import EditCase, Triplet
from .data.mmedit import load_mmedit
from .data.world import SynthWorld
from .editor import UniKE
from .hooks import Hooks
from .locate import LocateError, TextStack, locate
from .metrics import evaluate
from .tiny import load_tiny

__version__ = "0.1.0"

__all__ = ["EditCase", "Triplet", "UniKE", "UniKEConfig", "Hooks", "LocateError", "TextStack", "locate",
           "evaluate", "SynthWorld", "load_tiny", "answer", "load_mmedit", "baselines"]
