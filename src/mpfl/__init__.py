"""mpfl: Masked Pruning over Federated Learning.

Nodes agree on a sparse pruning mask by exchanging only masks, then train the federated
model on that mask, so every training message carries only the kept weights.

    from mpfl import Config, simulate
    result = simulate(Config().with_overrides({"model": "cnn", "sparsity": 0.9}))
    print(result.summary["final_accuracy"], result.summary["bytes_up"])

The names below are imported on first use, so `import mpfl.codec` or `import mpfl.config`
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_EXPORTS = {
    "Config": "config",
    "RunResult": "sim",
    "simulate": "sim",
    "Method": "methods",
    "MaskedMethod": "methods",
    "OneShotMethod": "methods",
    "register_method": "methods",
    "register_aggregator": "core.aggregate",
    "register_attack": "attacks",
    "register_criterion": "core.masks",
    "register_dataset": "data",
    "register_model": "models",
    "register_rule": "core.consensus",
    "register_task": "node",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import an exported name, or a submodule (`mpfl.data`), when it is first used."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
