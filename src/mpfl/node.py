"""The node side of every method, free of transport: decode a request, run the core, encode the reply.

The simulator calls `Node.handle` directly; the Flower ClientApp calls the same method with
the bodies it received, so both runners run exactly the same node code. What a node does
for a request is the handler registered for its task (`NODE_TASKS`): a method that needs a
new kind of node work registers a handler with `register_task`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from . import codec
from .attacks import attack_of
from .codec import Kind
from .compact import compactable
from .config import Config
from .core.adapt import drop_votes, regrow_votes, swap_counts
from .core.masks import CRITERIA, checked_mask, keep_count, top_k
from .core.memo import complement
from .core.params import Mask, ParamSpec, Weights
from .core.training import CompactTrainer, LocalData, LocalTrainer, generator
from .errors import ConfigError, PayloadError
from .methods import method_of
from .protocol import TASK_ADAPT, TASK_MASK, TASK_SCORES, TASK_TOPK, TASK_TRAIN, NodeFailure, Reply, Step
from .registry import Registry, registry
from .seeds import SETUP, Stream, rng

if TYPE_CHECKING:
    from .experiment import Experiment


@dataclass
class NodeState:
    """What a node keeps between rounds: initial weights, current mask, and method state."""

    w0: Weights | None = None
    mask: Mask | None = None
    version: int = 0
    local: Weights | None = None
    residual: Weights | None = None
    local_from_w0: int = 0
    """The mask round whose training from w0 gave the node's own weights (0: another start): a
    checkpoint stores the step instead of the weights, and with sampled mask rounds the node does
    not keep them either (`local` stays None): it trains again if it is asked before they expire."""

    @property
    def has_local(self) -> bool:
        """Whether the node has own weights, kept or to be rebuilt."""
        return self.local is not None or self.local_from_w0 > 0

    @property
    def fresh(self) -> bool:
        """Whether the node has received nothing yet (its state is the default one)."""
        return (self.w0 is None and self.mask is None and self.version == 0 and not self.has_local
                and self.residual is None)

    def drop_local(self) -> None:
        """Forget the node's own trained weights (and how to rebuild them)."""
        self.local, self.local_from_w0 = None, 0


class SharedDecodes:
    """Decoded bodies shared by the nodes of one process and run: nodes that receive the same bytes
    with the same expectations get one decoded copy (one set of initial weights, not one per node).
    Nodes never modify decoded arrays in place, so sharing them changes no result."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, codec.Body] = OrderedDict()
        self._masks: OrderedDict[int, Mask] = OrderedDict()
        self._digest: tuple[Weights, bytes] | None = None

    def digest(self, weights: Weights) -> bytes:
        """`codec.weights_digest(weights)`, hashed once for the initial weights the nodes share (a
        SHA-256 over the whole model per node would cost 10,000 nodes several seconds)."""
        if self._digest is None or self._digest[0] is not weights:
            self._digest = (weights, codec.weights_digest(weights))
        return self._digest[1]

    def mask(self, version: int, mask: Mask) -> Mask:
        """One shared copy of the consensus mask of `version`: every node holding that version keeps
        the same arrays (a node that decoded different bits, which no honest decode does, keeps its own)."""
        known = self._masks.get(version)
        if known is not None and all(a is b or np.array_equal(a, b) for a, b in zip(known, mask)):
            return known
        self._masks[version] = mask
        self._masks.move_to_end(version)
        if len(self._masks) > self.size:
            self._masks.popitem(last=False)
        return mask

    def get(self, key: tuple, decode: Callable[[], codec.Body]) -> codec.Body:
        """The body decoded under `key` (the bytes and every expectation the decoder checks), decoding it if new."""
        body = self._entries.get(key)
        if body is None:
            body = self._entries[key] = decode()
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return body


def make_trainer(cfg: Config, model, spec: ParamSpec) -> LocalTrainer:
    """A LocalTrainer with the run's optimiser settings; filter masks on a flat sequential model train it shrunk."""
    train = cfg.train
    trainer = CompactTrainer if method_of(cfg).structured and compactable(model) else LocalTrainer
    return trainer(model, spec, optimizer=train.optimizer, lr=train.lr, momentum=train.momentum,
                   weight_decay=train.weight_decay, batch_size=train.batch_size)


