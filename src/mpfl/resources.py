"""How much memory a run will need, checked against what the machine has before the first round.

The estimate is a simple model of measured peaks (``VmHWM`` of a fresh process, all of MNIST,
1 mask + 1 training round, one torch thread):

==========  =====  ==============
model       nodes  peak (MiB)
==========  =====  ==============
mlp         1-100  645
mlp         1,000  2,071
mlp         3,000  5,323
cnn         10     694
cnn         100    1,879
==========  =====  ==============

A process with torch and mpfl imported holds about 225 MiB; loading a dataset briefly needs
about twice its normalised size (the raw file and the float copy); each node then costs about
two float32 copies of the model (its own weights between rounds and its decoded reply at the
server), 1.4-1.6 MiB for ``mlp`` and 13 MiB for ``cnn``. When rounds ask a sample of the nodes
(`--fraction`, `--mask-fraction`), only the nodes asked hold weights: the replies of one round,
and own weights of at most the nodes asked over the mask rounds; every other node costs a few
KiB (its data indices and node object). With 10 % sampling, 1,000 ``mlp`` nodes peaked at 669 MiB
and 10,000 at 1,568 MiB (docs/performance.md, "Cross-device scale"; estimates: 837 and 2,296 MiB).
The server also keeps every consensus mask of the run, a bit per weight each (`core.history`): one
per mask round and one per adaptation round, about 380 in a 1,000-round run (0.5 GB for resnet18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .data import DATASETS
from .errors import ResourceError
from .methods import method_of
from .models import build_model
from .parallel import worker_count

# Built-in datasets: image shape, classes, and train + test images held as float32.
DATASET_SIZES = {"mnist": ((1, 28, 28), 10, 70000), "fashion-mnist": ((1, 28, 28), 10, 70000),
                 "cifar10": ((3, 32, 32), 10, 60000), "cifar100": ((3, 32, 32), 100, 60000)}
PROCESS_BYTES = 256 * 2**20
NODE_OVERHEAD_BYTES = 64 * 2**10
IDLE_NODE_BYTES = 4 * 2**10
"""What a node that holds no weights costs: its data indices and its node object."""
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryEstimate:
    """Expected peak memory of a run in bytes, and its parts."""

    fixed: int
    """Everything but the nodes' weights: processes, data and the mask history."""
    per_node: int
    nodes: int
    """Nodes whose weights the run may hold at once: all of them, unless rounds ask a sample."""
    sampled: bool = False
    history: int = 0
    """The part of `fixed` that the server's mask history takes."""

    @property
    def total(self) -> int:
        return self.fixed + self.per_node * self.nodes


def per_node_bytes(params: int) -> int:
    """Memory each node adds: its own float32 weights and its decoded reply at the server (`topk`
    nodes also keep an error-feedback residual, a third copy that this leaves out: the check is
    meant to stop runs that cannot fit at all, not to size them exactly)."""
    return 2 * 4 * params + NODE_OVERHEAD_BYTES


def estimate_memory(cfg: Config, params: int, data_bytes: int) -> MemoryEstimate:
    """The peak memory of running `cfg` with a model of `params` parameters on `data_bytes` of
    normalised data (see the module docstring for the figures behind it)."""
    workers = worker_count(cfg)
    history = mask_versions(cfg) * math.ceil(params / 8)
    fixed = PROCESS_BYTES * (1 + (workers if workers > 1 else 0)) + 2 * data_bytes + history
    held = holding_nodes(cfg)
    if held >= cfg.nodes:
        return MemoryEstimate(fixed, per_node_bytes(params), cfg.nodes, history=history)
    return MemoryEstimate(fixed + IDLE_NODE_BYTES * cfg.nodes, per_node_bytes(params) // 2, held, sampled=True,
                          history=history)


def mask_versions(cfg: Config) -> int:
    """How many masks the server's history holds at the end of the run: the initial one, and one per round
    that may change the mask (mask rounds and adaptation rounds)."""
    method = method_of(cfg)
    return 1 + sum(1 for s in method.planned if s.phase == "mask" or method.swap_fraction(s) > 0)


