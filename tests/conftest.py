"""Shared fixtures: small random checkpoints written once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from mixserve.model.presets import preset
from mixserve.platform.demo_checkpoint import write_checkpoint

torch.set_num_threads(2)

# Small shapes that keep the suite fast but exercise GQA, the rolling cache and top-2 routing.
SMALL_MIXTRAL = preset("tiny-mixtral", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, sliding_window=16)
SMALL_MISTRAL = preset("tiny-mistral", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, sliding_window=16)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mixtral"), SMALL_MIXTRAL, seed=11)


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mistral"), SMALL_MISTRAL, seed=12)


@pytest.fixture(scope="session")
def mixtral_llm(mixtral_dir):
    from mixserve import LLM

    return LLM(mixtral_dir, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (never a mock)."""
    ray = pytest.importorskip("ray")
    # Serve's autoscaling metrics arrive every 10 s by default; the scale-to-zero tests would
    # spend minutes waiting for them. Set before the cluster starts so that its actors see it.
    for name in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(name, "0.5")
    from mixserve.platform.ray_env import apply_serve_env

    apply_serve_env()  # the settings `mixserve serve` runs with
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# S3 tests talk to a real S3-protocol server (moto_server) on loopback. boto3 needs some
# credentials to sign with; they are set before any Ray worker starts so that actors inherit them.
for _name, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on a free loopback port for the whole session; yields its endpoint URL."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.1)
    # What production sets for an S3-compatible store; S3Checkpoint carries it to the actors.
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    proc.terminate()
    proc.wait(timeout=10)
