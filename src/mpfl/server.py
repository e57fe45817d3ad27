"""The parameter server of every method, free of transport: the protocol engine.

It runs a method's plan step by step, exchanges encoded requests and replies through any
`Transport`, validates every reply, keeps the mask versions each node holds, samples nodes
and aggregates; what each round does is the method's (`mpfl.methods`). The simulator and
the Flower ServerApp both construct a `Server` and call `run`, so both runners make the same
decisions from the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import codec
from .attacks import malicious_ids
from .codec import Kind
from .config import Config, sample_size
from .core import masks
from .core.aggregate import count_cap, holder_average, holder_robust_average, robust_average
from .core.contract import checked_arrays
from .core.history import MaskHistory
from .core.memo import complement
from .core.params import Mask, ParamSpec, Weights
from .errors import MethodError, PayloadError, RoundError
from .methods import method_of
from .protocol import (
    RECORDED_BY_RUNNERS,
    NodeFailure,
    Reply,
    Round,
    RoundRecord,
    Step,
    Transport,
    bytes_sent,
    dropped_text,
    mistyped,
    type_hints,
)
from .seeds import Stream, rng

Evaluator = Callable[[Weights], tuple[float, float]]


def malformed(reply: object) -> str | None:
    """Why a transport's reply is not a sequence of byte strings (None if it is): whatever a node or
    a transport hands back, the server drops it with a reason instead of failing on its type."""
    if isinstance(reply, (bytes, bytearray, str)) or not isinstance(reply, Sequence):
        return f"a reply must be a list of bodies, got {type(reply).__name__}"
    kinds = {type(b).__name__ for b in reply if not isinstance(b, (bytes, bytearray))}
    return f"reply bodies must be bytes, got {', '.join(sorted(kinds))}" if kinds else None


def _json_value(value: object) -> object:
    """A numpy scalar or array as the Python number or list JSON holds (anything else is refused)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


def plain_metrics(metrics: object, hook: str) -> dict:
    """A method's round metrics as plain JSON values (numpy numbers and arrays converted), as records
    hold them; anything but a dict of such values, a key the server records itself, or a key of
    another type than `RoundRecord` names is a MethodError naming the hook (the run's own log would
    otherwise be refused when it is read back)."""
    if not isinstance(metrics, Mapping):
        raise MethodError(f"{hook} must give its metrics as a dict, got {type(metrics).__name__}")
    try:
        plain = json.loads(json.dumps(dict(metrics), default=_json_value))
    except (TypeError, ValueError) as exc:
        raise MethodError(f"{hook}: every metric must be a number, string, list or dict ({exc})") from None
    taken = sorted(RECORDED_BY_RUNNERS & set(plain))
    if taken:
        raise MethodError(f"{hook}: metrics {', '.join(taken)} are keys the server records itself; name them otherwise")
    problem = mistyped(plain, type_hints(RoundRecord))
    if problem:
        raise MethodError(f"{hook}: {problem}, the type mpfl.protocol.RoundRecord gives it; give it that type or "
                          "another name")
    return plain


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
    history: MaskHistory = field(default_factory=MaskHistory)
    """Every consensus mask of the run by version, packed (`core.history`)."""
    node_version: dict[int, int] = field(default_factory=dict)
    w0_sent: set[int] = field(default_factory=set)
    next_step: int = 1
    mask_done: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    """Each node's training-sample count, fixed at its first valid claim (or registered by the deployment)."""
    velocity: Weights | None = None
    """The server's momentum in the training phase (`train.server_momentum`), on the current mask; None before its first step."""


VALUE_LIMIT = "robust.value_limit"
"""The setting a reply refused for its values' size is named by (`Server.check_values`)."""


