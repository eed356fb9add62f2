import sys
from pathlib import Path

import pytest
import torch

# One thread: tiny models are dominated by per-op overhead, and two threads on two shared cores thrash
# (`make test` runs two test processes instead).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


# The longest modules first (measured, longest first), so that `make test`'s two processes (pytest-xdist,
# one module per process at a time) end together: test_unike_tiny alone is about half the suite.
LONGEST = ("test_unike_tiny", "03_editing", "01_quickstart", "02_contrastive_training", "04_interpretability",
           "test_bench", "test_router", "test_negatives", "test_pruning", "test_dtypes", "test_zeta")


def pytest_collection_modifyitems(items):
    """The notebooks (nbmake) run for a minute or more each: `slow`, like the heavy behaviour tests."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))      # stable: the rest keep their order


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
