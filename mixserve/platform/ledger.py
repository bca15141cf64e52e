"""The tenant ledger: quotas, usage metering and request metrics for the whole cluster.

One instance (a single-replica Serve deployment) is shared by every ingress replica, HTTP
and gRPC alike, so requests/min, tokens/min and concurrency limits hold across all of them.
Per request an ingress makes two calls: `admit` before any work (a denial becomes a 429 with
Retry-After) and `settle` when the request ends, with what it really used.

Tokens/min reserves prompt + max_tokens at admission (a burst of concurrent requests cannot
overshoot the limit) and replaces the reservation with the real count at settlement.
A lease that is never settled (its ingress replica died) expires after `lease_s`; front doors
renew the leases of requests still running. A request the server fails (5xx) is taken out of the
tenant's requests/min and tokens/min windows: its client retries as told.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mixserve.platform.tenants import Tenant

WINDOW_S = 60.0
REPLICA_STATS_STALE_S = 5.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _locked(method):
    """Serve may run a deployment's sync methods on several threads: one at a time here."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def _remove_once(times: collections.deque, at: float) -> None:
    try:
        times.remove(at)
    except ValueError:  # already out of the window
        pass


@dataclass
class Admission:
    admitted: bool
    lease: str | None = None
    message: str = ""
    retry_after_s: float = 0.0


@dataclass
class _Lease:
    tenant: str
    started: float  # admitted at (its entry in the requests/min window)
    reserved_tokens: int
    alive_at: float  # admitted or last renewed at: the lease expires lease_s after


@dataclass
class _TenantState:
    requests: collections.deque = field(default_factory=collections.deque)  # admission times
    tokens: collections.deque = field(default_factory=collections.deque)  # (time, tokens) settled
    reserved: int = 0  # tokens reserved by requests in flight
    in_flight: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("requests", "rejected", "prompt_tokens", "completion_tokens"), 0))


