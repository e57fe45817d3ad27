"""mpfl: Masked Pruning over Federated Learning.

Nodes agree on a sparse pruning mask by exchanging only masks, then train the federated
model on that mask, so every training message carries only the kept weights.

    from mpfl import Config, simulate
    result = simulate(Config().with_overrides({"model": "cnn", "sparsity": 0.9}))
    print(result.summary["final_accuracy"], result.summary["bytes_up"])
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .core.consensus import register_rule  # noqa: E402
from .core.masks import register_criterion  # noqa: E402
from .data import register_dataset  # noqa: E402
from .models import register_model  # noqa: E402
from .sim import RunResult, simulate  # noqa: E402

__all__ = ["Config", "RunResult", "simulate", "register_criterion", "register_dataset", "register_model", "register_rule"]
