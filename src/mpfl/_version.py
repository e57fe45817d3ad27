"""The installed package's version (pyproject.toml is its one source), in a leaf module that
the run records can import without importing the rest of the package."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpfl")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
