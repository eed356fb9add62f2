"""The embedded tiny VLM: a 2.6M-parameter LLaVA trained on `SynthWorld(seed=0)`, shipped in `weights/`."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def load_tiny(device="cpu", dtype=None, path=None):
    """(model, processor) of the shipped tiny VLM, model in eval mode; `path` overrides the shipped folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(path) if path is not None else WEIGHTS
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"tiny model weights not found in {folder}; reinstall unike, or train them with "
            f"`python -m unike.tiny.train --out {folder}`")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


__all__ = ["load_tiny", "WEIGHTS"]
