"""One registry type for everything a user can plug in by name: datasets, models, mask
criteria, consensus rules, methods, aggregators and attacks.

Every registry normalises names the same way (registering and looking up ignore case and
surrounding blanks; a config names an entry by its registered, lower-case name), raises the
same `UnknownNameError` with a suggestion for a name it does not know, and keeps an entry's
properties on the registered object itself, so a config's allowed values are simply a
registry's names.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError):
    """A name that no entry of a registry has; the message lists the names and suggests the closest."""


def normalise(name: str) -> str:
    """The key a name is registered and looked up under: stripped and lower-case."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a registered name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def _origin(entry: object) -> str:
    """Where a registered entry comes from: built into mpfl, or the file of the plug-in that registered it."""
    module = getattr(entry, "__module__", None) or ""
    if module == "mpfl" or module.startswith("mpfl."):
        return "built in"
    file = getattr(sys.modules.get(module), "__file__", None)
    return f"by {file}" if file else f"by module {module}" if module else "by a plug-in"


class Registry(Generic[T]):
    """Named entries of one kind, in registration order (built-in entries first)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._reads: dict[str, frozenset[str]] = {}

    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = (), replace: bool = False,
                 reads: Iterable[str] | None = None) -> T:
        """Add `entry` under `name` (and `aliases`); an existing name is refused unless `replace`.
        `reads` names the run settings the entry uses (see `reads`)."""
        key = normalise(name)
        if any(sep in key for sep in ("/", "\\")):
            raise ConfigError(f"a {self.kind} name cannot hold '/' or '\\' ({key!r}): run and study folders are named "
                              "after it")
        if not replace and (key in self._entries or key in self._aliases):
            first = self._entries[self._aliases.get(key, key)]
            raise ConfigError(f"a {self.kind} named {key!r} is already registered ({_origin(first)}); choose another "
                              f"name (or pass replace=True to swap it for yours)")
        self._entries[key] = entry
        for alias in aliases:
            self._aliases[normalise(alias)] = key
        if reads is None:
            self._reads.pop(key, None)
        else:
            self._reads[key] = _names(reads, f"{self.kind} {key!r}")
        return entry

    def reads(self, name: str) -> frozenset[str] | None:
        """The run settings entry `name` was registered as using (e.g. a consensus rule's `tau`), so
        `mpfl run` can say when a flag has no effect; None where its registration did not say."""
        return self._reads.get(self.canonical(name))

    def canonical(self, name: str) -> str:
        """The registered name `name` stands for; UnknownNameError if none."""
        key = normalise(name) if isinstance(name, str) and name.strip() else ""
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        hint = difflib.get_close_matches(key, list(self._entries) + list(self._aliases), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(self._entries)}.{extra}")

    def get(self, name: str) -> T:
        """The entry registered under `name` or one of its aliases."""
        return self._entries[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(name.strip()) and (
            normalise(name) in self._entries or normalise(name) in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> tuple[dict[str, T], dict[str, str], dict[str, frozenset[str]]]:
        """The current entries, to `restore` later (tests undo their registrations with it)."""
        return dict(self._entries), dict(self._aliases), dict(self._reads)

    def restore(self, snapshot: tuple[dict[str, T], dict[str, str], dict[str, frozenset[str]]]) -> None:
        """Return to the entries of an earlier `snapshot`."""
        self._entries, self._aliases, self._reads = (dict(part) for part in snapshot)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def check_callable(fn: Callable, kind: str, name: str, form: str, *args: Any, **kwargs: Any) -> None:
    """Refuse, as it is registered, a plug-in function that could not be called as `form` (with
    `args` and `kwargs`): it would otherwise fail with a bare TypeError once a run is under way."""
    if not callable(fn):
        raise ConfigError(f"{kind} {name!r} must be a function {form}, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-in callables have no signature to check
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{kind} {name!r}: {getattr(fn, '__name__', type(fn).__name__)}{signature} cannot be called as "
                          f"{form} ({exc}); give it those parameters") from None


def _names(reads: Iterable[str] | str, owner: str) -> frozenset[str]:
    """`reads` as a set of names (one name given as a string is that name, not its letters)."""
    try:
        names = frozenset([reads] if isinstance(reads, str) else reads)
    except TypeError:  # not iterable, or holding something unhashable
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{owner}: reads = {reads!r} must be setting names, such as ('tau',)")
    return names


def checked_reads(reads: Iterable[str] | None, settings: Iterable[str], kind: str, name: str) -> frozenset[str] | None:
    """A plug-in's declared `reads` as a set, once each is one of the `settings` it is given; None stays None
    (it did not say)."""
    if reads is None:
        return None
    declared = _names(reads, f"{kind} {name!r}")
    if unknown := sorted(map(repr, declared - set(settings))):
        raise ConfigError(f"{kind} {name!r}: reads = {', '.join(unknown)} is not a setting it is given; name some of "
                          f"{', '.join(sorted(settings))}")
    return declared


def accepted_keywords(fn: Callable, names: Iterable[str]) -> list[str]:
    """Those of `names` that `fn` takes as keyword arguments (all of them if it takes **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return list(names)
    named = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return [name for name in names if name in named]


ALL: list[Registry] = []


def registry(kind: str) -> Registry:
    """A new registry, listed in `ALL` so tests can snapshot and restore every registry at once."""
    reg: Registry = Registry(kind)
    ALL.append(reg)
    return reg
