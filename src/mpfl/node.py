"""The node side of every method, free of transport: decode a request, run the core, encode the reply.

The simulator calls `Node.handle` directly; the Flower ClientApp calls the same method with
the bodies it received, so both runners run exactly the same node code.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import codec
from .codec import Kind
from .compact import CompactTrainer, compactable
from .config import Config
from .core.masks import CRITERIA, NEEDS_SCORES, STRUCTURED, keep_count, top_k
from .core.params import Mask, ParamSpec, Weights
from .core.training import LocalData, LocalTrainer, generator
from .errors import PayloadError
from .protocol import TASK_MASK, TASK_SCORES, TASK_TOPK, TASK_TRAIN, plan


@dataclass
class NodeState:
    """What a node keeps between rounds: initial weights, current mask, and method state."""

    w0: Weights | None = None
    mask: Mask | None = None
    version: int = 0
    local: Weights | None = None
    residual: Weights | None = None


class SharedDecodes:
    """Decoded bodies shared by the nodes of one process and run: nodes that receive the same bytes
    with the same expectations get one decoded copy (one set of initial weights, not one per node).
    Nodes never modify decoded arrays in place, so sharing them changes no result."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, codec.Body] = OrderedDict()

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
    t = cfg.train
    trainer = CompactTrainer if is_structured(cfg) and compactable(model) else LocalTrainer
    return trainer(model, spec, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                   weight_decay=t.weight_decay, batch_size=t.batch_size)


def is_structured(cfg: Config) -> bool:
    """Whether masks keep or drop whole filters (1 bit per filter on the wire)."""
    return cfg.prune.criterion in STRUCTURED and cfg.method != "ssfl"


def find_mask(cfg: Config, trainer: LocalTrainer, data: LocalData, start: Weights, current: Mask,
              density: float, gen_key: tuple[int, ...]) -> tuple[Mask, Weights | None]:
    """One local mask round: train with `current` fixed (or score, for saliency criteria) and
    choose a subset of `current` at `density`. Returns the mask and the trained weights."""
    spec, p = trainer.spec, cfg.prune
    criterion = CRITERIA[p.criterion]
    if p.criterion in NEEDS_SCORES:
        scores = trainer.saliency(start, current, data, p.saliency_batches, generator(*gen_key))
        return criterion(scores, current, density, scope=p.scope, floor=p.layer_floor), None
    trained, _ = trainer.train(start, current, data, cfg.train.epochs, generator(*gen_key))
    return criterion(spec.pick(trained), current, density, scope=p.scope, floor=p.layer_floor), trained


