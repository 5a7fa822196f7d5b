"""How many actors go on each node, with which Ray resources, and which device each one uses. Pure.

A node with GPUs gets ``floor(GPUs / ray.num_gpus)`` actors (``num_gpus: 0.5`` puts two engines on a
card), bounded by its CPUs; a node without GPUs gets ``floor(CPUs / num_cpus)`` CPU actors when
``ray.cpu_nodes`` is on. ``ray.actors_per_node`` and ``ray.max_actors`` cap the counts. The driver
re-plans whenever the set of live nodes changes, so a node that joins gets actors and one that
leaves takes its count with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transcribe.config import Config

EPS = 1e-9  # 1 / 0.1 GPUs must be 10 actors, not 9.999...


@dataclass(frozen=True)
class NodeResources:
    """One live Ray node, as `ray.nodes()` reports it (total resources, not what is free now)."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    address: str = ""

    @classmethod
    def from_ray(cls, node: dict[str, Any]) -> NodeResources:
        res = node.get("Resources") or {}
        return cls(str(node["NodeID"]), float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                   str(node.get("NodeManagerAddress", "")))


@dataclass(frozen=True)
class ActorSpec:
    """The Ray resources of one actor, and the CUDA memory cap its process sets (None: no cap)."""

    num_cpus: float
    num_gpus: float = 0.0
    memory_fraction: float | None = None

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0


def _fits(total: float, each: float) -> int:
    return math.floor(total / each + EPS) if each > 0 else 0


def actors_for_node(node: NodeResources, cfg: Config) -> tuple[int, ActorSpec]:
    """(actor count, per-actor spec) for one node, before the cluster-wide cap."""
    rc = cfg.ray
    if node.gpus > 0 and _fits(node.gpus, rc.num_gpus) > 0:
        spec = ActorSpec(rc.num_cpus or 1.0, rc.num_gpus, rc.num_gpus if rc.num_gpus < 1 else None)
        count = min(_fits(node.gpus, spec.num_gpus), _fits(node.cpus, spec.num_cpus))
    elif rc.cpu_nodes:
        spec = ActorSpec(rc.num_cpus or float(cfg.funasr.ncpu))
        count = _fits(node.cpus, spec.num_cpus)
    else:
        return 0, ActorSpec(0.0)
    if rc.actors_per_node:
        count = min(count, rc.actors_per_node)
    return count, spec


def plan_actors(nodes: list[NodeResources], cfg: Config) -> dict[str, tuple[int, ActorSpec]]:
    """node_id -> (actor count, spec) over the live nodes; ``ray.max_actors`` keeps GPU nodes first."""
    plan = {n.node_id: actors_for_node(n, cfg) for n in nodes}
    cap = cfg.ray.max_actors
    if cap and sum(c for c, _ in plan.values()) > cap:
        left = cap
        # GPU nodes first (they are why the cluster exists), then in the order Ray lists the nodes.
        for node in sorted(nodes, key=lambda n: not plan[n.node_id][1].uses_gpu):
            count, spec = plan[node.node_id]
            plan[node.node_id] = (min(count, left), spec)
            left -= plan[node.node_id][0]
    return plan


def actor_device(funasr_device: str, device_priority: list[str], gpu_ids: list[Any]) -> tuple[str, list[str]]:
    """The (funasr.device, funasr.device_priority) an actor boots with.

    Ray sets CUDA_VISIBLE_DEVICES to the card(s) it assigned, so an actor with GPUs uses ``cuda:0`` (its
    card, renumbered) whatever `funasr.device` names. An actor without GPUs must not touch a card Ray gave
    to another actor: CUDA leaves the choice, so `auto` picks MPS on Apple silicon, else the CPU.
    """
    if gpu_ids:
        return "cuda:0", device_priority
    without_cuda = [d for d in device_priority if d != "cuda"] or ["cpu"]
    if funasr_device in ("cpu", "mps"):
        return funasr_device, without_cuda
    return "auto", without_cuda