def find_mask(cfg: Config, trainer: LocalTrainer, data: LocalData, start: Weights, current: Mask,
              density: float, gen_key: tuple[int, ...], *, epochs: int | None = None,
              w0: Weights | None = None) -> tuple[Mask, Weights | None]:
    """One local mask round: train `epochs` (default `train.epochs`) with `current` fixed (or
    score, for saliency criteria) and choose a subset of `current` at `density`. Given `w0`, the
    criterion sees `movement_scores`. Returns the mask and the trained weights."""
    spec, prune = trainer.spec, cfg.prune
    criterion = CRITERIA.get(prune.criterion)
    what, structured = f"the mask the criterion {prune.criterion!r} returned", criterion.structured
    keywords: dict[str, object] = {"scope": prune.scope, "floor": prune.layer_floor}
    if "options" in criterion.extras:
        keywords["options"] = cfg.plugin_options
    if "rng" in criterion.extras:
        keywords["rng"] = rng(*gen_key, Stream.CRITERION)
    if criterion.needs_scores:
        scores = trainer.saliency(start, current, data, prune.saliency_batches, generator(*gen_key))
        return checked_mask(criterion.choose(scores, current, density, **keywords), current, what,
                            structured=structured), None
    trained, _ = trainer.train(start, current, data, epochs or cfg.train.epochs, generator(*gen_key))
    ranked = spec.pick(trained) if w0 is None else movement_scores(spec.pick(w0), spec.pick(trained), prune.extrapolate)
    return checked_mask(criterion.choose(ranked, current, density, **keywords), current, what,
                        structured=structured), trained


def movement_scores(w0: Sequence[np.ndarray], trained: Sequence[np.ndarray], extrapolate: float) -> Weights:
    """w0 + extrapolate * (w - w0): what magnitude criteria rank when the update since w0 should
    count `extrapolate` times. A node's update on few classes is small next to |w0|, which every
    node shares, so plain magnitude votes agree on w0's large entries rather than on what training found."""
    if extrapolate == 1.0:
        return list(trained)
    return [(w + np.float32(extrapolate) * (t - w)).astype(np.float32) for w, t in zip(w0, trained)]


TaskHandler = Callable[["Node", int, "Weights | None"], list[bytes]]
NODE_TASKS: Registry[TaskHandler] = registry("node task")
"""What a node does for each task: `handler(node, step, weights) -> reply bodies`."""


def register_task(name: str, handler: TaskHandler) -> None:
    """Add a node task, e.g. for a method whose rounds ask nodes for something new. Its name must be a
    Python identifier: Flower routes the task's messages to a handler of that name (``train.<name>``)."""
    if not (isinstance(name, str) and name.strip().isidentifier()):
        raise ConfigError(f"node task name {name!r} is not a Python identifier, which Flower needs to route its "
                          "messages; use letters, digits and underscores (e.g. 'my_task')")
    NODE_TASKS.register(name, handler)


class MissingInit(Exception):
    """The server named an ``--init`` file this node holds no matching copy of: it asks for the weights."""

    def __init__(self, ref: codec.InitRef) -> None:
        super().__init__(f"no local copy of the initial weights {ref.digest.hex()[:12]}")
        self.ref = ref