class Node:
    """One federated node: its data, its state and the shared trainer."""

    def __init__(self, node_id: int, cfg: Config, trainer: LocalTrainer, data: LocalData, state: NodeState | None = None) -> None:
        self.id, self.cfg, self.trainer, self.data = node_id, cfg, trainer, data
        self.spec = trainer.spec
        self.state = state or NodeState()
        self.steps = {s.step: s for s in plan(cfg)}
        self.structured = is_structured(cfg)
        self.shared: SharedDecodes | None = None

    # ------------------------------------------------------------------ receiving

    @property
    def mask(self) -> Mask:
        return self.state.mask if self.state.mask is not None else self.spec.full_mask()

    def _decode(self, key: tuple, decode: Callable[[], codec.Body]) -> codec.Body:
        return decode() if self.shared is None else self.shared.get(key, decode)

    def _receive(self, step: int, bodies: Sequence[bytes]) -> Weights | None:
        """Apply the bodies of a request in order; return the weights it carried, if any."""
        weights = None
        for body in bodies:
            head = codec.peek(body)
            if head.kind == Kind.WEIGHTS:
                self.state.w0 = self._decode((Kind.WEIGHTS, body, step), lambda: codec.decode_dense(
                    body, Kind.WEIGHTS, self.spec.shapes, round=step)).tensors
                weights = self.state.w0
            elif head.kind == Kind.MASK:
                version = 0 if head.base == 0 else self.state.version
                decoded = self._decode((Kind.MASK, body, version), lambda: codec.decode_mask(
                    body, self.spec.full_mask() if version == 0 else self.mask, base_version=version,
                    structured=self.structured))
                self.state.mask, self.state.version = decoded.tensors, decoded.round
            elif head.kind == Kind.VALUES:
                weights = self._decode((Kind.VALUES, body, step, self.state.version), lambda: codec.decode_values(
                    body, self.spec.supports(self.mask), round=step, base=self.state.version)).tensors
            else:
                raise PayloadError(f"a node does not accept {head.kind.name} bodies")
        return weights

    # ------------------------------------------------------------------ tasks

    def handle(self, task: str, step: int, bodies: Sequence[bytes]) -> list[bytes]:
        """Run one task of round `step` and return the encoded reply bodies."""
        if step not in self.steps:
            raise PayloadError(f"step {step} is not part of this run's plan")
        weights = self._receive(step, bodies)
        handler = {TASK_MASK: self._mask, TASK_TRAIN: self._train, TASK_SCORES: self._scores, TASK_TOPK: self._topk}.get(task)
        if handler is None:
            raise PayloadError(f"unknown task {task!r}")
        return handler(step, weights)

    def forge_mask(self, mask: Mask, current: Mask, start: Weights, step: int) -> Mask:
        """The local mask this node reports; an honest node reports the one it computed."""
        return mask

    def forge_values(self, trained: Weights, start: Weights, step: int) -> Weights:
        """The weights this node reports after training; an honest node reports its own."""
        return trained

    def _key(self, step: int) -> tuple[int, ...]:
        return (self.cfg.seed, step, self.id)

    def _mask(self, step: int, weights: Weights | None) -> list[bytes]:
        if self.state.w0 is None:
            raise PayloadError("a mask round needs the initial weights, which this node has not received")
        current = self.mask
        own = self.cfg.prune.rewind == "none" and self.state.local is not None
        start = self.spec.apply(self.state.local if own else self.state.w0, current)
        new, trained = find_mask(self.cfg, self.trainer, self.data, start, current, self.steps[step].density, self._key(step))
        if self.cfg.prune.rewind == "none":
            self.state.local = trained if trained is not None else start
        new = self.forge_mask(new, current, start, step)
        return [codec.encode_mask(new, current, round=step, base_version=self.state.version, coder=self.cfg.codec.mask_coder,
                                  structured=self.structured, num_samples=self.data.num_samples)]

    def _train(self, step: int, weights: Weights | None) -> list[bytes]:
        if weights is None:
            if self.state.local is None:
                raise PayloadError("a training round without weights needs local weights, which this node does not have")
            weights = self.state.local
        mask = self.mask
        start = self.spec.apply(weights, mask)
        trained, _ = self.trainer.train(start, mask, self.data, self.cfg.train.epochs, generator(*self._key(step)))
        trained = self.forge_values(trained, start, step)
        return [codec.encode_values(trained, self.spec.supports(mask), round=step, base=self.state.version,
                                    num_samples=self.data.num_samples, dtype=self.cfg.codec.value_dtype)]

    def _scores(self, step: int, weights: Weights | None) -> list[bytes]:
        if self.state.w0 is None:
            raise PayloadError("a scoring round needs the initial weights, which this node has not received")
        scores = self.trainer.saliency(self.state.w0, None, self.data, self.cfg.prune.saliency_batches, generator(*self._key(step)))
        return [codec.encode_dense(Kind.SCORES, scores, round=step, num_samples=self.data.num_samples)]

    def _topk(self, step: int, weights: Weights | None) -> list[bytes]:
        if weights is None:
            raise PayloadError("a top-k round needs the global weights")
        trained, _ = self.trainer.train(weights, None, self.data, self.cfg.train.epochs, generator(*self._key(step)))
        update = [t - w for t, w in zip(trained, weights)]
        residual = self.state.residual or [np.zeros(s, dtype=np.float32) for s in self.spec.prunable_shapes]
        density = self.steps[step].density
        full = {i: update[i] + residual[j] for j, i in enumerate(self.spec.prunable)}
        for i, f in full.items():
            keep = top_k(np.abs(f), np.ones(f.shape, dtype=bool), keep_count(f.size, density)).reshape(f.shape)
            update[i] = np.where(keep, f, np.float32(0))
        body = codec.encode_sparse(update, round=step, num_samples=self.data.num_samples,
                                   dtype=self.cfg.codec.value_dtype, coder=self.cfg.codec.mask_coder)
        sent = codec.decode_sparse(body, self.spec.shapes).tensors
        self.state.residual = [full[i] - sent[i] for i in self.spec.prunable]
        return [body]
