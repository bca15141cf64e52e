"""Connecting an attention replica to the expert side: the one place that knows both.

`connect_remote_experts` runs inside each attention replica (awaited by its constructor): it
asks the router for the placement and the shards' channel addresses (or actor handles), builds the ShardClient the
replica dispatches through, starts reporting the replica's load to the router, and returns the
feed-forward factory the replica's model is built with.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from mixserve.expert_shards.actors import RayActorTransport
from mixserve.expert_shards.channel import TcpTransport
from mixserve.expert_shards.dispatch import ShardClient, remote_feed_forward

log = logging.getLogger(__name__)
REPORT_EVERY_S = 1.0


async def connect_remote_experts(router, timeout_s: float = 30.0, transport: str = "tcp", compiled_dispatch: bool = True):
    """compiled_dispatch: pack and combine through the compiled CPU kernel (dispatch_kernel.py),
    for replicas that compute on the CPU; its first build on a node takes ~25 s, off the event loop."""
    # Attaching starts the shards if the group was scaled to zero; heartbeats keep them up.
    replica = _replica_id()
    placement = await router.attach.remote(replica)
    # Heard from while it connects and builds (the kernel's first build takes ~25 s): a short
    # experts.idle_release_s must not release the shards this replica has just woken.
    starting = asyncio.get_running_loop().create_task(_heartbeat_while_starting(router, replica))
    try:
        if transport == "tcp":
            addresses = await router.shard_addresses.remote()
            channel = await asyncio.to_thread(TcpTransport, addresses, timeout_s=timeout_s)
        else:
            channel = RayActorTransport(await router.shard_handles.remote(), timeout_s=timeout_s)
        client = await asyncio.to_thread(ShardClient, placement, channel, compiled_dispatch)
    finally:
        starting.cancel()
    asyncio.get_running_loop().create_task(_report_load(router, client, replica))
    return remote_feed_forward(client)


async def _heartbeat_while_starting(router, replica: str) -> None:
    while True:
        await asyncio.sleep(REPORT_EVERY_S)
        try:
            await router.heartbeat.remote(replica)
        except Exception:  # noqa: BLE001 - the next beat, or the first load report, tries again
            log.warning("could not send a heartbeat to the expert router", exc_info=True)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests, scripts): any unique name
        return f"replica-{uuid.uuid4().hex[:8]}"


async def _report_load(router, client: ShardClient, replica: str) -> None:
    """Every second: a heartbeat (which keeps the shards up and tells the placement version),
    and the tokens this replica dispatched since the last report."""
    shards, experts = client.load_counts()
    sent_shards, sent_experts = [0] * len(shards), [0] * len(experts)
    while True:
        await asyncio.sleep(REPORT_EVERY_S)
        try:
            version = await router.heartbeat.remote(replica)
            if version != client.placement.version:
                placement = await router.placement.remote()
                # A new version may carry restarted shards: take their addresses first.
                if isinstance(client.transport, TcpTransport):
                    client.transport.set_addresses(await router.shard_addresses.remote())
                else:
                    client.transport.actors = await router.shard_handles.remote()
                client.set_placement(placement)  # read once per layer call: the swap is atomic
        except Exception:  # noqa: BLE001 - keep dispatching by the last known placement
            log.warning("could not refresh the expert placement", exc_info=True)
        shards, experts = client.load_counts()
        delta_s = [a - b for a, b in zip(shards, sent_shards)]
        delta_e = [a - b for a, b in zip(experts, sent_experts)]
        if any(delta_s):
            try:
                await router.report_load.remote(delta_s, delta_e)
                sent_shards, sent_experts = shards, experts
            except Exception:  # noqa: BLE001 - a missed report only delays the load picture
                log.warning("could not report expert load to the router", exc_info=True)