class Node:
    """One federated node: its data, its state, the shared trainer and, if the run makes it
    malicious, its attack. `steps` is the run's plan (`steps_of`), which the nodes of a process share."""

    def __init__(self, node_id: int, cfg: Config, trainer: LocalTrainer, data: LocalData, state: NodeState | None = None,
                 *, w0: Weights | None = None, steps: Mapping[int, Step] | None = None) -> None:
        self.attack = attack_of(cfg, node_id)
        self.built_w0 = w0
        if self.attack is not None and self.attack.poison is not None:
            data = self.attack.poison(data, (cfg.seed, SETUP, node_id, Stream.POISON))
        self.id, self.cfg, self.trainer, self.data = node_id, cfg, trainer, data
        self.spec = trainer.spec
        self.state = state or NodeState()
        method = method_of(cfg)
        self.method = method
        self.steps = steps if steps is not None else steps_of(cfg)
        self.structured = method.structured
        self.value_dtype = method.value_dtype
        self.shared: SharedDecodes | None = None
        self.keeps_from_w0 = cfg.mask_round_fraction >= 1.0
        """Whether own weights trained from w0 stay in memory: when every mask round asks every node,
        each will be asked again and use them; with sampled mask rounds few are, so they are rebuilt
        by those few rather than held by all."""

    def own_weights(self) -> Weights | None:
        """The node's own trained weights, rebuilt (and then kept) if only their round is known."""
        state = self.state
        if state.local is None and state.local_from_w0:
            state.local = self.train_from_w0(state.local_from_w0)
        return state.local

    def train_from_w0(self, step: int) -> Weights:
        """The weights mask round `step` trains from w0 masked by the mask the node holds (bit for bit
        the weights it trained then: every draw depends on (seed, step, node) only)."""
        if self.state.w0 is None:
            raise PayloadError("rebuilding the weights of a mask round needs the initial weights")
        prune, current = self.cfg.prune, self.mask
        start = self.spec.apply(self.state.w0, current)
        _, trained = find_mask(self.cfg, self.trainer, self.data, start, current, self.steps[step].density,
                               self.key(step), epochs=prune.mask_epochs, w0=self.state.w0)
        return trained if trained is not None else start

    # ------------------------------------------------------------------ receiving

    @property
    def mask(self) -> Mask:
        """The consensus mask this node holds (all ones before the first)."""
        return self.state.mask if self.state.mask is not None else self.spec.full_mask(shared=True)

    def _decode(self, key: tuple, decode: Callable[[], codec.Body]) -> codec.Body:
        return decode() if self.shared is None else self.shared.get(key, decode)

    def _receive(self, step: int, bodies: Sequence[bytes]) -> Weights | None:
        """Apply the bodies of a request in order; return the weights it carried, if any."""
        weights, held = None, self.state.version
        if self.state.local_from_w0 and any(codec.peek(b).kind == Kind.MASK for b in bodies):
            self.own_weights()  # rebuilt under the mask they were trained under, before it changes
        for body in bodies:
            received = self._apply(step, body)
            if received is not None:
                weights = received
        if self.shared is not None and self.state.mask is not None:
            self.state.mask = self.shared.mask(self.state.version, self.state.mask)
        if self.state.version != held:
            self.state.local_from_w0 = 0  # rebuilt under the new mask they would differ: keep them as weights
        return weights

    def _apply(self, step: int, body: bytes) -> Weights | None:
        """Take in one body: the initial weights, a mask update or kept values (returned)."""
        head = codec.peek(body)
        if head.kind == Kind.WEIGHTS:
            self.state.w0 = self._decode((Kind.WEIGHTS, body, step), lambda: codec.decode_dense(
                body, Kind.WEIGHTS, self.spec.shapes, round=step)).tensors
            return self.state.w0
        if head.kind == Kind.INIT:
            self.state.w0 = self._own_w0(codec.decode_init(body, round=step))
            return self.state.w0
        if head.kind == Kind.MASK and head.grow:
            grown = self._decode((Kind.MASK, body, self.state.version), lambda: codec.decode_mask(
                body, [complement(m) for m in self.mask], round=self.state.version, structured=self.structured, grow=True))
            self.state.mask = [m | g for m, g in zip(self.mask, grown.tensors)]
            return None
        if head.kind == Kind.MASK:
            version = 0 if head.base_version == 0 else self.state.version
            decoded = self._decode((Kind.MASK, body, version), lambda: codec.decode_mask(
                body, self.spec.full_mask() if version == 0 else self.mask, base_version=version,
                structured=self.structured))
            self.state.mask, self.state.version = decoded.tensors, decoded.round
            return None
        if head.kind == Kind.VALUES:
            return self._decode((Kind.VALUES, body, step, self.state.version), lambda: codec.decode_values(
                body, self.spec.supports(self.mask), round=step, base_version=self.state.version)).tensors
        raise PayloadError(f"a node does not accept {head.kind.name} bodies")

    # ------------------------------------------------------------------ tasks

    def handle(self, task: str, step: int, bodies: Sequence[bytes]) -> Reply:
        """Run one task of round `step` and return the encoded reply bodies (a silent attacker
        returns a NodeFailure instead)."""
        if self.attack is not None and self.attack.silent:
            return NodeFailure("withheld its reply (silent attack)")
        if step not in self.steps:
            raise PayloadError(f"step {step} is not part of this run's plan")
        if task not in NODE_TASKS:
            raise PayloadError(f"unknown task {task!r}")
        try:
            weights = self._receive(step, bodies)
        except MissingInit as missing:
            return [codec.encode_init_request(missing.ref)]
        return NODE_TASKS.get(task)(self, step, weights)

    def _own_w0(self, ref: codec.InitRef) -> Weights:
        """The initial weights this node built itself (from the seed, or from its copy of the
        ``--init`` file), once their digest matches the server's. Without a matching copy of the
        file the node asks for the weights (`MissingInit`); a seeded build that differs is an error."""
        if ref.source == "request":
            raise PayloadError("a node does not accept requests for the initial weights")
        hash_of = self.shared.digest if self.shared is not None else codec.weights_digest
        matches = self.built_w0 is not None and hash_of(self.built_w0) == ref.digest
        if ref.source == "file" and not matches:
            raise MissingInit(ref)
        if self.built_w0 is None:
            raise PayloadError("the server sent a reference to the initial weights, but this node did not build them")
        if not matches and self.cfg.train.init:
            raise PayloadError(f"the server built the initial weights from seed {ref.seed}, but this node loaded them "
                               f"from {self.cfg.train.init!r}: run both with the same --init, or neither")
        if not matches:
            import torch

            raise PayloadError(f"the initial weights this node built (model {self.cfg.train.model!r}, seed {ref.seed}) "
                               f"differ from the server's: the model definition or the torch version (here "
                               f"{torch.__version__}) must be the same on the server and every node")
        return self.built_w0

    def forge_mask(self, mask: Mask, current: Mask, start: Weights, step: int) -> Mask:
        """The local mask this node reports: the one it computed, unless its attack forges masks."""
        if self.attack is None or self.attack.forge_mask is None:
            return mask
        return self.attack.forge_mask(self, mask, current, start, step)

    def forge_values(self, trained: Weights, start: Weights, step: int) -> Weights:
        """The weights this node reports after training: its own, unless its attack forges values."""
        if self.attack is None or self.attack.forge_values is None:
            return trained
        return self.attack.forge_values(self, trained, start, step)

    @property
    def claimed_samples(self) -> int:
        """The training-sample count this node reports: its own, or `faults.attack_samples` times it
        for a malicious node (at most what the header's 32-bit field holds)."""
        own = self.data.num_samples
        if self.attack is None:
            return own
        return int(min(2**32 - 1, round(own * self.cfg.faults.attack_samples)))

    def key(self, step: int) -> tuple[int, ...]:
        """The seed key of this node's draws in round `step`."""
        return (self.cfg.seed, step, self.id)


