"""The `mixserve` command line.

Bad input (an unknown preset, a broken checkpoint, invalid sampling values) prints one clear
line on stderr and exits with code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mixserve.errors import MixserveError

EXIT_USAGE = 2


def _cmd_init_checkpoint(ns: argparse.Namespace) -> int:
    from mixserve.model.presets import CONFIG_ONLY, PRESETS, preset
    from mixserve.platform.demo_checkpoint import write_checkpoint

    if ns.preset not in PRESETS:
        raise _Usage(f"unknown preset {ns.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if ns.preset in CONFIG_ONLY:
        raise _Usage(f"{ns.preset} is a config-only preset (its weights are tens of GB); use it for planning")
    target = Path(ns.dir).resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:  # `init-checkpoint .` would replace the folder it runs in
        raise _Usage(f"{ns.dir} is the current folder or one above it; name a folder for the checkpoint")
    if target.exists() and not target.is_dir():
        raise _Usage(f"{target} exists and is not a folder")
    if target.exists() and any(target.iterdir()) and not ns.force:
        raise _Usage(f"{target} exists and is not empty; pass --force to overwrite")
    # Write into a temporary sibling, then rename: an interrupted run leaves no half checkpoint.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_checkpoint(staging, preset(ns.preset), seed=ns.seed)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {ns.preset} (random weights, seed {ns.seed}) to {target}")
    return 0


def _cmd_generate(ns: argparse.Namespace) -> int:
    from mixserve.llm import LLM
    from mixserve.replicas.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed
    )
    llm = LLM(ns.checkpoint, max_model_len=ns.max_model_len, dtype=ns.dtype)
    if ns.stream:
        print(ns.prompt, end="", flush=True)
        for out in llm.stream(ns.prompt, params):
            print(out.new_text, end="", flush=True)
        print()
        return 0
    out = llm.generate(ns.prompt, params)[0]
    print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    import time

    import ray
    from ray import serve

    from mixserve.platform.app import APP_NAME, build_app
    from mixserve.platform.config import DeploymentConfig
    from mixserve.platform.direct_ingress import replica_http_ports
    from mixserve.platform.ray_env import apply_serve_env

    if ns.detach and not ns.address:
        # A local cluster started by this process dies with it: detaching needs one that outlives us.
        raise _Usage("--detach needs --address of a running Ray cluster (for one on this machine: "
                     "`ray start --head`, then `mixserve serve CONFIG --address auto --detach`)")
    config = DeploymentConfig.from_yaml(ns.config)
    app = build_app(config)  # checks the config against the checkpoint before anything starts
    config.serve_start_options()  # and the proxies' settings
    apply_serve_env()  # a local cluster started here inherits it; a running one has it from `ray start`
    ray.init(address=ns.address, include_dashboard=False, logging_level="WARNING")
    serve.start(**config.serve_start_options())
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # Serve's "Deploying application ... failed", with a replica's traceback
        print(f"mixserve: error: the deployment failed: {_cause(exc)} (the whole story is in Ray's logs)", file=sys.stderr)
        return 1
    grpc_note = f", gRPC on port {config.grpc.port}" if config.grpc.port else ""
    scaling = config.attention.autoscaling
    replicas = (f"{scaling.min_replicas} to {scaling.max_replicas} autoscaled" if scaling else str(config.attention.replicas))
    print(f"mixserve: serving {config.model.name} at http://{config.http.host}:{config.http.port}/v1{grpc_note} "
          f"({replicas} attention replicas, {config.experts.shards or 'in-process'} expert shards)",
          flush=True)
    direct = [p.url(config.http.host) + "/v1" for p in replica_http_ports(APP_NAME)]
    if direct:  # the same API, one hop shorter (no proxy): for a load balancer or a client on this node
        print(f"mixserve: the replicas also serve HTTP directly at {', '.join(direct)}", flush=True)
    if ns.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _connect(address: str):
    """Joins the running Ray cluster and returns mixserve's Serve application status."""
    import ray
    from ray import serve

    from mixserve.platform.app import APP_NAME

    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as exc:
        raise _Usage(f"no Ray cluster at {address!r}: {exc}") from None
    apps = serve.status().applications
    if APP_NAME not in apps:
        raise _Usage("mixserve is not running on this Ray cluster (start it with `mixserve serve CONFIG`)")
    return apps[APP_NAME]