def holding_nodes(cfg: Config) -> int:
    """How many float32 copies of the model nodes may hold at once: the replies of the largest
    round's sample, plus the own weights of the nodes asked in the round under way and, for every
    mask round whose weights a later round may start from, of its nodes that did not start from
    w0 (those are rebuilt on demand): the share asked in an earlier round, 1 - (1 - q)^(t - 1)
    in round t with mask sampling q (2N when every round asks every node)."""
    mask_fraction = cfg.mask_round_fraction
    fractions = [cfg.train.fraction, mask_fraction]
    asked = max(cfg.asked(q) for q in fractions)
    if asked >= cfg.nodes:
        return 2 * cfg.nodes
    method = method_of(cfg)
    kept = sum(1 - (1 - mask_fraction) ** (s.index - 1) for s in method.planned
               if s.phase == "mask" and method.keeps_own_weights(s))
    own = min(cfg.nodes, asked + math.ceil(asked * kept)) if cfg.prune.rewind == "none" else 0
    return asked + own


def estimate_run(cfg: Config) -> MemoryEstimate | None:
    """The estimate for `cfg`, from its model's size and its dataset's, before anything is loaded;
    None for a dataset registered by the user, whose size is unknown until it is loaded."""
    key = DATASETS.canonical(cfg.data.dataset) if cfg.data.dataset in DATASETS else None
    if key not in DATASET_SIZES:
        return None
    shape, classes, samples = DATASET_SIZES[key]
    params = sum(p.numel() for p in build_model(cfg.train.model, shape, classes).state_dict().values())
    return estimate_memory(cfg, params, samples * 4 * math.prod(shape))


def fit_workers(cfg: Config, estimate: MemoryEstimate, available: int | None) -> Config:
    """`cfg` with automatic workers (`workers = 0`) fixed at the most that its `estimate` fits in
    `available` bytes (at least 1), so the automatic choice never makes a run too big for the machine
    where fewer processes would fit; any other config comes back as it was (the same object)."""
    if cfg.workers != 0 or available is None or estimate.total <= available:
        return cfg
    workers = worker_count(cfg) - math.ceil((estimate.total - available) / PROCESS_BYTES)
    return cfg.with_overrides({"workers": workers if workers > 1 else 1})


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit; None if unknown."""
    found = []
    try:
        meminfo = MEMINFO.read_text()
        found += [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit, used = (CGROUP / "memory.max").read_text().strip(), (CGROUP / "memory.current").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _size(n: int) -> str:
    """Bytes as GiB or MiB, with one decimal where that matters."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


def check_memory(estimate: MemoryEstimate, available: int | None) -> None:
    """Refuse a run whose estimated peak exceeds the memory available (no refusal if that is unknown)."""
    if available is None or estimate.total <= available:
        return
    fits = max(0, (available - estimate.fixed) // estimate.per_node)
    if fits == 0 and 2 * estimate.history > estimate.fixed:
        raise ResourceError(f"this run needs about {_size(estimate.total)} of memory, {_size(estimate.history)} of it for "
                            f"the server's history of consensus masks (one per mask round and per adaptation round), "
                            f"but {_size(available)} is available; use fewer --rounds, adapt the mask less often "
                            f"(--adapt-every, --adapt-until), or --no-memory-check to run anyway")
    if fits == 0:
        raise ResourceError(f"this run needs about {_size(estimate.total)} of memory: its processes and data take "
                            f"{_size(estimate.fixed)}, which leaves no room for even one node's "
                            f"{_size(estimate.per_node)} in the {_size(available)} available; use fewer --workers "
                            f"(each process holds about {_size(PROCESS_BYTES)}), or --no-memory-check to run anyway")
    if estimate.sampled:
        raise ResourceError(f"this run needs about {_size(estimate.total)} of memory (up to {estimate.nodes:,} copies "
                            f"of the model x {_size(estimate.per_node)} for the nodes asked + {_size(estimate.fixed)}) "
                            f"but {_size(available)} is available; ask fewer nodes per round (--fraction, "
                            f"--mask-fraction: at most {fits:,} copies fit), or --no-memory-check to run anyway")
    raise ResourceError(f"this run needs about {_size(estimate.total)} of memory ({estimate.nodes:,} nodes x "
                        f"{_size(estimate.per_node)} + {_size(estimate.fixed)}) but {_size(available)} is available; "
                        f"use at most --nodes {fits:,}, or ask a share of the nodes per round (--fraction, and "
                        f"--mask-fraction for mask rounds), or --no-memory-check to run anyway")