class TenantLedger:
    def __init__(self, tenants: list[dict] | list[Tenant], lease_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self._tenants = {t.name: t for t in (Tenant.model_validate(t) for t in tenants)}
        self._state: dict[str, _TenantState] = collections.defaultdict(_TenantState)
        self._leases: dict[str, _Lease] = {}
        # Leases settled before their admission arrived -> when: dropped after lease_s (an
        # admission refused, or cancelled before it was sent, never comes).
        self._settled_early: dict[str, float] = {}
        self._ids = itertools.count()
        self._lease_s = lease_s
        self._clock = clock
        self._replicas: dict[str, tuple[float, dict]] = {}
        self._registry = CollectorRegistry()
        self._define_metrics()
        self._lock = threading.Lock()

    # ---- quotas ------------------------------------------------------------------------------
    @_locked
    def admit(self, tenant: str, prompt_tokens: int, max_tokens: int, lease: str | None = None) -> Admission:
        """Checks the tenant's limits and opens a lease (`lease` names it; else one is made).
        Ingresses send tenants without limits here without waiting for the answer."""
        now = self._clock()
        self._expire(now)
        if lease is not None and self._settled_early.pop(lease, None) is not None:  # its settle overtook it
            return Admission(True, lease)  # nothing left to hold
        state = self._state[tenant]
        limits = self._tenants.get(tenant)
        denial = self._check(limits, state, now, prompt_tokens + max_tokens) if limits else None
        if denial is not None:
            state.usage["rejected"] += 1
            self._m_rejected.labels(tenant).inc()
            return denial
        state.requests.append(now)
        state.reserved += prompt_tokens + max_tokens
        state.in_flight += 1
        state.usage["requests"] += 1
        lease = lease or f"lease-{next(self._ids)}"
        self._leases[lease] = _Lease(tenant, now, prompt_tokens + max_tokens, alive_at=now)
        self._m_in_flight.labels(tenant).set(state.in_flight)
        return Admission(True, lease)

    def _check(self, limits: Tenant, state: _TenantState, now: float, tokens: int) -> Admission | None:
        if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
            return Admission(False, message=f"tenant {limits.name!r} has {state.in_flight} requests in flight, "
                             f"its limit is {limits.max_concurrent}", retry_after_s=1.0)
        if limits.requests_per_min is not None and len(state.requests) >= limits.requests_per_min:
            wait = state.requests[0] + WINDOW_S - now
            return Admission(False, message=f"tenant {limits.name!r} is over its {limits.requests_per_min} "
                             "requests per minute", retry_after_s=max(wait, 0.1))
        if limits.tokens_per_min is not None:
            if tokens > limits.tokens_per_min:
                return Admission(False, message=f"this request needs up to {tokens} tokens (prompt + max_tokens "
                                 f"for each choice), more than tenant {limits.name!r}'s {limits.tokens_per_min} tokens "
                                 "per minute; lower max_tokens", retry_after_s=WINDOW_S)
            used = sum(n for _, n in state.tokens) + state.reserved
            if used + tokens > limits.tokens_per_min:
                wait = (state.tokens[0][0] + WINDOW_S - now) if state.tokens else 1.0
                return Admission(False, message=f"tenant {limits.name!r} is over its {limits.tokens_per_min} "
                                 "tokens per minute", retry_after_s=max(wait, 0.1))
        return None

    @_locked
    def settle(self, lease: str, prompt_tokens: int, completion_tokens: int, model: str, endpoint: str,
               status: str, ttft_s: float | None = None, inter_token_s: list[float] | None = None,
               engine_ttft_s: float | None = None) -> None:
        """Ends a lease with what the request really used, and records its metrics."""
        held = self._leases.pop(lease, None)
        if held is None:  # expired, settled twice, or overtook its fire-and-forget admission
            if len(self._settled_early) < 10_000:  # (a bound against a flood; each entry expires)
                self._settled_early[lease] = self._clock()
            return
        now = self._clock()
        state = self._state[held.tenant]
        state.in_flight -= 1
        state.reserved -= held.reserved_tokens
        if status.startswith("5"):
            # Failed by the server (overloaded, a replica gone, no replica in time): the client
            # retries as told, and the retry must not find its own failed tries over its limits.
            _remove_once(state.requests, held.started)
        else:
            state.tokens.append((now, prompt_tokens + completion_tokens))
        state.usage["prompt_tokens"] += prompt_tokens
        state.usage["completion_tokens"] += completion_tokens
        tenant = held.tenant
        self._m_in_flight.labels(tenant).set(state.in_flight)
        self._m_requests.labels(tenant, model, endpoint, status).inc()
        self._m_prompt_tokens.labels(tenant).inc(prompt_tokens)
        self._m_completion_tokens.labels(tenant).inc(completion_tokens)
        if ttft_s is not None:
            self._m_ttft.labels(tenant).observe(ttft_s)
        if engine_ttft_s is not None:
            self._m_engine_ttft.labels(tenant).observe(engine_ttft_s)
        for gap in inter_token_s or ():
            self._m_itl.labels(tenant).observe(gap)

    @_locked
    def renew(self, leases: list[str]) -> None:
        """Keeps these leases (requests still running) from expiring for another lease_s. Front
        doors renew their live leases every minute: expiry is for leases whose front door died
        before it could settle them, never for a long generation still running."""
        now = self._clock()
        for lease in leases:
            held = self._leases.get(lease)
            if held is not None:
                held.alive_at = now

    def record(self, calls: list[tuple[str, tuple]]) -> None:
        """Admissions and settlements of tenants without limits, batched by a front door
        (mixserve.platform.metering), applied in the order they happened."""
        for method, args in calls:
            if method == "admit":
                self.admit(*args)
            elif method == "settle":
                self.settle(*args)
            else:
                raise ValueError(f"unknown ledger call {method!r}")

    def _expire(self, now: float) -> None:
        for state in self._state.values():
            while state.requests and state.requests[0] <= now - WINDOW_S:
                state.requests.popleft()
            while state.tokens and state.tokens[0][0] <= now - WINDOW_S:
                state.tokens.popleft()
        for lease, at in list(itertools.islice(self._settled_early.items(), 64)):  # oldest first (insertion order)
            if at >= now - self._lease_s:
                break
            del self._settled_early[lease]
        for lease, held in list(self._leases.items()):
            if held.alive_at < now - self._lease_s:
                del self._leases[lease]
                state = self._state[held.tenant]
                state.in_flight -= 1
                state.reserved -= held.reserved_tokens

    # ---- usage and metrics -------------------------------------------------------------------
    @_locked
    def usage(self) -> dict[str, dict[str, int]]:
        self._expire(self._clock())
        return {name: {**s.usage, "in_flight": s.in_flight} for name, s in self._state.items()}

    @_locked
    def replica_stats(self, replica: str, stats: dict) -> None:
        """An attention replica's latest queue figures (running, waiting, free slots)."""
        self._replicas[replica] = (self._clock(), dict(stats))

    @_locked
    def metrics(self, shard_tokens: list[float] | None = None) -> bytes:
        """Prometheus text: the ledger's counters, the replicas' queues, the shards' load."""
        now = self._clock()
        fresh = {r: s for r, (t, s) in self._replicas.items() if t > now - REPLICA_STATS_STALE_S}
        self._replicas = {r: v for r, v in self._replicas.items() if r in fresh}
        for key, gauge in (("waiting", self._m_waiting), ("running", self._m_running), ("free_slots", self._m_free)):
            gauge.set(sum(s.get(key, 0) for s in fresh.values()))
        self._m_replicas.set(len(fresh))
        for shard, tokens in enumerate(shard_tokens or ()):
            self._m_shard_tokens.labels(str(shard)).set(tokens)
        return generate_latest(self._registry)

    def _define_metrics(self) -> None:
        r = self._registry
        self._m_requests = Counter("mixserve_requests", "Requests ended, by outcome.", ["tenant", "model", "endpoint", "status"], registry=r)
        self._m_rejected = Counter("mixserve_quota_rejections", "Requests refused for quota (HTTP 429).", ["tenant"], registry=r)
        self._m_prompt_tokens = Counter("mixserve_prompt_tokens", "Prompt tokens processed.", ["tenant"], registry=r)
        self._m_completion_tokens = Counter("mixserve_completion_tokens", "Tokens generated.", ["tenant"], registry=r)
        self._m_ttft = Histogram("mixserve_time_to_first_token_seconds", "Request arrival to first token.", ["tenant"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self._m_engine_ttft = Histogram("mixserve_engine_time_to_first_token_seconds",
                                        "Arrival at the attention replica's engine to first token (queueing + prefill).",
                                        ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self._m_itl = Histogram("mixserve_inter_token_latency_seconds", "Time between streamed tokens.", ["tenant"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self._m_in_flight = Gauge("mixserve_requests_in_flight", "Requests admitted and not yet ended.", ["tenant"], registry=r)
        self._m_waiting = Gauge("mixserve_queue_waiting", "Requests waiting for a cache slot, all replicas.", registry=r)
        self._m_running = Gauge("mixserve_queue_running", "Sequences running, all replicas.", registry=r)
        self._m_free = Gauge("mixserve_cache_slots_free", "Free rolling-cache slots, all replicas.", registry=r)
        self._m_replicas = Gauge("mixserve_attention_replicas_reporting", "Attention replicas that reported in the last 5 s.", registry=r)
        self._m_shard_tokens = Gauge("mixserve_expert_shard_tokens", "Tokens each expert shard received over the router's load window.",
                                     ["shard"], registry=r)
