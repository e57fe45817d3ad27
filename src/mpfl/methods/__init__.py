"""Federated methods as registered classes; `method_of(cfg)` is the one a config names.

Add your own with `register_method(MyMethod)` (see `mpfl.methods.base.Method` for the hooks
and examples/custom_method.py for a complete plug-in, examples/random_vote.py for one whose nodes
do work of their own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..registry import Registry, registry
from .base import MaskedMethod, Method, OneShotMethod
from .baselines import Centralized, FedAvg, FedAvgPrune, Random, Ssfl, TopK
from .mpfl import Local, Mpfl

if TYPE_CHECKING:
    from ..config import Config
    from ..protocol import Step

METHODS: Registry[type[Method]] = registry("method")


def register_method(cls: type[Method] | None = None, *, replace: bool = False) -> Any:
    """Make a `Method` subclass runnable as `cls.name`; as a class decorator, ``@register_method``
    or ``@register_method(replace=True)`` (to swap a registered method for yours)."""
    if cls is None:
        return lambda decorated: register_method(decorated, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"register_method needs a Method subclass with a name, got {cls!r}")
    if "name" not in vars(cls):
        raise ConfigError(f"method class {cls.__name__} has no name of its own (it inherits {cls.name!r}): set "
                          f"name = \"...\" in the class, the name runs choose it by")
    return METHODS.register(cls.name, cls, replace=replace)


for _cls in (Mpfl, FedAvg, FedAvgPrune, TopK, Centralized, Random, Local, Ssfl):
    register_method(_cls)


def method_of(cfg: Config) -> Method:
    """The method `cfg.method` names, set up for `cfg`."""
    return METHODS.get(cfg.method)(cfg)


def plan(cfg: Config) -> list[Step]:
    """The rounds of a run (the same on the server and on every node)."""
    return method_of(cfg).plan()


__all__ = ["METHODS", "MaskedMethod", "Method", "OneShotMethod", "method_of", "plan", "register_method"]
