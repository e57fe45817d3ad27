"""A method of your own, as a plug-in: MPFL that never prunes the classifier layer.

    mpfl run --plugins examples/custom_method.py --method mpfl-dense-head
    mpfl run --plugins examples/custom_method.py --method mpfl-dense-head --workers 2

Importing this file registers the method. Naming it in `plugins` (``--plugins``, or
``plugins = [...]`` in a TOML config, or ``plugins = "..."`` in a Flower run config) makes
every process of a run import it first: the CLI, the simulator's worker processes and both
Flower apps. A method is a `mpfl.methods.Method` subclass that overrides the hooks it needs
(docs/architecture.md, "Write your own method"); this one overrides a single hook of MPFL.
"""

from __future__ import annotations

from collections.abc import Sequence

from mpfl.methods import register_method
from mpfl.methods.mpfl import Mpfl


@register_method
class MpflDenseHead(Mpfl):
    """MPFL whose last Linear / Conv layer (the classifier) is never pruned.

    Under label skew each node's local mask keeps the classifier weights of its own classes, and
    the vote starves the classes few nodes hold; the classifier is also the smallest layer (2,000
    of the mlp's 199,210 weights), so keeping it dense costs little. The other layers are pruned
    as by MPFL. The reported density (`final_density`) is that of the pruned layers, at the target;
    the whole model keeps slightly more (the summary's `params_kept`).
    """

    name = "mpfl-dense-head"
    description = "MPFL with a dense classifier layer"

    def prunable_layers(self, names: Sequence[str]) -> list[str]:
        """Every prunable tensor but the last, whose rows are the classes."""
        return list(names)[:-1]


if __name__ == "__main__":
    from mpfl import Config, simulate

    cfg = Config().with_overrides({"method": "mpfl-dense-head", "train_samples": 6000, "rounds": 5, "threads": 1})
    result = simulate(cfg)
    s = result.summary
    print(f"accuracy {s['final_accuracy']:.4f} at density {s['final_density']:.3f} of the pruned layers, "
          f"{s['params_kept'] / s['params_dense']:.3f} of the whole model")
