"""Plug-ins: modules that register datasets, models, criteria, rules, methods, aggregators,
attacks or node tasks when imported.

A config names its plug-ins (`plugins`: module names or paths of `.py` files), and every
process that builds the config imports them first: the CLI, the simulator's worker
processes and both Flower apps. Installed packages can also announce plug-ins under the
entry-point group ``mpfl.plugins`` (a module, imported, or a function, called); those are
loaded in every process too.

Each named plug-in's source file is hashed as it is imported (`fingerprints`), so a run's summary
says which code its plug-ins were, and a resumed run can tell when they changed; an installed
plug-in is named by its package and version (`installed_plugins`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import site
import sys
import sysconfig
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType, TracebackType

from .errors import ConfigError

ENTRY_POINT_GROUP = "mpfl.plugins"
_MODULE_PREFIX = "mpfl_plugin_"
_loaded: set[str] = set()
_digests: dict[str, str] = {}
_installed: dict[str, str] = {}
_files: set[Path] = set()


def load_plugins(names: Sequence[str] = ()) -> None:
    """Import the installed entry-point plug-ins (once per process), then each named plug-in (once)."""
    if ENTRY_POINT_GROUP not in _loaded:
        _loaded.add(ENTRY_POINT_GROUP)
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            before = set(sys.modules)
            try:
                loaded = entry.load()
            except Exception as exc:
                raise ConfigError(f"the installed mpfl plug-in {entry.name!r} ({entry.value}) failed to load: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if callable(loaded):
                loaded()
            _note_files(before, entry.module.split(".")[0])  # its whole package: installed, it is all the plug-in's
            if entry.dist is not None:
                _installed[entry.name] = f"{entry.dist.name} {entry.dist.version}"
    for name in names:
        key = str(Path(name).resolve()) if _is_path(name) else name
        if key not in _loaded:
            before = set(sys.modules)
            source = _import(name)
            _note_files(before, None if _is_path(name) else name)
            _loaded.add(key)
            if source is not None:
                _digests[key] = hashlib.sha256(source).hexdigest()


def fingerprints(names: Sequence[str]) -> dict[str, str]:
    """The sha256 of each named plug-in's source file as this process imported it (a module's own
    file, a package's `__init__.py`; none for a module without a file), by the name the config gives."""
    keys = {name: str(Path(name).resolve()) if _is_path(name) else name for name in names}
    return {name: _digests[key] for name, key in keys.items() if key in _digests}


def installed_plugins() -> dict[str, str]:
    """The entry-point plug-ins this process loaded, each as "package version" by its entry-point name."""
    return dict(_installed)