def _experts_report(router) -> dict:
    status = router.status.remote().result(timeout_s=30)
    return {
        "placement_version": status.placement_version,
        "shards": status.shards,
        "alive": status.alive,
        "tokens_per_shard": status.shard_tokens,
        "tokens_per_expert": status.expert_tokens,
        "balance_max_over_mean": round(status.balance, 3),
        "moe_kernel": status.moe_kernel,
        "pinned_cpus": status.cpus,
    }


def _cmd_status(ns: argparse.Namespace) -> int:
    from ray import serve

    from mixserve.platform.app import APP_NAME
    from mixserve.platform.direct_ingress import replica_http_ports

    app = _connect(ns.address)
    report: dict = {"status": str(app.status), "deployments": {}}
    for name, dep in app.deployments.items():
        report["deployments"][name] = {"status": str(dep.status), "replicas": dict(dep.replica_states)}
    running = app.deployments["AttentionReplica"].replica_states.get("RUNNING", 0) if "AttentionReplica" in app.deployments else 0
    if running:
        replica = serve.get_deployment_handle("AttentionReplica", app_name=APP_NAME)
        report["attention"] = replica.stats.remote().result(timeout_s=30)
    else:  # scaled to zero: a request through a handle would start a replica just to answer this
        report["attention"] = {"running_replicas": 0}
    # Replicas serving HTTP themselves (on the deployment's http.host), besides the proxy.
    report["replica_http_ports"] = [vars(p) for p in replica_http_ports(APP_NAME)]
    if "ExpertRouter" in app.deployments:
        report["experts"] = _experts_report(serve.get_deployment_handle("ExpertRouter", app_name=APP_NAME))
    print(json.dumps(report, indent=2, default=str))
    return 0


def _cause(exc: Exception) -> str:
    """The innermost error named in a message that may hold a whole traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return errors[-1] if errors else (lines[0] if lines else type(exc).__name__)


def _cmd_rebalance(ns: argparse.Namespace) -> int:
    from ray import serve

    from mixserve.platform.app import APP_NAME

    app = _connect(ns.address)
    if "ExpertRouter" not in app.deployments:
        raise _Usage("this deployment keeps its experts in-process (experts.shards: 0): nothing to rebalance")
    router = serve.get_deployment_handle("ExpertRouter", app_name=APP_NAME)
    router.rebalance.remote().result(timeout_s=600)
    print(json.dumps(_experts_report(router), indent=2, default=str))
    return 0


class _Usage(Exception):
    """A user error the CLI reports on one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors also exit 2, with our format
        raise _Usage(message)


