"""Turning a DeploymentConfig into a Ray Serve application: front door -> attention replicas ->
(expert router + shard actors). The front door runs inside the attention replicas (one
deployment) or apart from them (two), as http.front_door says."""

from __future__ import annotations

import functools

from ray import serve
from ray.serve import Application

from mixserve.expert_shards.router import ExpertRouter
from mixserve.model.args import ModelArgs
from mixserve.model.checkpoint import check_checkpoint
from mixserve.platform.config import ConfigError, DeploymentConfig
from mixserve.platform.experts_wiring import connect_remote_experts
from mixserve.platform.http_ingress import HttpIngress
from mixserve.platform.ledger import TenantLedger
from mixserve.platform.ray_env import remote_experts_replica_env
from mixserve.platform.weights import open_weights
from mixserve.replicas.deployment import AttentionReplica

APP_NAME = "mixserve"


def build_app(config: DeploymentConfig) -> Application:
    # A local folder, or S3: then every actor fetches its own tensors by ranged GETs.
    checkpoint = open_weights(config.model.source, config.model.cache_dir, config.model.download_workers)
    engine = config.attention.engine
    router = connector = None
    # The whole checkpoint against its config, from the headers: a bad one is refused here, with
    # every problem listed, rather than by each actor as it starts.
    args = ModelArgs.from_folder(checkpoint.folder())
    check_checkpoint(checkpoint, args)
    if config.experts.shards:
        if not args.is_moe:
            raise ConfigError(f"experts.shards is {config.experts.shards} but {config.model.source} is a dense model")
        if config.experts.shards > args.num_experts:
            raise ConfigError(f"experts.shards ({config.experts.shards}) exceeds the model's {args.num_experts} experts")
        router = serve.deployment(
            ExpertRouter, name="ExpertRouter", ray_actor_options={"num_cpus": 0},
            # Its calls are internal (each replica's heartbeat and load report every second,
            # placement reads): no access log line each. Errors are still logged.
            logging_config={"enable_access_log": False},
        ).bind(
            checkpoint,
            args.num_experts,
            config.experts.shards,
            config.experts.experts_per_shard,
            config.experts.replicate_hottest,
            engine.dtype,
            config.experts.cpus_per_shard,
            config.experts.gpus_per_shard,
            engine.num_threads,
            config.experts.moe_kernel,
            config.experts.auto_rebalance_s,
            # At zero attention replicas the shards go too; they start with the first replica.
            config.experts.idle_release_s if config.scales_to_zero else None,
            config.experts.pin_cpus,
        )
        connector = functools.partial(
            connect_remote_experts, timeout_s=config.experts.dispatch_timeout_s, transport=config.experts.transport,
            # (the compiled pack serves tokens on the CPU; an accelerator's take the torch path)
            compiled_dispatch=engine.device == "cpu",
        )
    tenants = [t.model_dump() for t in config.all_tenants()]
    # One ledger for the cluster: every admission and settlement of every ingress goes through it.
    ledger = serve.deployment(
        TenantLedger, name="TenantLedger", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0},
        # Its calls are internal (admissions, settlements, replica stats twice a second): no access log line each.
        logging_config={"enable_access_log": False},
    ).bind(tenants)
    autoscaling = config.attention.autoscaling
    scaling = (
        {"autoscaling_config": autoscaling.serve_config()} if autoscaling is not None else {"num_replicas": config.attention.replicas}
    )
    replica_args = {
        "checkpoint": checkpoint, "model_name": config.model.name, "engine_config": engine.model_dump(),
        "expert_router": router, "experts_connector": connector, "stats_target": ledger,
        "stats_reporter": report_replica_stats,
    }
    replica_resources = replica_actor_options(config)
    # A replica takes 4 x max_num_seqs requests at once (its batch, refilled as sequences end).
    replica_ongoing = 4 * engine.max_num_seqs
    door_args = (ledger, router, config.model.name, checkpoint, tenants, config.model.system_prompt,
                 config.http.max_body_bytes, config.attention.cold_start_timeout_s, engine.max_model_len)
    if config.front_door_in_replicas:
        # The attention replicas are the ingress: the proxy streams straight from the engine's process.
        # The replica bounds its own queue (503 in OpenAI's shape), so Serve's limit is the connections.
        in_process = {"replica": replica_args, "capacity": replica_ongoing + config.attention.max_queued_requests}
        ingress = HttpIngress.options(
            name="AttentionReplica", **scaling, max_ongoing_requests=max(config.http.max_connections, in_process["capacity"]),
            ray_actor_options=replica_resources,
        )
        return ingress.bind(None, *door_args, in_process=in_process)
    replica = serve.deployment(
        AttentionReplica,
        name="AttentionReplica",
        **scaling,
        max_ongoing_requests=replica_ongoing,
        max_queued_requests=config.attention.max_queued_requests,
        ray_actor_options=replica_resources,
    ).bind(**replica_args)
    ingress = HttpIngress.options(
        num_replicas=config.http.ingress_replicas, max_ongoing_requests=config.http.max_connections,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica, *door_args)


def replica_actor_options(config: DeploymentConfig) -> dict:
    """Ray actor options of the attention replicas: their resources, and with the experts on
    shards the environment that leaves the shards their cores (ray_env.py)."""
    options: dict = {"num_cpus": config.attention.cpus_per_replica, "num_gpus": config.attention.gpus_per_replica}
    if config.experts.shards:
        options["runtime_env"] = {"env_vars": remote_experts_replica_env()}
    return options


async def report_replica_stats(ledger, stats: dict) -> None:
    """How an attention replica's queue figures reach the ledger (and so /metrics)."""
    replica = serve.get_replica_context().replica_id.unique_id
    await ledger.replica_stats.remote(replica, stats)
