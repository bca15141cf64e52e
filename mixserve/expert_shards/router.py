"""The expert router: a Ray Serve deployment that owns placement, shard health and load.

It starts the shard group (gang-placed actors) and hands attention replicas what they need to
dispatch directly: the current placement and the shards' channel addresses (and actor handles). Replicas report the
tokens they sent per shard and per expert; the router keeps a sliding window of that load and
publishes it, with the balance figure (max/mean tokens per shard). No token passes through it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, replace

from mixserve.expert_shards.actors import ShardGroup, start_shard_group
from mixserve.expert_shards.placement import Placement, max_over_mean
from mixserve.model.weights_source import WeightsSource

LOAD_WINDOW_S = 60.0
HEAL_EVERY_S = 2.0
AUTO_REBALANCE_ABOVE = 1.1  # max/mean tokens per shard below which a copy is not worth its memory
log = logging.getLogger(__name__)


@dataclass
class RouterStatus:
    placement_version: int
    shards: dict[int, list[int]]  # shard -> experts it holds
    shard_tokens: list[float]  # tokens per shard over the load window
    expert_tokens: list[float]  # tokens per expert over the load window
    balance: float  # max / mean tokens per shard (1.0 = even)
    alive: dict[int, bool]


class ExpertRouter:
    def __init__(
        self,
        checkpoint: str | WeightsSource,
        num_experts: int,
        n_shards: int,
        experts_per_shard: int | None = None,
        replicate_hottest: int = 0,
        dtype: str = "float32",
        cpus_per_shard: float = 1.0,
        gpus_per_shard: float = 0.0,
        num_threads: int | None = None,
        auto_rebalance_s: float = 0.0,
    ):
        self._start_args = dict(
            checkpoint=checkpoint, dtype=dtype, cpus_per_shard=cpus_per_shard,
            gpus_per_shard=gpus_per_shard, num_threads=num_threads,
        )
        self._replicate_hottest = replicate_hottest
        self._auto_rebalance_s = auto_rebalance_s
        self._placement = Placement.contiguous(num_experts, n_shards, capacity=experts_per_shard)
        self._group: ShardGroup = start_shard_group(placement=self._placement, **self._start_args)
        self._addresses = {sid: info.address for sid, info in self._group.infos.items()}
        self._lock = threading.Lock()  # guards the load reports
        self._change = threading.Lock()  # one placement change at a time (rebalance, heal)
        self._reports: collections.deque[tuple[float, list[int], list[int]]] = collections.deque()
        self._healer = threading.Thread(target=self._heal_forever, name="shard-healer", daemon=True)
        self._healer.start()

    # ---- what replicas ask ------------------------------------------------------------------
    def placement(self) -> Placement:
        return self._placement

    def shard_handles(self) -> dict:
        return dict(self._group.actors)

    def shard_addresses(self) -> dict[int, str]:
        """Where each shard's data channel listens (replicas connect to these directly)."""
        return dict(self._addresses)

    def report_load(self, shard_tokens: list[int], expert_tokens: list[int]) -> None:
        """Tokens a replica sent since its last report."""
        with self._lock:
            self._reports.append((time.monotonic(), list(shard_tokens), list(expert_tokens)))

    def rebalance(self) -> int:
        """Replicates up to `replicate_hottest` hot experts (by the load window) into spare shard
        slots. The shards load the new copies first; only then is the new placement published,
        so no token is ever sent to a shard that cannot serve it. Returns the placement version."""
        with self._change:
            return self._rebalance()

    def _rebalance(self) -> int:
        import ray

        _, expert_tokens = self._window()
        new = self._placement.replicate_hottest(expert_tokens, count=self._replicate_hottest)
        added = [
            (expert, shard)
            for expert, holders in enumerate(new.holders)
            for shard in holders
            if shard not in self._placement.holders[expert]
        ]
        ray.get([self._group.actors[shard].add_expert.remote(expert) for expert, shard in added])
        self._placement = new
        return new.version

    # ---- what operators ask -----------------------------------------------------------------
    def status(self) -> RouterStatus:
        shard_tokens, expert_tokens = self._window()
        placement = self._placement
        return RouterStatus(
            placement_version=placement.version,
            shards={s: placement.experts_of(s) for s in range(placement.n_shards)},
            shard_tokens=shard_tokens,
            expert_tokens=expert_tokens,
            balance=max_over_mean(shard_tokens),
            alive=self._alive(),
        )

    def weights_reports(self) -> dict[int, dict]:
        """What loading its weights cost each shard (bytes fetched, from where), by shard id."""
        import ray

        actors = dict(self._group.actors)
        return dict(zip(actors, ray.get([a.weights_report.remote() for a in actors.values()], timeout=30)))

    def _window(self) -> tuple[list[float], list[float]]:
        cutoff = time.monotonic() - LOAD_WINDOW_S
        with self._lock:
            while self._reports and self._reports[0][0] < cutoff:
                self._reports.popleft()
            shards = [0.0] * self._placement.n_shards
            experts = [0.0] * self._placement.num_experts
            for _, s_tokens, e_tokens in self._reports:
                for i, n in enumerate(s_tokens[: len(shards)]):
                    shards[i] += n
                for i, n in enumerate(e_tokens[: len(experts)]):
                    experts[i] += n
        return shards, experts

    def _heal_forever(self) -> None:
        last_rebalance = time.monotonic()
        while True:
            time.sleep(HEAL_EVERY_S)
            try:
                self.heal()
            except Exception:  # noqa: BLE001 - keep watching; the next round retries
                log.exception("could not restore a dead expert shard")
            if self._auto_rebalance_s and time.monotonic() - last_rebalance >= self._auto_rebalance_s:
                last_rebalance = time.monotonic()
                self._maybe_rebalance()

    def _maybe_rebalance(self) -> None:
        """Automatic rebalancing: copies hot experts when the load window shows imbalance.
        Copies are only ever added, and only when they lower max/mean, so steady load
        cannot make the placement flap."""
        # Judged on the expert load spread over the *current* holders: the shards' own token
        # counts in the window still carry the imbalance of the placement before the last copy.
        _, expert_tokens = self._window()
        if not any(expert_tokens) or self._placement.balance(expert_tokens) < AUTO_REBALANCE_ABOVE:
            return
        try:
            before = self._placement.version
            if self.rebalance() != before:
                log.warning("rebalanced the experts automatically (placement version %d)", self._placement.version)
        except Exception:  # noqa: BLE001 - the next round retries
            log.exception("automatic rebalance failed")

    def heal(self) -> list[int]:
        """Restarts every dead shard in its own bundle with the experts the placement gives it,
        then publishes the placement under a new version so replicas refresh their handles."""
        with self._change:
            return self._heal()

    def _heal(self) -> list[int]:
        import ray

        dead = [sid for sid, alive in self._alive().items() if not alive]
        if not dead:
            return []
        for sid in dead:
            actor = self._group.start_actor(sid, self._placement.experts_of(sid))
            info = ray.get(actor.info.remote(), timeout=300)
            self._group.actors[sid] = actor
            self._addresses[sid] = info.address
        self._placement = replace(self._placement, version=self._placement.version + 1)
        log.warning("restored expert shards %s (placement version %d)", dead, self._placement.version)
        return dead

    def _alive(self) -> dict[int, bool]:
        import ray

        alive = {}
        for sid, actor in self._group.actors.items():
            try:
                ray.get(actor.info.remote(), timeout=5)
                alive[sid] = True
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                alive[sid] = False
        return alive

    def __del__(self):
        group = getattr(self, "_group", None)
        if group is not None:
            group.shutdown()

