"""Quotas, usage and metrics of the tenant ledger (pure logic, a fake clock)."""

from __future__ import annotations

from mixserve.platform.ledger import TenantLedger
from mixserve.platform.tenants import Tenant


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def ledger(**limits):
    clock = Clock()
    return TenantLedger([Tenant(name="t", **limits)], lease_s=300, clock=clock), clock


def test_requests_per_minute_hold_and_the_window_rolls():
    led, clock = ledger(requests_per_min=2)
    a, b = led.admit("t", 5, 5), led.admit("t", 5, 5)
    assert a.admitted and b.admitted
    denied = led.admit("t", 5, 5)
    assert not denied.admitted and "requests per minute" in denied.message
    assert 59 <= denied.retry_after_s <= 60
    clock.now += 61
    assert led.admit("t", 5, 5).admitted
    assert led.usage()["t"]["rejected"] == 1


def test_tokens_per_minute_reserve_max_tokens_then_count_what_was_used():
    led, clock = ledger(tokens_per_min=100)
    first = led.admit("t", 10, 60)  # reserves 70
    assert first.admitted
    assert not led.admit("t", 10, 30).admitted  # 70 + 40 > 100 while the first runs
    led.settle(first.lease, 10, 5, "m", "completions", "ok")  # really used 15
    assert led.admit("t", 10, 70).admitted  # 15 + 80 <= 100
    too_big = led.admit("t", 10, 200)
    assert not too_big.admitted and "lower max_tokens" in too_big.message


def test_concurrency_limit_and_settle_releases_it():
    led, _ = ledger(max_concurrent=1)
    first = led.admit("t", 1, 1)
    assert first.admitted and not led.admit("t", 1, 1).admitted
    led.settle(first.lease, 1, 1, "m", "chat", "ok")
    led.settle(first.lease, 1, 1, "m", "chat", "ok")  # twice: no double release
    assert led.usage()["t"]["in_flight"] == 0
    assert led.admit("t", 1, 1).admitted


def test_unsettled_leases_expire():
    led, clock = ledger(max_concurrent=1)
    assert led.admit("t", 1, 1).admitted
    clock.now += 301
    assert led.admit("t", 1, 1).admitted


def test_unknown_tenants_are_unlimited_and_metrics_are_prometheus_text():
    led, _ = ledger(requests_per_min=1)
    for _ in range(5):
        assert led.admit("", 1, 1).admitted  # the anonymous tenant of an open deployment
    ok = led.admit("t", 3, 4)
    led.settle(ok.lease, 3, 4, "tiny", "completions", "ok", ttft_s=0.02, inter_token_s=[0.01, 0.012])
    led.replica_stats("r1", {"waiting": 2, "running": 3, "free_slots": 29})
    text = led.metrics(shard_tokens=[10.0, 30.0]).decode()
    assert 'mixserve_requests_total{endpoint="completions",model="tiny",status="ok",tenant="t"} 1.0' in text
    assert 'mixserve_completion_tokens_total{tenant="t"} 4.0' in text
    assert 'mixserve_time_to_first_token_seconds_count{tenant="t"} 1.0' in text
    assert 'mixserve_inter_token_latency_seconds_count{tenant="t"} 2.0' in text
    assert "mixserve_queue_waiting 2.0" in text and "mixserve_cache_slots_free 29.0" in text
    assert 'mixserve_expert_shard_tokens{shard="1"} 30.0' in text


def test_a_settle_that_overtakes_its_admission_leaves_nothing_held():
    led, _ = ledger(max_concurrent=1)
    led.settle("lease-x", 1, 1, "m", "completions", "ok")
    assert led.admit("t", 1, 1, lease="lease-x").admitted
    assert led.admit("t", 1, 1).admitted  # the concurrency slot is free
    assert led.usage()["t"]["in_flight"] == 1


def test_renewed_leases_outlive_lease_s_and_stop_expiring_only_when_settled():
    led, clock = ledger(max_concurrent=1)
    long = led.admit("t", 1, 1)
    for _ in range(4):  # a generation running 4 x 200 s, its front door renewing it
        clock.now += 200
        led.renew([long.lease, "lease-unknown"])
        assert not led.admit("t", 1, 1).admitted  # still in flight: the concurrency limit holds
    assert led.usage()["t"]["in_flight"] == 1
    led.settle(long.lease, 1, 7, "m", "completions", "ok")  # charged in full, long after lease_s
    assert led.usage()["t"] == {"requests": 1, "rejected": 4, "prompt_tokens": 1, "completion_tokens": 7, "in_flight": 0}
    clock.now += 200
    led.renew([long.lease])  # a renewal racing its settlement holds nothing again
    assert led.admit("t", 1, 1).admitted


def test_early_settlements_are_forgotten_after_lease_s():
    led, clock = ledger(max_concurrent=1)
    led.settle("lease-x", 1, 1, "m", "completions", "client_closed")  # an admission refused or never sent
    clock.now += 301
    # Forgotten: an admission of that name arriving now (none would) is held like any other.
    assert led.admit("t", 1, 1, lease="lease-x").admitted
    assert led.usage()["t"]["in_flight"] == 1 and not led.admit("t", 1, 1).admitted


def test_requests_the_server_failed_do_not_count_against_the_rate_limits():
    led, clock = ledger(requests_per_min=1, tokens_per_min=100)
    failed = led.admit("t", 10, 40)
    assert not led.admit("t", 1, 1).admitted  # one request a minute
    clock.now += 5
    led.renew([failed.lease])  # (renewed before it failed: still found in the window)
    led.settle(failed.lease, 10, 0, "m", "completions", "503")  # overloaded: the client retries after 1 s
    retry = led.admit("t", 10, 80)  # neither its request nor its tokens count: 90 <= 100
    assert retry.admitted
    led.settle(retry.lease, 10, 80, "m", "completions", "ok")
    assert not led.admit("t", 1, 1).admitted  # a request that was served counts
    assert led.usage()["t"]["requests"] == 2
