"""Compact export of a finished run, with its measured size, compute and latency, dense vs pruned.

The runner saves the final weights and mask beside the round records (`final.npz`); `mpfl export`
turns them into files a device can load:

    <out>/model.pt          state_dict: the shrunk dense model (filter masks) or the masked one
    <out>/model.sparse.pt   sparse: prunable weights as torch sparse CSR (int32 indices) or COO tensors
    <out>/model.ts          torchscript: the exported model, traced
    <out>/model.onnx        onnx: the exported model, batch size free (needs the onnx and onnxscript packages)
    <out>/mask.bin          the final mask in the codec's MASK format, coded over the full model
    <out>/export.json       what was written, parameters, bytes, FLOPs and latency, dense vs pruned

Filter masks on a flat sequential model give a shrunk dense model (default formats state_dict
and torchscript); other masks give sparse tensors (default format sparse). `load_export(out)`
gives the exported model back as a torch module (`load_export(out, "torchscript")` the traced one).
model.pt and model.sparse.pt load with ``torch.load(path, weights_only=True)`` too; model.ts is a
TorchScript archive, which only ``torch.jit.load`` reads. An export is all or nothing: its files are written
to a scratch folder inside <out> and moved into place (export.json last) only once all of them are,
replacing every file of an earlier export there; when anything fails, <out> is left as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import codec
from .checkpoint import FINAL, Final, load_final
from .compact import compactable, shrink, unsupported
from .config import MAX_THREADS, Config
from .core.params import ParamSpec, param_spec, set_weights
from .costs import flops, latency_ms, layer_flops, parameter_count
from .errors import ExportError, RunDirError
from .files import atomic_write, refuse_link, sync_folder
from .locks import LOCK, refuse_if_locked
from .methods import method_of
from .models import MODELS, build_model
from .records import CONFIG, SUMMARY, recorded_nothing, stopped_before_round_1
from .resume import read_config, refusal

EXPORT_JSON, MASK_FILE = "export.json", "mask.bin"
FILES = {"state_dict": "model.pt", "sparse": "model.sparse.pt", "torchscript": "model.ts", "onnx": "model.onnx"}
FORMATS = tuple(FILES)
OWNED = (EXPORT_JSON, MASK_FILE, *FILES.values())
"""Every file an export writes, export.json first: what an export with `force` replaces or removes."""
SCRATCH_PREFIX = ".export-"
MAX_LATENCY_BATCH = 4096
"""Most samples per timed forward pass: devices run small batches, and a big model (resnet18 on 32x32 images)
would need tens of GB for a much larger one."""
FLOPS_CONVENTION = "2 FLOPs per multiply-accumulate of Linear/Conv layers; biases, activations, pooling and norms not counted"


# --------------------------------------------------------------------------- files


def _serialize(obj: Any) -> bytes:
    """What torch.save writes for `obj`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


CSR_BETA = "Sparse CSR tensor support is in beta"
"""torch's warning on every CSR tensor made or loaded, which says nothing about the export."""