def _cmd_keys_add(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mixserve.platform.tenants import add_key

    try:
        key = add_key(ns.tenants, ns.tenant)
    except ValidationError as exc:
        raise _Usage(f"invalid tenant name {ns.tenant!r}: {exc.errors()[0]['msg']}") from None
    # The key is shown this once; only its SHA-256 digest is stored.
    print(key)
    print(f"added a key for tenant {ns.tenant!r} to {ns.tenants} (only its hash is stored; keep the key safe)", file=sys.stderr)
    return 0


def _cmd_upload(ns: argparse.Namespace) -> int:
    from mixserve.platform.weights.upload import upload_checkpoint

    if not ns.uri.startswith("s3://"):
        raise _Usage(f"{ns.uri!r} is not an s3:// URI (expected s3://bucket/prefix)")
    if not Path(ns.dir).is_dir():
        raise _Usage(f"{ns.dir} is not a folder")
    if ns.workers < 1 or ns.part_mib < 8:
        raise _Usage("--workers must be >= 1 and --part-mib >= 8 (S3's part floor is 5 MiB)")
    result = upload_checkpoint(ns.dir, ns.uri, workers=ns.workers, part_bytes=ns.part_mib << 20)
    checked = "sizes and ETags" if result.etag_checked else "sizes"
    print(
        f"uploaded {result.files} files ({result.bytes / 2**20:.1f} MiB) to {ns.uri} in {result.seconds:.1f}s; "
        f"{checked} verified, tensor hashes in mixserve-manifest.json"
    )
    return 0


def _cmd_plan(ns: argparse.Namespace) -> int:
    from mixserve.model.args import ModelArgs
    from mixserve.model.presets import PRESETS, preset
    from mixserve.platform.config import DeploymentConfig
    from mixserve.platform.plan import Cluster, PlanError, make_plan
    from mixserve.platform.weights import open_weights

    config = DeploymentConfig.from_yaml(ns.config)
    if ns.preset is not None:
        if ns.preset not in PRESETS:
            raise _Usage(f"unknown preset {ns.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        args = preset(ns.preset)
    else:
        args = ModelArgs.from_folder(open_weights(config.model.source, config.model.cache_dir).folder())
    if ns.cluster is not None:
        cluster = Cluster.parse(ns.cluster)
    elif config.cluster is not None:
        cluster = Cluster.of(config.cluster.gpu, config.cluster.gpus_per_node, config.cluster.nodes)
    else:
        raise _Usage("no cluster to plan for: add a `cluster` section to the config or pass --cluster 8xA100-80GB")
    try:
        plan = make_plan(config, args, cluster)
    except PlanError as exc:
        raise _Usage(f"does not fit: {exc}") from None
    print(plan.render())
    print("fits")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixserve", description="Serve Mistral / Mixtral with experts disaggregated on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    init = sub.add_parser("init-checkpoint", help="write a random-weight demo checkpoint (Hugging Face layout)")
    init.add_argument("dir", help="folder to write")
    init.add_argument("--preset", required=True, help="tiny-mixtral, tiny-mistral or small-mixtral")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    init.add_argument("--force", action="store_true", help="replace an existing folder")
    init.set_defaults(func=_cmd_init_checkpoint)

    gen = sub.add_parser("generate", help="complete one prompt in this process")
    gen.add_argument("checkpoint", help="checkpoint folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="deploy the topology in CONFIG on Ray Serve and serve HTTP")
    srv.add_argument("config", help="deployment YAML (see README)")
    srv.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    srv.add_argument("--detach", action="store_true", help="return once serving; the cluster given by --address keeps it running")
    srv.set_defaults(func=_cmd_serve)

    st = sub.add_parser("status", help="replicas, shards, placement and load of a running deployment")
    st.add_argument("--address", default="auto", help="Ray cluster address (default: the running local one)")
    st.set_defaults(func=_cmd_status)

    rb = sub.add_parser("rebalance", help="replicate the hottest experts into spare shard slots now")
    rb.add_argument("--address", default="auto", help="Ray cluster address (default: the running local one)")
    rb.set_defaults(func=_cmd_rebalance)

    up = sub.add_parser("upload", help="stage a checkpoint folder in S3 (multipart, parallel, verified)")
    up.add_argument("dir", help="checkpoint folder (safetensors)")
    up.add_argument("uri", help="destination, s3://bucket/prefix (credentials: boto3's default chain)")
    up.add_argument("--workers", type=int, default=8, help="parallel part uploads")
    up.add_argument("--part-mib", type=int, default=64, help="multipart part size in MiB")
    up.set_defaults(func=_cmd_upload)

    pl = sub.add_parser("plan", help="place CONFIG's shards and replicas on a GPU cluster and check memory")
    pl.add_argument("config", help="deployment YAML")
    pl.add_argument("--cluster", default=None, help="e.g. 8xA100-80GB, 4xA10G, 2x8xH100 (nodes x GPUs x type); "
                    "default: the config's cluster section")
    pl.add_argument("--preset", default=None, help="model shapes from a preset (mixtral-8x7b, mistral-7b, ...) "
                    "instead of the source's config.json")
    pl.set_defaults(func=_cmd_plan)

    keys = sub.add_parser("keys", help="manage tenants' API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    add = keys_sub.add_parser("add", help="create a key for TENANT: print it once, store only its hash")
    add.add_argument("tenant", help="tenant name (created if new)")
    add.add_argument("--tenants", default="tenants.yaml", help="tenants file to update (the config's tenants_file)")
    add.set_defaults(func=_cmd_keys_add)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        return ns.func(ns)
    except _Usage as exc:
        print(f"mixserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MixserveError, ValueError, OSError) as exc:
        print(f"mixserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