def mask_task(node: Node, step: int, weights: Weights | None) -> list[bytes]:
    """Train (or score) under the current mask from the start the server shared, else the node's
    own weights or w0, and send a local mask at the round's density, coded over the current
    support; then, as the method asks, the node's core (coded over its mask) and its kept values."""
    if node.state.w0 is None:
        raise PayloadError("a mask round needs the initial weights, which this node has not received")
    prune, plan_step = node.cfg.prune, node.steps[step]
    current = node.mask
    shared = weights is not None and weights is not node.state.w0
    own = prune.rewind == "none" and node.state.has_local
    start = node.spec.apply(weights if shared else node.own_weights() if own else node.state.w0, current)
    new, trained = find_mask(node.cfg, node.trainer, node.data, start, current, plan_step.density, node.key(step),
                             epochs=prune.mask_epochs, w0=node.state.w0)
    if prune.rewind == "none":
        node.state.local = trained if trained is not None else start
        node.state.local_from_w0 = 0 if shared or own else step
        if node.state.local_from_w0 and not node.keeps_from_w0:
            node.state.local = None
    new = node.forge_mask(new, current, start, step)
    coding = {"round": step, "base_version": node.state.version, "coder": node.cfg.codec.mask_coder}
    out = [codec.encode_mask(new, current, structured=node.structured, num_samples=node.claimed_samples, **coding)]
    kept = trained if trained is not None else start
    if node.method.sends_cores(plan_step):
        scores = movement_scores(node.spec.pick(node.state.w0), node.spec.pick(kept), prune.extrapolate)
        out.append(codec.encode_mask(core_of(scores, new, prune.core_share), new, **coding))
    if node.method.averages(plan_step):
        sent = node.forge_values(kept, start, step)
        out.append(codec.encode_values(sent, node.spec.supports(new), round=step, base_version=node.state.version,
                                       num_samples=node.claimed_samples, dtype=node.value_dtype, exact=node.spec.statistics))
    return out


