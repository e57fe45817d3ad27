"""The parameter server of every method, free of transport: it plans rounds, encodes requests,
validates replies, forms consensus masks and aggregates, through any `Transport`.

The simulator and the Flower ServerApp both construct a `Server` and call `run`, so both
runners make the same decisions from the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from . import codec
from .codec import Kind
from .config import Config
from .core import masks as M
from .core.aggregate import robust_average, weighted_average
from .core.consensus import VoteContext, agreement_weights, consensus, tally, trimmed_tally
from .core.params import Mask, ParamSpec, Weights
from .errors import PayloadError, RoundError
from .node import is_structured
from .protocol import TASK_MASK, TASK_SCORES, TASK_TOPK, TASK_TRAIN, NodeFailure, Step, Transport, plan

Evaluator = Callable[[Weights], tuple[float, float]]


class Oracle(Protocol):
    """Server-side access to pooled data, which only the simulator has (the `centralized` bound)."""

    def find_mask(self, start: Weights, current: Mask, density: float, step: int) -> tuple[Mask, Weights | None]: ...


@dataclass
class ServerState:
    """Everything the server needs to continue a run from the next step."""

    weights: Weights
    w0: Weights
    mask: Mask
    version: int = 0
    history: dict[int, Mask] = field(default_factory=dict)
    node_version: dict[int, int] = field(default_factory=dict)
    w0_sent: set[int] = field(default_factory=set)
    next_step: int = 1
    mask_done: bool = False
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class Round:
    """What one exchange produced: valid decoded replies, their sample counts, dropped nodes, bytes."""

    replies: dict[int, codec.Body] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def weights(self) -> list[float]:
        return [float(b.num_samples) for b in self.replies.values()]


class Server:
    """Drives a whole run: warm-up, mask search and training, one step at a time."""

    def __init__(self, cfg: Config, spec: ParamSpec, w0: Weights, transport: Transport, *,
                 evaluate: Evaluator | None = None, oracle: Oracle | None = None,
                 on_round: Callable[[dict], None] | None = None, state: ServerState | None = None) -> None:
        self.cfg, self.spec, self.transport = cfg, spec, transport
        self.evaluate, self.oracle = evaluate, oracle
        self.on_round = on_round or (lambda record: None)
        self.structured = is_structured(cfg)
        self.plan = plan(cfg)
        full = spec.full_mask()
        self.state = state or ServerState(weights=list(w0), w0=list(w0), mask=full, history={0: full})
        if cfg.method == "centralized" and oracle is None:
            raise RoundError("the centralized method needs the pooled training data; run it with the in-process simulator")

    # ------------------------------------------------------------------ driving

    def run(self) -> dict:
        """Run every remaining step of the plan; return the final record."""
        record: dict = {}
        for step in self.plan[self.state.next_step - 1 :]:
            if step.phase == "mask" and self.state.mask_done:
                self.state.next_step = step.step + 1
                continue
            if step.phase == "train" and step.index == 1:
                self._start_training()
            started = time.perf_counter()
            record = self.run_step(step)
            record["time"] = time.perf_counter() - started
            self.state.next_step = step.step + 1
            self.on_round(record)
        return record

    def run_step(self, step: Step) -> dict:
        """One round: dispatch on phase and method, then evaluate and describe the round."""
        if step.phase in ("warmup", "train"):
            rnd = self._topk_round(step) if self.cfg.method == "topk" else self._train_round(step)
            metrics: dict = {}
        else:
            rnd, metrics = self._mask_round(step)
        st = self.state
        st.bytes_up += rnd.bytes_up
        st.bytes_down += rnd.bytes_down
        record = {
            "step": step.step, "phase": step.phase, "round": step.index, "method": self.cfg.method, "seed": self.cfg.seed,
            "accuracy": None, "loss": None, "target_density": step.density, "density": M.density(st.mask),
            "bytes_up": rnd.bytes_up, "bytes_down": rnd.bytes_down, "cum_bytes_up": st.bytes_up, "cum_bytes_down": st.bytes_down,
            "nodes": sorted(rnd.replies), "dropped": {str(k): v for k, v in sorted(rnd.dropped.items())},
            **metrics,
        }
        if self._has_global_model(step) and self._should_evaluate(step):
            record["accuracy"], record["loss"] = self.evaluate(st.weights)
        return record

    def _has_global_model(self, step: Step) -> bool:
        return self.evaluate is not None and (step.phase != "mask" or self.cfg.method == "fedavg-prune")

    def _should_evaluate(self, step: Step) -> bool:
        last = step.step == self.plan[-1].step
        every = self.cfg.eval_every
        return last or (every > 0 and step.index % every == 0)

    # ------------------------------------------------------------------ messaging

    def _exchange(self, task: str, step: Step, requests: Mapping[int, Sequence[bytes]],
                  decode: Callable[[int, Sequence[bytes]], codec.Body]) -> Round:
        """Send, collect and validate; invalid or missing replies are dropped with a reason."""
        rnd = Round(bytes_down=sum(len(b) for bodies in requests.values() for b in bodies))
        replies = self.transport.exchange(task, step.step, requests)
        for node in requests:
            reply = replies.get(node, NodeFailure("no reply before the deadline"))
            if isinstance(reply, NodeFailure):
                rnd.dropped[node] = reply.reason
                continue
            rnd.bytes_up += sum(len(b) for b in reply)
            try:
                if len(reply) != 1:
                    raise PayloadError(f"expected 1 reply body, got {len(reply)}")
                body = decode(node, reply)
                if body.num_samples <= 0:
                    raise PayloadError("reply claims no training samples")
                self._check_values(body)
                rnd.replies[node] = body
            except PayloadError as exc:
                rnd.dropped[node] = f"rejected: {exc}"
        if len(rnd.replies) < self.cfg.min_nodes:
            detail = "; ".join(f"node {n}: {r}" for n, r in sorted(rnd.dropped.items()))
            raise RoundError(f"step {step.step} ({step.phase}): only {len(rnd.replies)} valid replies, fewer than "
                             f"min_nodes = {self.cfg.min_nodes}. {detail}")
        return rnd

    def _check_values(self, body: codec.Body) -> None:
        """Refuse checksum-valid values no honest node sends: beyond ±robust.value_limit."""
        if body.kind == Kind.MASK:
            return
        limit = self.cfg.robust.value_limit
        if any(t.size and float(np.abs(t).max()) > limit for t in body.tensors):
            raise PayloadError(f"values beyond ±{limit:g} (robust.value_limit)")

    def _sample(self, step: Step) -> list[int]:
        """Nodes taking part in a training round: a seeded fraction q of the reachable nodes."""
        nodes = sorted(self.transport.node_ids())
        q = self.cfg.train.fraction
        if q >= 1.0 or not nodes:
            return nodes
        rng = np.random.default_rng([self.cfg.seed, step.step, 1])
        k = max(self.cfg.min_nodes, int(round(q * len(nodes))))
        return sorted(rng.choice(nodes, size=min(k, len(nodes)), replace=False).tolist())

    def _mask_update(self, node: int, cache: dict[int, bytes]) -> list[bytes]:
        """The current mask coded over the version the node holds (nothing if it is up to date)."""
        st = self.state
        held = st.node_version.get(node, 0)
        if held == st.version:
            return []
        if held not in cache:
            cache[held] = codec.encode_mask(st.mask, st.history[held], round=st.version, base_version=held,
                                            coder=self.cfg.codec.mask_coder, structured=self.structured)
        return [cache[held]]

    def _w0_body(self, node: int, step: Step, cache: dict[str, bytes]) -> list[bytes]:
        """The initial weights, sent once per node."""
        if node in self.state.w0_sent:
            return []
        if "w0" not in cache:
            cache["w0"] = codec.encode_dense(Kind.WEIGHTS, self.state.w0, round=step.step)
        return [cache["w0"]]

    def _acknowledge(self, rnd: Round, *, w0: bool = False) -> None:
        """Nodes that replied validly now hold the current mask (and the initial weights)."""
        for node in rnd.replies:
            self.state.node_version[node] = self.state.version
            if w0:
                self.state.w0_sent.add(node)
        for node in rnd.dropped:
            self.state.node_version.pop(node, None)

    # ------------------------------------------------------------------ training

    def _start_training(self) -> None:
        """Training starts from w0 masked by the final mask, or, without rewinding, from the
        mask phase's own global weights (fedavg-prune)."""
        st = self.state
        keep_global = self.cfg.prune.rewind == "none" and self.cfg.method == "fedavg-prune"
        st.weights = self.spec.apply(st.weights if keep_global else st.w0, st.mask)

    def _local_start(self, step: Step) -> bool:
        """With train_init = local, the first training round sends no weights: nodes start from their own."""
        return step.phase == "train" and step.index == 1 and self.cfg.prune.train_init == "local" and self.cfg.method == "mpfl"

    def _train_round(self, step: Step) -> Round:
        st = self.state
        supports = self.spec.supports(st.mask)
        nodes = self._sample(step)
        masks: dict[int, bytes] = {}
        values = [] if self._local_start(step) else [codec.encode_values(
            st.weights, supports, round=step.step, base=st.version, dtype=self.cfg.codec.value_dtype)]
        requests = {n: self._mask_update(n, masks) + values for n in nodes}

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_values(reply[0], supports, round=step.step, base=st.version)

        rnd = self._exchange(TASK_TRAIN, step, requests, decode)
        self._acknowledge(rnd)
        st.weights = self._aggregate(rnd)
        return rnd

    def _topk_round(self, step: Step) -> Round:
        st = self.state
        full = self.spec.supports(self.spec.full_mask())
        body = codec.encode_values(st.weights, full, round=step.step, dtype=self.cfg.codec.value_dtype)
        limits = [int(np.prod(s)) for s in self.spec.shapes]
        for i, size in zip(self.spec.prunable, self.spec.prunable_sizes):
            limits[i] = M.keep_count(int(size), step.density)

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_sparse(reply[0], self.spec.shapes, max_ones=limits, round=step.step)

        rnd = self._exchange(TASK_TOPK, step, {n: [body] for n in self._sample(step)}, decode)
        st.weights = [w + u for w, u in zip(st.weights, self._aggregate(rnd))]
        return rnd

    def _aggregate(self, rnd: Round) -> Weights:
        """The configured aggregate of the valid replies (sample-weighted mean by default)."""
        r = self.cfg.robust
        return robust_average([b.tensors for b in rnd.replies.values()], rnd.weights(), r.aggregator,
                              trim=r.trim, byzantine=r.byzantine)

    # ------------------------------------------------------------------ mask search

    def _mask_round(self, step: Step) -> tuple[Round, dict]:
        st = self.state
        previous, prev_density = st.mask, M.density(st.mask)
        finder = {"mpfl": self._vote_round, "local": self._vote_round, "fedavg-prune": self._prune_round,
                  "centralized": self._oracle_round, "random": self._random_round, "ssfl": self._scores_round}
        rnd, new, extra = finder[self.cfg.method](step, prev_density)
        changed = M.hamming(previous, new)
        st.mask, st.version = new, step.step
        st.history[step.step] = new
        if self.cfg.method != "fedavg-prune":
            st.weights = self.spec.apply(st.w0, new)
        if self.cfg.prune.early_stop and changed == 0:
            st.mask_done = True
        metrics = {"hamming": changed, "layer_density": [round(d, 6) for d in M.layer_density(new)], **extra}
        return rnd, metrics

    def _vote_round(self, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """MPFL: nodes train and send local masks over the current support; the PS votes."""
        st = self.state
        nodes = sorted(self.transport.node_ids())
        if self.cfg.method == "local":
            nodes = nodes[:1]
        masks: dict[int, bytes] = {}
        w0: dict[str, bytes] = {}
        requests = {n: self._w0_body(n, step, w0) + self._mask_update(n, masks) for n in nodes}
        support = st.mask

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_mask(reply[0], support, round=step.step, base_version=st.version, structured=self.structured)

        rnd = self._exchange(TASK_MASK, step, requests, decode)
        self._acknowledge(rnd, w0=True)
        local = [b.tensors for b in rnd.replies.values()]
        p = self.cfg.prune
        ctx = VoteContext(density=step.density, prev_density=prev_density, num_nodes=len(local), scope=p.scope,
                          floor=p.layer_floor, tau=p.tau, percentile=p.percentile, structured=self.structured,
                          tiebreak=[np.abs(w) for w in self.spec.pick(st.w0)])
        weights = rnd.weights()
        robust = self.cfg.robust
        if robust.vote_weighting == "agreement":
            weights = list(agreement_weights(local, weights, support))
        votes = trimmed_tally(local, robust.trim) if robust.vote_weighting == "trimmed" else tally(local, weights)
        new = consensus(votes, support, p.consensus, ctx)
        agreement = float(np.mean([M.agreement(m, new, support) for m in local]))
        shares = np.asarray(weights) / np.sum(weights)
        return rnd, new, {"agreement": agreement, "vote_weights": {str(n): round(float(w), 6) for n, w in zip(rnd.replies, shares)}}

    def _prune_round(self, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """fedavg-prune: a FedAvg round on the current mask, then the PS prunes the aggregate by magnitude."""
        rnd = self._train_round(step)
        crit = M.filter_mask if self.structured else M.magnitude_mask
        new = crit(self.spec.pick(self.state.weights), self.state.mask, step.density, scope=self.cfg.prune.scope,
                   floor=self.cfg.prune.layer_floor)
        self.state.weights = self.spec.apply(self.state.weights, new)
        return rnd, new, {}

    def _oracle_round(self, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """centralized: iterative pruning on the pooled data at the server (no messages)."""
        start = self.spec.apply(self.state.w0, self.state.mask)
        new, _ = self.oracle.find_mask(start, self.state.mask, step.density, step.step)
        return Round(), new, {}

    def _random_round(self, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """random: a seeded random mask with the target density in every layer (no messages)."""
        rng = np.random.default_rng([self.cfg.seed, step.step, 2])
        new = []
        for shape in self.spec.prunable_shapes:
            shape_rows = (shape[0],) if self.structured else shape
            flags = M.top_k(rng.random(shape_rows), np.ones(shape_rows, dtype=bool), M.keep_count(int(np.prod(shape_rows)), step.density))
            new.append(M.expand_rows(flags, shape) if self.structured else flags.reshape(shape))
        return Round(), new, {}

    def _scores_round(self, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """ssfl: nodes send dense saliency scores once; the PS sums them and keeps the top entries."""
        w0: dict[str, bytes] = {}
        nodes = sorted(self.transport.node_ids())
        requests = {n: self._w0_body(n, step, w0) for n in nodes}
        shapes = self.spec.prunable_shapes

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_dense(reply[0], Kind.SCORES, shapes, round=step.step)

        rnd = self._exchange(TASK_SCORES, step, requests, decode)
        self._acknowledge(rnd, w0=True)
        total = weighted_average([b.tensors for b in rnd.replies.values()], rnd.weights())
        new = M.select(total, self.state.mask, step.density, self.cfg.prune.scope, self.cfg.prune.layer_floor)
        return rnd, new, {}