def _is_path(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def _already_imported(path: Path) -> bool:
    """Whether a script imported the file itself (``import mymethod``) before naming it as a plug-in: running it
    again would register its names twice. (Files this module imported are tracked by `_loaded`.)"""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not name.startswith(_MODULE_PREFIX) and file is not None and Path(file).resolve() == path:
            return True
    return False


def _run_as_path(name: str) -> ModuleType | None:
    """The module a `.py` plug-in path ran whose file module `name` is, if one did: importing it by
    name too would register its names twice."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin).resolve()
    return next((module for key, module in list(sys.modules.items()) if key.startswith(_MODULE_PREFIX)
                 and getattr(module, "__file__", None) and Path(module.__file__).resolve() == origin), None)


def _source(module: ModuleType) -> bytes | None:
    """The bytes of a module's own source file (a package's `__init__.py`), None if it has none."""
    file = getattr(module, "__file__", None)
    try:
        return Path(file).read_bytes() if file else None
    except OSError:
        return None


def _import(name: str) -> bytes | None:
    """Import a module by name, or a `.py` file by path, turning any failure into a ConfigError; return the
    source file's bytes (None for a module without a file)."""
    if not _is_path(name) and not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"plug-in {name!r} is neither a module name (Python identifiers joined by dots, such as "
                          "my_plugins.rules) nor the path of a .py file")
    if not _is_path(name) and name.split(".")[0] in sys.stdlib_module_names:  # imported instead of a file of that name
        raise ConfigError(f"plug-in {name!r} names a module of Python's standard library, which registers nothing; "
                          f"rename your module, or pass the path of its file (--plugins ./{name.replace('.', '/')}.py)")
    try:
        if not _is_path(name):
            if name not in sys.modules and (module := _run_as_path(name)) is not None:
                sys.modules[name] = module
            else:
                module = importlib.import_module(name)
            return _source(module)
        path = Path(name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {str(path)!r}")
        source = path.read_bytes()
        if _already_imported(path):
            return source
        module_name = f"{_MODULE_PREFIX}{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return source
    except ConfigError as exc:  # a registration the plug-in made was refused: say which plug-in made it
        raise type(exc)(f"{exc} (while importing plug-in {name!r})") from None
    except Exception as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and \
            (name == exc.name or name.startswith(exc.name + "."))  # the plug-in itself, or a package above it
        if isinstance(exc, FileNotFoundError) or missing:
            relative = _is_path(name) and not Path(name).expanduser().is_absolute()
            where = (f" (a relative path is read from the folder mpfl runs in, here {Path.cwd()}; for a recorded "
                     "run, that is the folder it was started in; or give an absolute path)" if relative else "")
            top = name.split(".")[0]
            if not _is_path(name) and exc.name == top and (Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file()):
                # `python -m mpfl` imports from the folder it runs in, the `mpfl` command does not
                fix = f"pass --plugins {name}.py" if "." not in name and Path(f"{name}.py").is_file() else \
                    "run PYTHONPATH=. mpfl ... or python -m mpfl ..."
                where = f" ({top} is in the folder mpfl runs in, which is not on the Python path of the mpfl command: {fix})"
            raise ConfigError(f"plug-in {name!r} could not be imported: {type(exc).__name__}: {exc}. Pass a module "
                              f"name on the Python path or the path of a .py file{where}") from exc
        if isinstance(exc, SyntaxError):  # raised by the compiler, so no frame of the traceback is in the bad file
            detail, where = exc.msg, f"{exc.filename}:{exc.lineno}"
        else:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            detail, where = str(exc), f"{frame.filename}:{frame.lineno}"
        raise ConfigError(f"plug-in {name!r} failed while it was imported: {type(exc).__name__}: {detail} (at {where}); "
                          "fix the plug-in") from exc


def _note_files(before: set[str], module: str | None) -> None:
    """Note as plug-in code the files of the modules a plug-in's import brought in (its own, and helpers of the
    user's it imports; not mpfl's, the standard library's nor installed packages'), and those of `module` and its
    submodules wherever they are (a plug-in named as a module, or an installed entry-point plug-in)."""
    library = _library_dirs()
    for name in set(sys.modules) - before:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and not _in_library(Path(file).resolve(), library):
            _files.add(Path(file).resolve())
    for name, loaded in list(sys.modules.items()):
        if module and (name == module or name.startswith(f"{module}.")) and getattr(loaded, "__file__", None):
            _files.add(Path(loaded.__file__).resolve())


def _library_dirs() -> list[Path]:
    """Where code that is no plug-in of the user's lives: mpfl, the standard library and installed packages."""
    paths = sysconfig.get_paths()
    dirs = [Path(__file__).parent, *(Path(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib"))]
    dirs += [Path(p) for p in site.getsitepackages()] + [Path(site.getusersitepackages())]
    return [d.resolve() for d in dirs]


def _in_library(file: Path, library: Sequence[Path]) -> bool:
    return any(file.is_relative_to(d) for d in library) or bool({"site-packages", "dist-packages"} & set(file.parts))


def plugin_files() -> set[Path]:
    """The source files of the plug-ins this process loaded: `.py` files named by path, the modules (with a
    package's submodules) named by module name or installed as entry points, and the helper modules of the
    user's they imported."""
    return {Path(key) for key in _loaded if Path(key).is_absolute()} | _files


def from_plugin_code(tb: TracebackType | None) -> TracebackType | None:
    """`tb` from its first frame in a plug-in's file (`plugin_files`), so that a plug-in's error shows its own
    frames, not the dozens of mpfl's that called it; None when no frame is a plug-in's (shown whole then)."""
    files = plugin_files()
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() not in files:
        tb = tb.tb_next
    return tb
