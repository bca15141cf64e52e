"""Cold start from zero with weights in S3: time to first token, broken down, and S3 fetch speed.

For each model, in one run, against a moto S3 server on loopback (the same S3 protocol and
boto3 code paths as AWS, minus the network):
- `mixserve upload` of the demo checkpoint (MiB/s);
- fetch throughput: S3Checkpoint reading every tensor (parallel ranged GETs, manifest hashes
  checked, no cache) against a plain parallel boto3 download of the same files
  (`download_file`, 16 workers, 16 MiB parts), alternated, best of `--repeats` each;
- a cold start on a local Ray cluster: the model group deployed at zero (attention autoscaling
  min 0, 2 expert shards), one streaming request, and its time to first token broken down into
  scale-up (until the replica's constructor runs), expert shards (start + their S3 fetch and
  load), the replica's own S3 fetch and load, and the first token after ready; then the group
  is left to scale to zero and the same request repeated (weights from the local disk cache);
- bytes fetched per actor against the whole checkpoint.

Run:
    .venv/bin/python benchmarks/cold_start.py                  # tiny-mixtral and small-mixtral (about 10 min)
    .venv/bin/python benchmarks/cold_start.py --quick          # tiny-mixtral only
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, format_table, write_results  # noqa: E402

BUCKET = "mixserve-bench"
PART = 16 << 20
WORKERS = 16
SHARD_BYTES = 256 << 20


def s3_sized_checkpoint(name: str) -> Path:
    """The demo checkpoint (same seed, same weights) in files of at most SHARD_BYTES. moto reads a
    whole object for every ranged GET, so one 2 GB file would make each 16 MiB range cost a 2 GB
    copy; real S3 costs what the range costs (and real checkpoints come in ~5 GB files)."""
    from mixserve.model.presets import preset
    from mixserve.platform.demo_checkpoint import write_checkpoint

    folder = ROOT / "checkpoints" / f"{name}-s3"
    if not (folder / "config.json").is_file():
        print(f"writing {name} in {SHARD_BYTES >> 20} MiB files to {folder}", flush=True)
        write_checkpoint(folder, preset(name), seed=0, shard_bytes=SHARD_BYTES)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def plain_boto3_download(client, keys: list[str], target: Path) -> float:
    """Seconds for boto3's own parallel download of the whole objects."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=WORKERS)
    start = time.perf_counter()
    for key in keys:
        client.download_file(BUCKET, key, str(target / Path(key).name), Config=config)
    return time.perf_counter() - start


def mixserve_fetch(uri: str) -> tuple[float, int]:
    from mixserve.platform.weights import S3Checkpoint

    source = S3Checkpoint(uri, cache_dir=None, max_workers=WORKERS, part_bytes=PART)
    start = time.perf_counter()
    names = list(source.tensor_shapes())
    for _name, _tensor in source.read_tensors(names):
        pass
    return time.perf_counter() - start, source.report()["tensor_bytes"] + source.report()["header_bytes"]


def fetch_figures(client, uri: str, prefix: str, repeats: int) -> dict:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")["Contents"] if o["Key"].endswith(".safetensors")]
    total = sum(o["ContentLength"] for o in (client.head_object(Bucket=BUCKET, Key=k) for k in keys))
    plain, ours, fetched = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            plain.append(plain_boto3_download(client, keys, Path(tmp)))
            seconds, fetched = mixserve_fetch(uri)
            ours.append(seconds)
    return {"bytes": total, "plain_mib_s": total / min(plain) / 2**20, "ours_mib_s": fetched / min(ours) / 2**20}


def first_token_s(url: str, model: str) -> float:
    start = time.perf_counter()
    with requests.post(f"{url}/v1/completions", stream=True, timeout=900, json={
            "model": model, "prompt": [1, 415, 2936], "max_tokens": 8, "stream": True, "ignore_eos": True}) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.text[:300]}")
        lines = r.iter_lines(decode_unicode=True)
        for line in lines:
            if line.startswith("data: {"):
                elapsed = time.perf_counter() - start
                for _ in lines:  # drain the stream so the request completes
                    pass
                return elapsed
    raise SystemExit("no token came back")