class Server:
    """Drives a whole run, one step at a time, through the hooks of the configured method.
    After every round, `clear` (`Experiment.cleared`) gives the global weights the form the nodes train them in."""

    def __init__(self, cfg: Config, spec: ParamSpec, w0: Weights, transport: Transport, *,
                 evaluate: Evaluator | None = None, oracle: Oracle | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None, state: ServerState | None = None,
                 clear: Callable[[Weights, Mask], Weights] | None = None) -> None:
        self.cfg, self.spec, self.transport = cfg, spec, transport
        self.evaluate, self.oracle, self.clear = evaluate, oracle, clear
        self.on_round = on_round or (lambda record: None)
        self.method = method_of(cfg)
        self.structured = self.method.structured
        self.plan = self.method.planned
        full = spec.full_mask()
        self.state = state or ServerState(weights=list(w0), w0=list(w0), mask=full, history=MaskHistory({0: full}))
        if self.method.needs_pooled_data and oracle is None:
            raise RoundError(f"the {cfg.method} method needs the pooled training data; run it with the in-process simulator")

    # ------------------------------------------------------------------ driving

    def run(self) -> RoundRecord | None:
        """Run every remaining step of the plan; return the last round's record (None if none was left)."""
        record = None
        for step in self.plan[self.state.next_step - 1 :]:
            if step.phase == "mask" and self.state.mask_done:
                self.state.next_step = step.step + 1
                continue
            if step.phase == "train" and step.index == 1:
                self.method.start_training(self)
            started = time.perf_counter()
            record = self.run_step(step)
            record["time"] = time.perf_counter() - started
            self.state.next_step = step.step + 1
            self.on_round(record)
        return record

    def run_step(self, step: Step) -> RoundRecord:
        """One round of the method, then evaluation and the round's record."""
        if step.phase == "mask":
            exchanged, metrics = self._mask_round(step)
        else:
            exchanged = self.method.train_round(self, step)
            if not isinstance(exchanged, Round):
                raise MethodError(f"method {self.cfg.method!r}: train_round must return the Round of its exchange "
                                  f"(Server.exchange gives it), got {type(exchanged).__name__}")
            metrics = plain_metrics(exchanged.metrics, f"method {self.cfg.method!r}: train_round")
        state = self.state
        self._check_weights(f"method {self.cfg.method!r}: {'mask_round' if step.phase == 'mask' else 'train_round'}")
        if self.clear is not None:
            state.weights = self.clear(state.weights, state.mask)
        state.bytes_up += exchanged.bytes_up
        state.bytes_down += exchanged.bytes_down
        record: RoundRecord = {
            "step": step.step, "phase": step.phase, "round": step.index, "method": self.cfg.method, "seed": self.cfg.seed,
            "accuracy": None, "loss": None, "target_density": step.density, "density": masks.density(state.mask),
            "bytes_up": exchanged.bytes_up, "bytes_down": exchanged.bytes_down,
            "cum_bytes_up": state.bytes_up, "cum_bytes_down": state.bytes_down,
            "nodes": sorted(exchanged.replies), "dropped": {str(k): v for k, v in sorted(exchanged.dropped.items())},
            **metrics,
        }
        if self.evaluate is not None and self.method.has_global_model(step) and self._should_evaluate(step):
            record["accuracy"], record["loss"] = self.evaluate(state.weights)
        return record

    def _check_weights(self, hook: str) -> None:
        """Hold the global weights a method's round left to the contract the engine evaluates, saves and
        sends them under: a dense model would otherwise be reported at the mask's density."""
        state, spec = self.state, self.spec
        contract = (f"{hook} must leave server.state.weights one float array per tensor, of its shape, and zero "
                    "wherever server.state.mask prunes (server.spec.apply(weights, mask) makes it so)")
        weights = checked_arrays(state.weights, spec.shapes, "f", contract)
        for name, i, kept in zip(spec.prunable_names, spec.prunable, state.mask):
            alive = int(np.count_nonzero(weights[i][complement(kept)]))
            if alive:
                raise MethodError(f"{contract}; {name} holds {alive} nonzero values where the mask prunes")

    def _should_evaluate(self, step: Step) -> bool:
        last = step.step == self.plan[-1].step
        every = self.cfg.eval_every
        return last or (every > 0 and step.index % every == 0)

    def _mask_round(self, step: Step) -> tuple[Round, dict]:
        """The method's mask round, then the new mask version; the phase ends early once the mask stops changing."""
        state = self.state
        previous = state.mask
        result = self.method.mask_round(self, step, masks.density(previous))
        if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], Round)):
            got = (type(result).__name__ if not isinstance(result, tuple) else f"a tuple of {len(result)} items"
                   if len(result) != 3 else f"a tuple whose first item is a {type(result[0]).__name__}")
            raise MethodError(f"method {self.cfg.method!r}: mask_round must return (the Round of its exchange, the new "
                              f"mask, a dict of metrics), got {got}")
        exchanged, new, extra = result
        hook = f"method {self.cfg.method!r}: mask_round"
        new = masks.checked_mask(new, previous, f"{hook}'s new mask", structured=self.structured)
        extra = plain_metrics(extra, hook)
        changed = masks.hamming(previous, new)
        self.adopt_mask(step, new)
        self.method.after_mask(self, step, new)
        if self.cfg.prune.early_stop and changed == 0:
            state.mask_done = True
        return exchanged, {"hamming": changed, "layer_density": [round(d, 6) for d in masks.layer_density(new)], **extra}

    # ------------------------------------------------------------------ services for methods

    def node_ids(self) -> list[int]:
        """Every node that can currently be reached, in id order."""
        return sorted(self.transport.node_ids())

    def sample(self, step: Step) -> list[int]:
        """Nodes taking part in a round: a seeded fraction of the reachable nodes, at least `min_nodes`.
        Mask rounds ask `prune.mask_fraction` of them (by default `train.fraction`) from their own
        random stream, so a run that samples only mask rounds draws its training rounds as before."""
        mask = step.phase == "mask"
        fraction = self.cfg.mask_round_fraction if mask else self.cfg.train.fraction
        nodes = self.node_ids()
        if fraction >= 1.0 or not nodes:
            return nodes
        count = sample_size(fraction, len(nodes), self.cfg.min_nodes)
        stream = Stream.MASK_SAMPLE if mask else Stream.SAMPLE
        return sorted(rng(self.cfg.seed, step.step, stream).choice(nodes, size=count, replace=False).tolist())

    def exchange(self, task: str, step: Step, requests: Mapping[int, Sequence[bytes]],
                 decode: Callable[[int, Sequence[bytes]], codec.Body], *, bodies: int = 1) -> Round:
        """Send, collect and validate; invalid or missing replies are dropped with a reason, and a
        round with fewer than `min_nodes` valid replies is a RoundError. Each reply must hold
        `bodies` bodies, the later ones claiming the first one's sample count or none (0); `decode`
        returns the first decoded (its count weighs the node) and may keep what the others carry.
        Bytes down count only the requests the transport sent."""
        replies = self.transport.exchange(task, step.step, requests)
        exchanged = Round(bytes_down=bytes_sent(requests, replies))
        asking = self._asking_for_w0(step, requests, replies)
        if asking:
            exchanged.bytes_up += sum(len(replies[node][0]) for node in asking)
            weights = codec.encode_dense(Kind.WEIGHTS, self.state.w0, round=step.step)
            again = {node: [weights if codec.peek(b).kind == Kind.INIT else b for b in requests[node]]
                     for node in asking}
            answered = self.transport.exchange(task, step.step, again)
            exchanged.bytes_down += bytes_sent(again, answered)
            replies = {**replies, **{node: answered.get(node, NodeFailure("no reply before the deadline"))
                                     for node in asking}}
        for node in requests:
            reply = replies.get(node, NodeFailure("no reply before the deadline"))
            if isinstance(reply, NodeFailure):
                exchanged.dropped[node] = reply.reason
                continue
            if (problem := malformed(reply)) is not None:
                exchanged.dropped[node] = f"rejected: {problem}"
                continue
            exchanged.bytes_up += sum(len(b) for b in reply)
            try:
                if len(reply) != bodies:
                    raise PayloadError(f"expected {bodies} reply bod{'y' if bodies == 1 else 'ies'}, got {len(reply)}")
                body = decode(node, reply)
                if body.num_samples <= 0:
                    raise PayloadError("reply claims no training samples")
                if claims := sorted({codec.peek(b).num_samples for b in reply[1:]} - {0, body.num_samples}):
                    raise PayloadError(f"reply's bodies claim different training sample counts ({body.num_samples} "
                                       f"and {', '.join(map(str, claims))}); a later body claims the first one's "
                                       "count or none (0)")
                self.check_values(body)
                self._fix_count(node, body.num_samples)
                exchanged.replies[node] = body
            except PayloadError as exc:
                exchanged.dropped[node] = f"rejected: {exc}"
        if len(exchanged.replies) < self.cfg.min_nodes:
            detail = dropped_text(dict(sorted(exchanged.dropped.items())))
            raise RoundError(f"step {step.step} ({step.phase}): only {len(exchanged.replies)} valid replies, fewer "
                             f"than min_nodes = {self.cfg.min_nodes}" + "".join(f". {part}" for part in
                                                                              (detail, self._fault_hint(),
                                                                               self._limit_hint(exchanged)) if part))
        exchanged.counts = self.bounded_counts(exchanged.replies)
        return exchanged

    def _fault_hint(self) -> str:
        """What to change when simulated faults left a round too few replies (nothing when none are set)."""
        set_rates = ", ".join(f"{name} = {rate:g}" for name, rate in self.cfg.faults.rates().items() if rate > 0)
        if not set_rates:
            return ""
        return f"The run simulates faults ({set_rates}): lower them" + (" or --min-nodes" if self.cfg.min_nodes > 1 else "")

    def _limit_hint(self, exchanged: Round) -> str:
        """What to change when replies were refused for values beyond the limit (nothing otherwise)."""
        refused = {node for node, reason in exchanged.dropped.items() if VALUE_LIMIT in reason}
        if not refused or refused <= set(malicious_ids(self.cfg)):  # the limit stopped what it is there to stop
            return ""
        return (f"If honest nodes' values reach ±{self.cfg.robust.value_limit:g} (a large learning rate, an "
                "unnormalised model), raise --value-limit")

    def check_values(self, body: codec.Body) -> None:
        """Refuse checksum-valid values no honest node sends: beyond ±robust.value_limit."""
        if body.kind == Kind.MASK:
            return
        limit = self.cfg.robust.value_limit
        if any(t.size and float(np.abs(t).max()) > limit for t in body.tensors):
            raise PayloadError(f"values beyond ±{limit:g} ({VALUE_LIMIT})")

    def adopt_mask(self, step: Step, mask: Mask) -> None:
        """Make `mask` the current mask, as version `step.step` (the step that produced it)."""
        self.state.mask, self.state.version = mask, step.step
        self.state.history[step.step] = mask

    def _fix_count(self, node: int, claimed: int) -> None:
        """Hold a node to the sample count it first claimed (or was registered with): a node that
        could change its claim from round to round could pick its weight round by round."""
        fixed = self.state.counts.setdefault(node, claimed)
        if claimed != fixed:
            raise PayloadError(f"reply claims {claimed} training samples, but this node's count is fixed at {fixed}")

    def register_counts(self, counts: Mapping[int, int]) -> None:
        """Fix nodes' sample counts before any reply, for a deployment that knows them (every later
        claim must then match); otherwise a node's first valid claim fixes its count."""
        for node, count in counts.items():
            if count <= 0:
                raise RoundError(f"node {node}: a registered sample count must be positive, got {count}")
            self.state.counts[node] = int(count)

    def bounded_counts(self, nodes: Iterable[int]) -> dict[int, float]:
        """The weight each node's count may give it: its fixed count, clipped to `robust.count_limit`
        times the lower median of all fixed counts, so that a few nodes claiming huge datasets stay a few
        nodes (honest counts within the limit are used exactly)."""
        cap = self.count_cap()
        return {node: float(min(self.state.counts[node], cap)) for node in nodes}

    def limited_counts(self) -> dict[str, int]:
        """The nodes whose fixed count is above `count_cap` (ids as text, as records hold them), with
        that count: they weigh as the cap (inflated claims, or the largest honest nodes of a very uneven split)."""
        cap = self.count_cap() if self.state.counts else 0.0
        return {str(node): count for node, count in sorted(self.state.counts.items()) if count > cap}

    def count_cap(self) -> float:
        """The largest count a node may weigh with: `robust.count_limit` times the lower median of the fixed counts."""
        return count_cap(list(self.state.counts.values()), self.cfg.robust.count_limit)

    def requests(self, nodes: Iterable[int], bodies: Sequence[bytes] = (), *, w0: Step | None = None
                 ) -> dict[int, list[bytes]]:
        """Each node's request: with `w0` (the round's step), the reference to the initial weights
        where the node has not had it yet; the mask updates the node missed; then `bodies`. What
        nodes share (a reference, a mask update over the same held version) is encoded once."""
        sent_w0: dict[str, bytes] = {}
        updates: dict[int, list[bytes]] = {}
        return {n: (self.w0_body(n, w0, sent_w0) if w0 is not None else []) + self.mask_update(n, updates) + list(bodies)
                for n in nodes}

    def mask_update(self, node: int, cache: dict[int, list[bytes]]) -> list[bytes]:
        """The current mask coded over the version the node holds (nothing if it is up to date): the
        kept part of the held mask, and, once masks have regrown positions, a second body with the
        positions the held mask lacks, coded over what is outside the first. `cache` shares one
        encoding among the nodes of a round that hold the same version."""
        state = self.state
        held = state.node_version.get(node, 0)
        if held == state.version:
            return []
        if held not in cache:
            base = state.history[held]
            kept = [m & b for m, b in zip(state.mask, base)]
            options = {"round": state.version, "base_version": held, "coder": self.cfg.codec.mask_coder,
                       "structured": self.structured}
            cache[held] = [codec.encode_mask(kept, base, **options)]
            grown = [m & ~b for m, b in zip(state.mask, base)]
            if any(g.any() for g in grown):
                cache[held].append(codec.encode_mask(grown, [~k for k in kept], grow=True, **options))
        return list(cache[held])

    def w0_body(self, node: int, step: Step, cache: dict[str, bytes]) -> list[bytes]:
        """The initial weights, once per node, as a reference (the seed and a digest) that the node
        checks against the weights it rebuilds from the seed or reads from its copy of the `init`
        file; a node without a matching copy asks, and `exchange` sends it the weights."""
        if node in self.state.w0_sent:
            return []
        if "w0" not in cache:
            source = "seed" if self.cfg.train.init is None else "file"
            cache["w0"] = codec.encode_init(self.state.w0, source=source, seed=self.cfg.seed, round=step.step)
        return [cache["w0"]]

    def _asking_for_w0(self, step: Step, requests: Mapping[int, Sequence[bytes]], replies: Mapping[int, Reply]
                       ) -> list[int]:
        """The nodes whose reply to this round's reference to the `init` file's weights asks for them
        (they hold no copy). A request in answer to anything else is not served: it is refused as the
        reply it is, so no node can have a round's requests sent twice."""
        if self.cfg.train.init is None:
            return []
        digest, asking = None, []
        for node, sent in requests.items():
            reply = replies.get(node)
            if isinstance(reply, NodeFailure) or malformed(reply) is not None or len(reply) != 1:
                continue
            if not any(codec.peek(body).kind == Kind.INIT for body in sent):
                continue
            try:
                ref = codec.decode_init(reply[0], round=step.step)
            except PayloadError:
                continue
            digest = digest or codec.weights_digest(self.state.w0)
            if ref.source == "request" and ref.digest == digest:
                asking.append(node)
        return asking

    def acknowledge(self, exchanged: Round, *, w0: bool = False) -> None:
        """Nodes that replied validly now hold the current mask (and, with `w0`, the initial
        weights); a dropped node's version is unknown, so it gets the full mask next time."""
        for node in exchanged.replies:
            self.state.node_version[node] = self.state.version
            if w0:
                self.state.w0_sent.add(node)
        for node in exchanged.dropped:
            self.state.node_version.pop(node, None)

    def advance(self, step: Step, average: Weights) -> Weights:
        """The global weights after round `step`, whose aggregate is `average`: `average` itself, or,
        in a training-phase round with `train.server_momentum` beta, FedAvgM's ``weights + v`` with
        ``v = beta * v + (average - weights)``. The step and v are kept on the current mask, so
        pruned entries stay exactly zero and a swapped-out weight takes no momentum with it. Under
        label skew each round's averaged update is small and noisy (the nodes pull towards their
        own classes); the momentum keeps the direction the rounds agree on. Running statistics
        (BatchNorm's mean and variance) are measured, not learned: they take the average, since a
        step past it can drive a variance below zero."""
        beta = self.cfg.train.server_momentum
        if beta == 0 or step.phase != "train":
            return average
        state, spec = self.state, self.spec
        previous = state.velocity or [np.zeros_like(w) for w in state.weights]
        velocity = [np.float32(beta) * v + (a - w) for v, a, w in zip(previous, average, state.weights)]
        for i in spec.statistics:
            velocity[i] = np.zeros_like(velocity[i])
        state.velocity = spec.apply(velocity, state.mask)
        stepped = [w + v for w, v in zip(state.weights, state.velocity)]
        for i in spec.statistics:
            stepped[i] = average[i]
        return spec.apply(stepped, state.mask)

    def aggregate(self, exchanged: Round) -> Weights:
        """The configured aggregate of the valid replies (sample-weighted mean by default), zero where the
        mask prunes: nodes send nothing there, so whatever an aggregator returns there is cleared."""
        robust = self.cfg.robust
        average = robust_average([b.tensors for b in exchanged.replies.values()], exchanged.weights(),
                                 robust.aggregator, trim=robust.trim, byzantine=robust.byzantine)
        return self.spec.apply(average, self.state.mask)

    def average_held(self, kept: Sequence[Sequence[np.ndarray]], holds: Sequence[Mask], weights: Sequence[float],
                     keep: Mask) -> Weights:
        """The configured aggregate of values the nodes sent over their own masks (`holds`), on the
        entries of `keep`: by default the weighted mean over each entry's holders; under a robust
        aggregator, that aggregator, with the current weights standing in where a node holds nothing."""
        robust = self.cfg.robust
        if robust.aggregator == "mean":
            return holder_average(kept, holds, weights, keep, self.state.weights)
        return holder_robust_average(kept, holds, weights, keep, self.state.weights, robust.aggregator,
                                     trim=robust.trim, byzantine=robust.byzantine)
