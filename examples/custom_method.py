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
    as by MPFL, so the model's overall density ends slightly above the target.
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
    print(f"accuracy {result.summary['final_accuracy']:.4f} at density {result.summary['final_density']:.3f}")
