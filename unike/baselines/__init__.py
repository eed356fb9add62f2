"""Baseline editing methods with UniKE's interface (`model`, `processor`, `fit`, `edit`, `reset`,
`disabled`, `detach`), so `unike.evaluate` treats every method alike.

* `FTLast`: fine-tune the last decoder layer's FFN on the target (FT-L).
* `TPatcher`: key-value neurons in the last layer only (T-Patcher), a fixed `UniKEConfig`.
* `GRACE`: a codebook of keys with a deferral radius at one layer's MLP down-projection (GRACE).
* `LatentIKE`: the latent memory alone (paper Table 4 row 2), a fixed `UniKEConfig`.
* `PromptIKE`: vanilla in-context editing with retrieved text demonstrations; `inner=` adds another
  method underneath (Table 4 row 3: intrinsic + vanilla prompt IKE).
"""
from .configured import LatentIKE, TPatcher
from .ft_last import FTLast
from .grace import GRACE
from .prompt_ike import PromptIKE

__all__ = ["FTLast", "TPatcher", "GRACE", "LatentIKE", "PromptIKE"]
