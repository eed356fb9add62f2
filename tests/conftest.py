import sys
from pathlib import Path

import pytest
import torch

# One thread: tiny models are dominated by per-op overhead, and two threads on two shared cores thrash.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_states():
    """The shipped tiny model's states of `SynthWorld(seed=0).triplets(n=300, seed=3)`, collected once per
    test process (with the image-token inputs `prompt_negatives` needs; editors without the option ignore
    them). `fit_states` keeps the spaces it trains in them, so modules fitting with the same encoder
    settings train them once."""
    import unike

    model, processor = unike.load_tiny()
    collector = unike.UniKE(model, processor, unike.UniKEConfig(prompt_negatives=1))
    states = collector.collect(unike.SynthWorld(seed=0).triplets(n=300, seed=3), progress=False)
    collector.detach()
    return states