def _sparse(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A weight tensor as COO (its own shape) or CSR over its rows (int32 indices, shape restored on load)."""
    if layout == "coo":
        return t.to_sparse_coo()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CSR_BETA)
        csr = t.reshape(t.shape[0], -1).to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                       check_invariants=True)


def sparse_state(model: nn.Module, prunable: Sequence[str], layout: str = "csr") -> dict[str, torch.Tensor]:
    """A model's state_dict with the prunable weights stored as sparse tensors."""
    if layout not in ("csr", "coo"):
        raise ExportError(f"unknown sparse layout {layout!r}; choose csr or coo")
    chosen = set(prunable)
    return {k: _sparse(v, layout) if k in chosen else v for k, v in model.state_dict().items()}


def dense_state(state: dict[str, torch.Tensor], like: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict with sparse tensors turned back into dense ones of the model's shapes."""
    shapes = {k: v.shape for k, v in like.state_dict().items()}
    return {k: v.to_dense().reshape(shapes[k]) if v.layout != torch.strided and k in shapes else v for k, v in state.items()}


def _traced(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The model traced to TorchScript (torch.jit still works but warns that it is deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace(model.eval(), example)


def _check_onnx() -> None:
    """Refuse ONNX export up front when its packages are missing."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs the {' and '.join(missing)} package(s), which are not installed "
                          f"(pip install {' '.join(missing)}, or pip install -e \".[onnx]\" in a checkout); --format torchscript "
                          "works without them")


EXPORTER_LOGS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
"""Loggers of torch's ONNX exporters, silenced during an export: progress, warnings about operators of packages the
model does not use (torchvision's), and graph dumps when export fails."""


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, dynamo: bool | None = None) -> None:
    """The model as one self-contained ONNX file for batches of any size. `dynamo` picks torch's exporter
    (None: torch's default, the torch.export-based one from torch 2.9 on, the TorchScript one before);
    each is told in its own terms that the batch dimension is free and the weights go inside the file
    (the torch.export-based exporter would put them in a `.data` file beside it, which one exported
    file cannot carry). What the exporters log (`EXPORTER_LOGS`) would bury the export's own summary, so it is
    silenced; a failed export is an ExportError of one line."""
    parameters = inspect.signature(torch.onnx.export).parameters
    if dynamo is None:
        dynamo = "dynamo" in parameters and parameters["dynamo"].default is True
    if dynamo:
        options: dict[str, Any] = {"dynamo": True, "dynamic_shapes": ({0: "batch"},), "external_data": False}
    else:
        options = {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
        if "dynamo" in parameters:
            options["dynamo"] = False
    logs = {name: logging.getLogger(name) for name in EXPORTER_LOGS}
    levels = {name: log.level for name, log in logs.items()}
    for log in logs.values():
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's, in torch 2.9 on
            torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"], output_names=["logits"],
                              verbose=False, **options)
    except Exception as exc:  # the exporters raise many types, some with pages of graph dumps
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"torch's ONNX exporter could not export the model ({type(exc).__name__}: {first}); "
                          "--format torchscript or state_dict may work") from exc
    finally:
        for name, log in logs.items():
            log.setLevel(levels[name])


def _load_torch(path: Path) -> Any:
    """torch.load without pickled code, checking sparse tensors' indices before use."""
    with torch.sparse.check_sparse_tensor_invariants(enable=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CSR_BETA)
        return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- export


def _rebuild(info: dict) -> tuple[nn.Module, ParamSpec]:
    """The full-size model and spec an export was made from (weights not loaded)."""
    if info["model"] not in MODELS and info.get("plugins"):
        without = ("load its TorchScript file with torch.jit.load, which needs no plug-in" if "torchscript" in
                   info["files"] else "export it with --format torchscript too, for a file that loads without it")
        raise ExportError(f"the exported model {info['model']!r} comes from a plug-in of the run "
                          f"({', '.join(info['plugins'])}): import it first (mpfl.plugins.load_plugins([...])), or "
                          f"{without}")
    model = build_model(info["model"], tuple(info["input_shape"]), info["num_classes"])
    base = param_spec(model)
    chosen = set(info["prunable"])
    return model, replace(base, prunable=tuple(i for i, n in enumerate(base.names) if n in chosen))


def _check_timing(batch: int, repeats: int, threads: int) -> None:
    """Refuse latency settings that cannot give a measurement, before anything is read or written."""
    if not 1 <= batch <= MAX_LATENCY_BATCH:
        raise ExportError(f"--latency-batch {batch} is out of range: the latency is timed on 1 to {MAX_LATENCY_BATCH:,} "
                          "samples at once (a larger batch needs more memory than a device has); choose one in that range")
    if repeats < 1:
        raise ExportError(f"--repeats {repeats} must be at least 1: the latency is the median of that many timed "
                          "forward passes")
    if not 0 <= threads <= MAX_THREADS:
        raise ExportError(f"--threads {threads} must be from 0 to {MAX_THREADS} (0: as many as torch uses by default)")


def _refuse_running(run: Path) -> None:
    """Refuse a run that a process is still running: its final weights are not written yet, or about to change."""
    try:
        refuse_if_locked(run)
    except RunDirError:
        raise ExportError(f"{run} is a run that is still going (the process named in its {LOCK} is writing there); "
                          "export it once it has finished") from None


def _model_from_run(run: Path) -> tuple[Config, Final, nn.Module, ParamSpec, list[np.ndarray]]:
    """The run's config, final arrays, full-size model holding the masked final weights, its spec and mask."""
    if not run.exists():
        raise ExportError(f"{run} does not exist; give the folder of a finished run")
    if not run.is_dir():
        raise ExportError(f"{run} is a file; give the folder of a finished run" +
                          (f" ({run.parent})" if (run.parent / CONFIG).is_file() else ""))
    _refuse_running(run)
    if not (run / CONFIG).is_file():
        raise ExportError(f"{run} is not a run directory: it has no {CONFIG}")
    if not (run / FINAL).exists() and not (run / SUMMARY).exists():
        if recorded_nothing(run):
            raise ExportError(f"{run} holds a run that {stopped_before_round_1(run)}; there is nothing to export")
        why = refusal(run)
        raise ExportError(f"{run} holds a run that has not finished (it has no {SUMMARY} yet); "
                          + (f"it cannot be resumed either: {why}" if why else
                             f"finish it (a simulator run with mpfl run --resume {run}), then export it"))
    cfg = read_config(run)  # the plug-ins it names are compared with the run's record before any is imported
    final = load_final(run)
    try:
        model = build_model(cfg.train.model, final.input_shape, final.num_classes)
    except RuntimeError as exc:  # torch's: a crafted input shape or class count no model has
        raise ExportError(f"{run / FINAL} names an input shape {final.input_shape} and {final.num_classes} classes "
                          f"that model {cfg.train.model!r} cannot be built for ({exc}); rerun the run to write it again"
                          ) from None
    method = method_of(cfg)
    spec = param_spec(model, cfg.prune.exclude, structured=method.structured, keep=method.prunable_layers)
    if set(spec.names) != set(final.weights) or set(spec.prunable_names) != set(final.mask):
        raise ExportError(f"{run / FINAL} does not hold the tensors of model {cfg.train.model!r} as configured")
    bad = [n for n, s in zip(spec.names, spec.shapes) if final.weights[n].shape != s]
    bad += [n for n, s in zip(spec.prunable_names, spec.prunable_shapes) if final.mask[n].shape != s]
    if bad:
        raise ExportError(f"{run / FINAL}: tensors {', '.join(bad)} do not have the shapes of model {cfg.train.model!r}")
    mask = [final.mask[n] for n in spec.prunable_names]
    set_weights(model, spec, spec.apply([final.weights[n] for n in spec.names], mask))
    return cfg, final, model, spec, mask


def export_folder(out: Path, *, force: bool = False) -> Path:
    """The folder an export writes to, created if missing: one that already holds files (an earlier
    export) is refused unless `force`, and a path that cannot be a folder is a one-line error."""
    if out.is_symlink() and not out.exists():
        raise ExportError(f"{out} is a symbolic link to a missing folder; create that folder or choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if (out / CONFIG).is_file():
        raise ExportError(f"{out} is a run directory; an export needs a folder of its own (by default RUN_DIR/export)")
    for name in OWNED:
        refuse_link(out / name)
    held = sorted(p.name for p in out.iterdir() if not _is_scratch(p)) if out.is_dir() else []
    listed = _listed(out)
    theirs = [name for name in OWNED if name in held and name not in listed]
    if theirs:
        them = "them" if len(theirs) > 1 else "it"
        raise ExportError(f"{out} holds {', '.join(theirs)}, which no export there lists (in its {EXPORT_JSON}), so "
                          f"the export will not replace {them}, even with --force; move {them} or choose another --out")
    if held and not force:
        raise ExportError(f"{out} holds an earlier export; pass --force to replace it (other files there stay), or "
                          "choose another --out" if listed else f"{out} already holds files ({', '.join(held[:5])}"
                          f"{', ...' if len(held) > 5 else ''}); pass --force to write the export beside them, or "
                          "choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the export folder {out}: {exc.strerror}; choose another --out") from None
    return out


def _is_scratch(path: Path) -> bool:
    """Whether `path` is a scratch folder an export makes while it writes (one left behind was killed)."""
    return path.name.startswith(SCRATCH_PREFIX) and path.is_dir() and not path.is_symlink()


def _missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, innermost first: the folders an export would create."""
    return [p for p in (out, *out.parents) if not p.exists() and not p.is_symlink()]


def _listed(out: Path) -> set[str]:
    """The files the export in `out` wrote, as its export.json lists them (none without a readable one)."""
    try:
        files = json.loads((out / EXPORT_JSON).read_text())["files"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {EXPORT_JSON, *(name for name in files if name in OWNED)}


def _earlier_files(out: Path) -> list[str]:
    """The files of an earlier export in `out` (those its export.json lists: `export_folder` refused any other
    file by an export's name, and links), export.json first; a folder by such a name is refused."""
    found = []
    for name in OWNED:
        path = out / name
        if path.exists() and not path.is_file():
            raise ExportError(f"{path} is not a file, so the export cannot replace it; remove it or choose another --out")
        if path.exists():
            found.append(name)
    return found


def _commit(stage: Path, out: Path, earlier: Sequence[str]) -> None:
    """Move the files staged in `stage` (export.json last) into `out` in place of every file of the earlier export, so
    that `out` holds this export alone; if a move fails, every file goes back where it was (and if even that fails,
    the earlier files are kept in a folder the error names)."""
    new = sorted((p.name for p in stage.iterdir()), key=lambda name: name == EXPORT_JSON)
    aside = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX + "earlier-", dir=out))
    done: list[tuple[Path, Path]] = []
    try:
        for src, dst in [(out / n, aside / n) for n in earlier] + [(stage / n, out / n) for n in new]:
            os.replace(src, dst)
            done.append((src, dst))
    except BaseException:
        try:
            for src, dst in reversed(done):
                os.replace(dst, src)
        except OSError as exc:
            raise ExportError(f"the export failed while moving its files into place, and putting the earlier export "
                              f"back failed too ({exc.strerror}); its files are in {aside}") from exc
        aside.rmdir()
        raise
    shutil.rmtree(aside)
    sync_folder(out)


@contextlib.contextmanager
def _staged(out: Path, force: bool) -> Iterator[Path]:
    """A scratch folder inside the export folder `out` to write the whole export into: when the block ends its files
    replace the earlier export's at once, and when anything fails `out` is left as it was (not even created)."""
    missing = _missing_folders(out)
    try:
        export_folder(out, force=force)
        earlier = _earlier_files(out)
        for stale in [p for p in out.iterdir() if _is_scratch(p) and p.name.endswith(".tmp")]:
            shutil.rmtree(stale)  # left by an export that was killed while it wrote
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, suffix=".tmp", dir=out) as scratch:
            yield Path(scratch)
            _commit(Path(scratch), out, earlier)
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _model_bytes(fmt: str, model: nn.Module, example: torch.Tensor) -> bytes:
    """A model file's content in memory (TorchScript or ONNX), so it can be written like every other file."""
    if fmt == "torchscript":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(_traced(model, example), buf)
        return buf.getvalue()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / FILES["onnx"]
        _write_onnx(model, example, path)
        return path.read_bytes()


def _choose_formats(asked: Sequence[str] | None, compact: bool, dense: bool) -> tuple[list[str], str]:
    """The formats to write (`asked`, else the defaults) and the main one, whose model export.json
    describes: the smallest of the state_dict (a shrunk model, or a dense one) and the sparse
    tensors (a masked one), which is added when `asked` holds neither."""
    formats = list(dict.fromkeys(asked or (["state_dict", "torchscript"] if compact else
                                           ["state_dict"] if dense else ["sparse"])))
    unknown = [f for f in formats if f not in FILES]
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        _check_onnx()
    smallest = "state_dict" if compact or dense else "sparse"
    if not {"state_dict", "sparse"} & set(formats):
        formats.insert(0, smallest)
    return formats, smallest if smallest in formats else next(f for f in formats if f in ("state_dict", "sparse"))


def export_run(run_dir: str | Path, out: str | Path | None = None, *, formats: Sequence[str] | None = None,
               layout: str = "csr", batch: int = 1, repeats: int = 50, threads: int = 1, force: bool = False) -> dict:
    """Write a run's final model in compact form plus `export.json`, and return what export.json holds.
    An `out` folder that already holds files is refused unless `force`, which replaces the earlier export's files
    (and removes those this export does not write); no file is written through a link. The export is all or nothing:
    if any step fails, `out` is left as it was."""
    _check_timing(batch, repeats, threads)
    run = Path(run_dir)
    cfg, final, model, spec, mask = _model_from_run(run)
    structured = method_of(cfg).structured
    compact = structured and compactable(model)
    dropped = sum(int(m.size - m.sum()) for m in mask)
    dense = not dropped  # nothing pruned (fedavg, topk): sparse tensors would only add their indices
    formats, primary = _choose_formats(formats, compact, dense)
    small = shrink(model, spec, mask) if compact else None
    pruned = small.model if small is not None else model
    shrunk = compact and primary == "state_dict"  # export.json's figures describe the main file's model
    described = pruned if shrunk else model
    example = torch.zeros(1, *final.input_shape)

    with _staged(Path(out) if out is not None else run / "export", force) as stage:
        files = {"mask": MASK_FILE}
        atomic_write(stage / MASK_FILE, codec.encode_mask(mask, spec.full_mask(), round=0, structured=structured))
        payload = {"state_dict": lambda: _serialize(pruned.state_dict()),
                   "sparse": lambda: _serialize(sparse_state(model, spec.prunable_names, layout))}
        sizes = {}
        for fmt in formats:
            path = stage / FILES[fmt]
            atomic_write(path, payload[fmt]() if fmt in payload else _model_bytes(fmt, pruned, example))
            files[fmt] = FILES[fmt]
            sizes[fmt] = path.stat().st_size

        dense_layers = {f.layer: f for f in layer_flops(model, final.input_shape)}
        pruned_layers = {f.layer: f for f in layer_flops(described, final.input_shape)}
        info = {
            "run": str(run), "model": cfg.train.model, "plugins": list(cfg.plugins), "input_shape": list(final.input_shape),
            "num_classes": final.num_classes, "prunable": spec.prunable_names, "structured": structured,
            "compact": compact, "not_compact_because": None if compact or not structured else unsupported(model),
            "density": 1 - dropped / max(1, int(spec.prunable_sizes.sum())), "formats": formats, "primary": primary,
            "files": files, "file_bytes": sizes, "flops_convention": FLOPS_CONVENTION,
            "latency": {"batch": batch, "repeats": repeats, "statistic": "median", "threads": threads},
            "dense": {
                "parameters": parameter_count(model), "bytes": len(_serialize(model.state_dict())),
                "flops": flops(model, final.input_shape),
                "latency_ms": latency_ms(model, final.input_shape, batch=batch, repeats=repeats, threads=threads),
            },
            "pruned": {
                "parameters": parameter_count(described) - (0 if shrunk else dropped), "bytes": sizes[primary],
                "flops": flops(described, final.input_shape, nonzero=not shrunk),
                "latency_ms": latency_ms(described, final.input_shape, batch=batch, repeats=repeats, threads=threads),
                "latency_note": None if shrunk or dense else
                "dense kernels: a model that is not shrunk runs no faster for its zeros" if structured else
                "dense kernels: unstructured sparsity needs sparse kernels to run faster",
            },
            "layers": [{"layer": name, "type": f.kind, "dense_flops": f.flops,
                        "pruned_flops": (pruned_layers[name].flops if shrunk else f.nonzero_flops)}
                       for name, f in dense_layers.items()],
        }
        x = torch.randn(16, *final.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            info["max_abs_diff"] = float((model.eval()(x) - load_export(stage, primary, info)(x)).abs().max())
        atomic_write(stage / EXPORT_JSON, json.dumps(info, indent=2) + "\n")
    return info


def load_export(out: str | Path, fmt: str | None = None, info: dict | None = None) -> nn.Module:
    """Load an exported model (eval mode): `fmt` is state_dict, sparse or torchscript (default: the main file)."""
    out = Path(out)
    if info is None:
        path = out / EXPORT_JSON
        if not path.is_file():
            inside = f"; the run's own export is {out / 'export'}" if (out / "export" / EXPORT_JSON).is_file() else ""
            raise ExportError(f"{out} is not an export directory: it has no {EXPORT_JSON}{inside}")
        info = json.loads(path.read_text())
    fmt = fmt or info["primary"]
    if fmt not in info["files"]:
        raise ExportError(f"{out} holds no {fmt} export; it has {', '.join(f for f in info['files'] if f != 'mask')}")
    path = out / info["files"][fmt]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "onnx":
        raise ExportError("load ONNX files with an ONNX runtime, not with mpfl")
    model, spec = _rebuild(info)
    state = _load_torch(path)
    if info["compact"] and fmt == "state_dict":
        mask = codec.decode_mask((out / info["files"]["mask"]).read_bytes(), spec.full_mask(), structured=True).tensors
        model = shrink(model, spec, mask).model
    model.load_state_dict(dense_state(state, model))
    return model.eval()