def core_of(scores: Sequence[np.ndarray], mask: Sequence[np.ndarray], share: float) -> Mask:
    """A node's core: the `share` of its own mask with the highest |score| in each layer."""
    return [top_k(np.abs(s), m, keep_count(int(m.sum()), share, minimum=0)).reshape(m.shape) for s, m in zip(scores, mask)]


def train_task(node: Node, step: int, weights: Weights | None) -> list[bytes]:
    """Train the received weights (or the node's own) under the mask and send the kept values."""
    return [encode_trained(node, step, local_training(node, step, weights))]


def local_training(node: Node, step: int, weights: Weights | None) -> Weights:
    """The weights a node reports after a training round: the received weights (or its own)
    trained under its mask (and forged, if its attack forges values)."""
    if weights is None:
        if not node.state.has_local:
            raise PayloadError("a training round without weights needs local weights, which this node does not have")
        weights = node.own_weights()
    start = node.spec.apply(weights, node.mask)
    trained, _ = node.trainer.train(start, node.mask, node.data, node.cfg.train.epochs, generator(*node.key(step)))
    return node.forge_values(trained, start, step)


def encode_trained(node: Node, step: int, trained: Weights) -> bytes:
    """A node's kept values as a VALUES body over its mask."""
    return codec.encode_values(trained, node.spec.supports(node.mask), round=step, base_version=node.state.version,
                               num_samples=node.claimed_samples, dtype=node.value_dtype, exact=node.spec.statistics)


def adapt_task(node: Node, step: int, weights: Weights | None) -> list[bytes]:
    """A training round that also votes on the mask: the kept values after training, then the
    pruned positions whose |gradient| at the received weights is largest (coded over the pruned
    positions), and with node drop votes the kept positions with the smallest trained |w|."""
    if weights is None:
        raise PayloadError("an adaptation round needs the global weights")
    mask, adapt = node.mask, node.cfg.adapt
    counts = swap_counts(mask, node.method.swap_fraction(node.steps[step]))
    start = node.spec.apply(weights, mask)
    grads = node.trainer.gradients(start, node.data, adapt.adapt_batches, generator(*node.key(step), Stream.REGROW))
    trained = local_training(node, step, weights)
    coding = {"round": step, "base_version": node.state.version, "coder": node.cfg.codec.mask_coder}
    out = [encode_trained(node, step, trained),
           codec.encode_mask(regrow_votes(grads, mask, counts), [complement(m) for m in mask], **coding)]
    if adapt.adapt_drop == "votes":
        out.append(codec.encode_mask(drop_votes(node.spec.pick(trained), mask, counts), mask, **coding))
    return out