def cold_start(name: str, uri: str, cache_dir: str, url: str) -> list[dict]:
    """Deploys at zero, then measures a cold start from S3 and one from the disk cache."""
    from ray import serve

    from mixserve.platform.app import APP_NAME, build_app
    from mixserve.platform.config import DeploymentConfig

    config = DeploymentConfig.model_validate({
        "model": {"name": name, "source": uri, "cache_dir": cache_dir, "download_workers": WORKERS},
        "attention": {
            "cpus_per_replica": 0.5,
            "engine": {"max_model_len": 512, "max_num_seqs": 8, "max_num_batched_tokens": 256},
            "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0,
                            "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2, "look_back_period_s": 1},
        },
        "experts": {"shards": 2, "cpus_per_shard": 0.5, "idle_release_s": 1},
    })
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    replica = serve.get_deployment_handle("AttentionReplica", APP_NAME)
    router = serve.get_deployment_handle("ExpertRouter", APP_NAME)
    runs = []
    for label in ("from S3", "from disk cache"):
        wait_for_zero(router)
        sent_at = time.time()
        ttft = first_token_s(url, name)
        startup = replica.startup_report.remote().result()
        shard_reports = router.weights_reports.remote().result()
        status = router.status.remote().result()
        weights = startup["weights"]
        runs.append({
            "label": label, "ttft": ttft,
            "scale_up": startup["started_at"] - sent_at,
            "shards": startup["experts_ready_at"] - startup["started_at"],
            "shards_group_start": status.last_start_s,
            "shard_fetch": max(r["seconds"] for r in shard_reports.values()),
            "replica_fetch": weights["seconds"],
            "replica_load": startup["weights_loaded_at"] - startup["experts_ready_at"] - weights["seconds"],
            "to_ready": startup["ready_at"] - startup["weights_loaded_at"],
            "first_token_after_ready": sent_at + ttft - startup["ready_at"],
            "bytes": {"replica": weights["tensor_bytes"], **{f"shard {s}": r["tensor_bytes"] for s, r in shard_reports.items()}},
            "cached": {"replica": weights["cached_bytes"], **{f"shard {s}": r["cached_bytes"] for s, r in shard_reports.items()}},
        })
    serve.delete(APP_NAME)
    return runs


def wait_for_zero(router, timeout_s: float = 180) -> None:
    from ray import serve

    from mixserve.platform.app import APP_NAME

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments["AttentionReplica"].replica_states
        if not states.get("RUNNING") and not states.get("STARTING") and not router.status.remote().result().running:
            return
        time.sleep(0.5)
    raise SystemExit("the model group did not reach zero")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mixtral,small-mixtral")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    ns = parser.parse_args()
    models = ["tiny-mixtral"] if ns.quick else ns.models.split(",")
    repeats = 2 if ns.quick else ns.repeats

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    # Serve's autoscaling metrics every 0.5 s instead of 10 s, so scale-down takes seconds here.
    for name in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(name, "0.5")
    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import boto3
    import ray
    from ray import serve

    from mixserve.platform.weights.upload import upload_checkpoint

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    sections = []
    try:
        for name in models:
            folder = s3_sized_checkpoint(name)
            uri = f"s3://{BUCKET}/{name}"
            with open(os.devnull, "w") as quiet:
                upload = upload_checkpoint(folder, uri, workers=8, out=quiet)
            fetch = fetch_figures(client, uri, name, repeats)
            with tempfile.TemporaryDirectory() as cache:
                runs = cold_start(name, uri, cache, url)
            sections.append(report(name, upload, fetch, runs))
            print(sections[-1], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        moto.terminate()
    if not ns.no_write:
        write_results("Cold start from zero, weights in S3", "\n\n".join(sections) + NOTES)


def report(name: str, upload, fetch: dict, runs: list[dict]) -> str:
    total = fetch["bytes"]
    ratio = fetch["ours_mib_s"] / fetch["plain_mib_s"]
    lines = [f"### {name}", "",
             f"Checkpoint {total / 2**20:.1f} MiB; `mixserve upload` {upload.bytes / upload.seconds / 2**20:.0f} MiB/s "
             f"(hashing and verification included).", "",
             format_table(["S3 fetch", "MiB/s", "x plain boto3"], [
                 ["plain boto3 download_file (16 workers)", fetch["plain_mib_s"], 1.0],
                 ["mixserve ranged GETs (16 workers, hashes checked)", fetch["ours_mib_s"], ratio],
             ]), ""]
    rows = []
    for r in runs:
        rows.append([r["label"], r["ttft"], r["scale_up"], r["shards"], r["shard_fetch"], r["replica_fetch"],
                     r["replica_load"], r["to_ready"], r["first_token_after_ready"]])
    lines.append(format_table(
        ["cold start", "first token s", "scale-up s", "expert shards s", "(shard S3 fetch s)", "replica S3 fetch s",
         "replica load s", "engine up s", "first token after ready s"], rows))
    lines.append("")
    first = runs[0]
    lines.append(format_table(
        ["actor", "bytes from S3", "share of checkpoint", "bytes from disk cache (2nd start)"],
        [[actor, n, f"{n / total:.1%}", runs[1]["cached"][actor]] for actor, n in first["bytes"].items()]
        + [["all actors", sum(first["bytes"].values()), f"{sum(first['bytes'].values()) / total:.1%}", ""]],
    ))
    return "\n".join(lines)


NOTES = """

'x plain boto3' is mixserve's S3 fetch throughput over boto3's own parallel download of the same
objects in the same run (target >= 0.90). The moto server runs on the same 2 cores as the client,
so both are bound by it; on EC2 against S3 the parallel GETs are network bound. 'expert shards s'
is the replica's wait for the router to start the shard group (actors placed, each fetching and
loading its own experts); 'scale-up s' is Serve noticing the request at zero and starting the
replica. The second start finds every tensor in the node's disk cache (re-hashed on reuse).
The checkpoints are the demo ones written in files of at most 256 MiB: moto reads a whole
object for each ranged GET, which real S3 does not.
"""


if __name__ == "__main__":
    main()
