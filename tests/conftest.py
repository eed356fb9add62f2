import sys
from pathlib import Path

import torch

# One thread: tiny models are dominated by per-op overhead, and two threads on two shared cores thrash.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