def scores_task(node: Node, step: int, weights: Weights | None) -> list[bytes]:
    """Dense SNIP saliency scores of w0 on a few local batches (SSFL)."""
    if node.state.w0 is None:
        raise PayloadError("a scoring round needs the initial weights, which this node has not received")
    scores = node.trainer.saliency(node.state.w0, None, node.data, node.cfg.prune.saliency_batches,
                                   generator(*node.key(step)))
    return [codec.encode_dense(Kind.SCORES, scores, round=step, num_samples=node.claimed_samples)]


def topk_task(node: Node, step: int, weights: Weights | None) -> list[bytes]:
    """Train the dense weights and send the top-k entries of update + residual; keep the rest as
    the residual (error feedback)."""
    if weights is None:
        raise PayloadError("a top-k round needs the global weights")
    spec = node.spec
    trained, _ = node.trainer.train(weights, None, node.data, node.cfg.train.epochs, generator(*node.key(step)))
    trained = node.forge_values(trained, weights, step)
    update = [t - w for t, w in zip(trained, weights)]
    residual = node.state.residual or [np.zeros(s, dtype=np.float32) for s in spec.prunable_shapes]
    density = node.steps[step].density
    full = {i: update[i] + residual[j] for j, i in enumerate(spec.prunable)}
    for i, f in full.items():
        keep = top_k(np.abs(f), np.ones(f.shape, dtype=bool), keep_count(f.size, density)).reshape(f.shape)
        update[i] = np.where(keep, f, np.float32(0))
    body = codec.encode_sparse(update, round=step, num_samples=node.claimed_samples,
                               dtype=node.value_dtype, coder=node.cfg.codec.mask_coder)
    sent = codec.decode_sparse(body, spec.shapes).tensors
    node.state.residual = [full[i] - sent[i] for i in spec.prunable]
    return [body]


for _task, _handler in ((TASK_MASK, mask_task), (TASK_TRAIN, train_task), (TASK_ADAPT, adapt_task),
                        (TASK_SCORES, scores_task), (TASK_TOPK, topk_task)):
    register_task(_task, _handler)


def steps_of(cfg: Config) -> Mapping[int, Step]:
    """The rounds of `cfg`'s run by step number, read-only."""
    return MappingProxyType({s.step: s for s in method_of(cfg).plan()})


def build_nodes(cfg: Config, exp: Experiment, ids: Sequence[int], states: Mapping[int, NodeState], *,
                share: bool = True) -> list[Node]:
    """The nodes `ids` of a run on one shared trainer and one copy of the run's plan (a copy per node
    would make set-up grow with nodes times rounds); with `share`, identical bodies are decoded once for all."""
    trainer, steps = make_trainer(cfg, exp.model, exp.spec), steps_of(cfg)
    nodes = [Node(i, cfg, trainer, exp.node_data(i), states.get(i), w0=exp.w0, steps=steps) for i in ids]
    shared = SharedDecodes() if share else None
    for node in nodes:
        node.shared = shared
    return nodes


def deliver(nodes: Mapping[int, Node], task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
    """Run each addressed node's handler in turn; a node's PayloadError becomes a failed reply."""
    replies: dict[int, Reply] = {}
    release([node for node_id, node in nodes.items() if node_id not in requests], step)  # not asked: not read now
    for node_id, bodies in requests.items():
        try:
            replies[node_id] = nodes[node_id].handle(task, step, bodies)
        except PayloadError as exc:
            replies[node_id] = NodeFailure(f"node rejected the request: {exc}")
    release(nodes.values(), step)
    return replies


def release(nodes: Iterable[Node], step: int) -> None:
    """In round `step`, drop the own weights of those of `nodes` that hold some once no round after
    `step` can start from them: after the round for the nodes asked, before it for the others, who
    cannot start from them in it either (the method is asked once per call, not once per node)."""
    holders = [n for n in nodes if n.state.has_local]
    if holders and step in holders[0].steps and not holders[0].method.keeps_own_weights(holders[0].steps[step]):
        for node in holders:
            node.state.drop_local()
