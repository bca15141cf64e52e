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
from dataclasses import dataclass, field, replace

from mixserve.expert_shards.actors import ShardGroup, start_shard_group
from mixserve.expert_shards.placement import Placement, max_over_mean
from mixserve.model.weights_source import WeightsSource

LOAD_WINDOW_S = 60.0
REPLICA_SILENT_S = 5.0  # an attention replica not heard from for this long counts as gone
HEAL_EVERY_S = 2.0
# A shard loading its experts (a restart, or a copy of a hot expert): past this it counts as
# failed, and the router's lock, which replicas attaching wait on, is released.
SHARD_LOAD_TIMEOUT_S = 300.0
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
    running: bool = True  # False while released (scaled to zero)
    attention_replicas: int = 0  # attention replicas heard from in the last few seconds
    last_start_s: float = 0.0  # seconds the last shard group start took
    moe_kernel: str | None = None  # the kernel the shards run ('auto' resolved); None while released
    cpus: dict[int, list[int]] = field(default_factory=dict)  # shard -> cores it is pinned to ([]: not pinned)


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
        moe_kernel: str = "auto",
        auto_rebalance_s: float = 0.0,
        release_idle_s: float | None = None,
        pin_cpus: str = "auto",
    ):
        self._start_args = dict(
            checkpoint=checkpoint, dtype=dtype, cpus_per_shard=cpus_per_shard,
            gpus_per_shard=gpus_per_shard, num_threads=num_threads, moe_kernel=moe_kernel, pin_cpus=pin_cpus,
        )
        self._replicate_hottest = replicate_hottest
        self._auto_rebalance_s = auto_rebalance_s
        self._base = Placement.contiguous(num_experts, n_shards, capacity=experts_per_shard)
        self._placement = self._base
        self._group: ShardGroup | None = None  # None while released (no attention replica for a while)
        self._addresses: dict[int, str] = {}
        self._lock = threading.Lock()  # guards the load reports and heartbeats
        self._change = threading.Lock()  # one placement change at a time (start, release, rebalance, heal)
        self._reports: collections.deque[tuple[float, list[int], list[int]]] = collections.deque()
        # Scale to zero: with release_idle_s set, the shards start with the first attention
        # replica and stop once none has been heard from for that long.
        self._release_idle_s = release_idle_s
        self._heard: dict[str, float] = {}  # attention replica -> last heartbeat (monotonic)
        self._last_heard = time.monotonic()
        self._pool_size = 0
        self.starts = 0  # shard group starts (the first, and one per return from zero)
        self.last_start_s = 0.0  # how long the last start took (actors placed, weights loaded)
        if release_idle_s is None:
            self._start_group()
        self._healer = threading.Thread(target=self._heal_forever, name="shard-healer", daemon=True)
        self._healer.start()

    # ---- the group's life ---------------------------------------------------------------------
    def _start_group(self) -> None:
        """Starts the whole shard group on the base placement (copies of hot experts are made
        again as load shows them); a new version makes replicas take the new addresses."""
        started = time.monotonic()
        group = start_shard_group(placement=self._base, **self._start_args)
        self._addresses = {sid: info.address for sid, info in group.infos.items()}
        version = self._placement.version + 1 if self.starts else self._placement.version
        self._placement = replace(self._base, version=version)
        self._group = group
        self.last_start_s = time.monotonic() - started
        self._last_heard = time.monotonic()  # the idle clock starts once the shards are up
        self.starts += 1
        log.warning("expert shards started in %.1fs (placement version %d)", self.last_start_s, version)

    def _release_if_idle(self) -> None:
        with self._change:
            if self._group is None or self._release_idle_s is None:
                return
            # A replica counts as gone only after REPLICA_SILENT_S without a heartbeat: a busy one
            # (loading weights, a long step on a saturated node) may skip a beat or two.
            if time.monotonic() - self._last_heard < self._release_idle_s + REPLICA_SILENT_S:
                return
            self._group.shutdown()  # kills the actors and removes the placement group: resources go back
            self._group, self._addresses = None, {}  # (only once that worked: a failure is retried)
            log.warning("no attention replica for %.0fs: expert shards released", self._release_idle_s + REPLICA_SILENT_S)

    def attach(self, replica: str) -> Placement:
        """An attention replica starting (or still alive): the shards are started if they were
        released, and the placement to dispatch by is returned."""
        with self._change:
            self._heartbeat(replica)
            if self._group is None:
                self._start_group()
            return self._placement

    def heartbeat(self, replica: str) -> int:
        """A live attention replica, every second; returns the placement version (a change
        means: fetch the placement and addresses). Restarts released shards if need be."""
        if self._group is None:
            return self.attach(replica).version
        self._heartbeat(replica)
        return self._placement.version

    def _heartbeat(self, replica: str) -> None:
        with self._lock:
            self._last_heard = self._heard[replica] = time.monotonic()

    def live_replicas(self) -> int:
        cutoff = time.monotonic() - REPLICA_SILENT_S
        with self._lock:
            return sum(t >= cutoff for t in self._heard.values())

    # ---- what replicas ask ------------------------------------------------------------------
    def placement(self) -> Placement:
        return self._placement

    def shard_handles(self) -> dict:
        return dict(self._group.actors) if self._group is not None else {}

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

        if self._group is None:
            return self._placement.version
        _, expert_tokens = self._window()
        new = self._placement.replicate_hottest(expert_tokens, count=self._replicate_hottest)
        added = [
            (expert, shard)
            for expert, holders in enumerate(new.holders)
            for shard in holders
            if shard not in self._placement.holders[expert]
        ]
        # (on a timeout the placement stays as it was: copies that did load sit unused until the next try)
        ray.get([self._group.actors[shard].add_expert.remote(expert) for expert, shard in added], timeout=SHARD_LOAD_TIMEOUT_S)
        self._placement = new
        return new.version

    # ---- what operators ask -----------------------------------------------------------------
    def status(self) -> RouterStatus:
        shard_tokens, expert_tokens = self._window()
        placement, group = self._placement, self._group
        return RouterStatus(
            placement_version=placement.version,
            shards={s: placement.experts_of(s) for s in range(placement.n_shards)},
            shard_tokens=shard_tokens,
            expert_tokens=expert_tokens,
            balance=max_over_mean(shard_tokens),
            alive=self._alive(),
            running=self._group is not None,
            last_start_s=self.last_start_s,
            attention_replicas=self.live_replicas(),
            moe_kernel=self._moe_kernel(),
            cpus={sid: list(info.cpus) for sid, info in group.infos.items()} if group is not None else {},
        )

    def _moe_kernel(self) -> str | None:
        group = self._group
        return next((info.moe_kernel for info in group.infos.values()), None) if group is not None else None

    def weights_reports(self) -> dict[int, dict]:
        """What loading its weights cost each shard (bytes fetched, from where), by shard id."""
        import ray

        actors = dict(self._group.actors) if self._group is not None else {}
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
                self._release_if_idle()
            except Exception:  # noqa: BLE001 - this thread must live on: the next round retries
                log.exception("could not release the idle expert shards")
            if self._group is None:
                continue
            try:
                self.heal()
            except Exception:  # noqa: BLE001 - keep watching; the next round retries
                log.exception("could not restore a dead expert shard")
            # Expert capacity follows the attention pool: when it grows, hot experts get their
            # copies now rather than at the next periodic check.
            pool = self.live_replicas()
            grew, self._pool_size = 0 < self._pool_size < pool, pool  # the first replica is no growth
            periodic = self._auto_rebalance_s and time.monotonic() - last_rebalance >= self._auto_rebalance_s
            if periodic or (grew and self._replicate_hottest):
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

        if self._group is None:
            return []
        dead = [sid for sid, alive in self._alive().items() if not alive]
        if not dead:
            return []
        for sid in dead:
            ray.kill(self._group.actors[sid], no_restart=True)  # a sick one still holds its bundle
        self._group.release_cpu_slots(dead)
        for sid in dead:  # all restarts first: they load their experts side by side
            # (kept in the group even if it fails to start: the next round finds it dead and kills it)
            self._group.actors[sid] = self._group.start_actor(sid, self._placement.experts_of(sid))
        restored, failed = [], []
        for sid in dead:
            try:
                info = ray.get(self._group.actors[sid].info.remote(), timeout=SHARD_LOAD_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - reported below, after the others are published
                failed.append((sid, exc))
                continue
            self._group.infos[sid] = info
            self._addresses[sid] = info.address
            restored.append(sid)
        if restored:  # a new version makes replicas take the new addresses
            self._placement = replace(self._placement, version=self._placement.version + 1)
            log.warning("restored expert shards %s (placement version %d)", restored, self._placement.version)
        if failed:
            raise RuntimeError(f"expert shards {[sid for sid, _ in failed]} did not restart: {failed[0][1]!r}")
        return restored

    def _alive(self) -> dict[int, bool]:
        import ray

        alive = {}
        for sid, actor in (self._group.actors if self._group is not None else {}).items():
            try:
                ray.get(actor.info.remote(), timeout=5)
                alive[sid] = True
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError):
                alive[sid] = False  # dead, sick (its data channel stopped) or unresponsive
        return alive

    def shutdown(self) -> None:
        """Stops the shards and releases their placement group."""
        group, self._group = getattr(self, "_group", None), None
        if group is not None:
            group.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - at interpreter exit Ray may already be gone
            pass

