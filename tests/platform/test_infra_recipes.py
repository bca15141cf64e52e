"""The cloud recipes in infra/: the `ray up` config against Ray's own cluster-config schema,
the SkyPilot YAMLs through SkyPilot's own parser, and `mixserve plan` on real GPU shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from mixserve.model.args import ModelArgs
from mixserve.model.weights_source import LocalFolder
from mixserve.platform.cli import main
from mixserve.platform.config import DeploymentConfig
from mixserve.platform.plan import attention_side_bytes, expert_bytes
from mixserve.platform.ray_env import SERVE_ENV

INFRA = Path(__file__).resolve().parents[2] / "infra"
MIXTRAL_DEPLOY = INFRA / "deploy" / "mixtral-8x7b-8gpu.yaml"
SKYPILOT_VERSION = "0.14.1"


def test_the_ray_up_config_validates_against_rays_cluster_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray-up" / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` itself runs, defaults filled in
    types = {t["node_config"]["InstanceType"] for t in config["available_node_types"].values()}
    assert {"g5.12xlarge", "p4d.24xlarge", "p5.48xlarge"} <= types
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(t["node_config"]["IamInstanceProfile"]["Name"] == "mixserve-s3-read" for t in workers)
    assert any("[gpu]" in c for c in config["worker_setup_commands"])
    assert not any("[gpu]" in c for c in config["head_setup_commands"])  # a CPU head cannot build flash-attn
    text = (INFRA / "ray-up" / "aws-gpu.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "aws_secret" not in text.lower()
    # Every node starts Ray with the Serve settings `mixserve serve` uses on a local cluster.
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2  # the head's and the workers'
    for name, value in SERVE_ENV.items():
        assert all(f"{name}={value} " in c for c in starts), name


@pytest.fixture(scope="module")
def skypilot_python() -> str:
    """A cached virtual environment with SkyPilot (never a project dependency: it pins
    versions of click, uvicorn and others that Ray Serve needs newer)."""
    venv = Path(os.environ.get("MIXSERVE_SKYPILOT_VENV", Path.home() / ".cache" / "mixserve" / "skypilot-venv"))
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import sky; assert sky.__version__ == '{SKYPILOT_VERSION}'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"skypilot=={SKYPILOT_VERSION}"],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"could not install SkyPilot {SKYPILOT_VERSION} into {venv} (needs the package registry): {exc}")
    return str(python)


def test_the_skypilot_yamls_parse_as_a_task_and_a_service(skypilot_python, tmp_path):
    task, service = INFRA / "skypilot" / "mixserve-task.yaml", INFRA / "skypilot" / "mixserve-serve.yaml"
    result = subprocess.run(
        [skypilot_python, str(Path(__file__).with_name("skypilot_parse.py")), str(task), str(service)],
        capture_output=True, text=True, timeout=300, cwd=INFRA.parent, env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed[str(task)]["service"] is None
    assert set(parsed[str(task)]["accelerators"]) == {"A100-80GB:8", "H100:8"}
    assert parsed[str(task)]["has_setup"] and parsed[str(task)]["has_run"]
    assert parsed[str(service)]["service"] == {"readiness_path": "/health", "min_replicas": 1, "max_replicas": 4}
    # The deploy config needs its tenants file (gRPC and a public host need keys): both recipes bring it.
    tenants_file = DeploymentConfig.from_yaml(MIXTRAL_DEPLOY).tenants_file
    for recipe in (task, service):
        mounted = parsed[str(recipe)]["file_mounts"]
        assert any(source.endswith("tenants.yaml") for source in mounted.values()), mounted
        assert f"{tenants_file}" in parsed[str(recipe)]["setup"]


def test_the_mixtral_deploy_config_validates():
    config = DeploymentConfig.from_yaml(MIXTRAL_DEPLOY)
    assert config.model.source.startswith("s3://") and config.experts.shards == 6
    assert config.scales_to_zero and config.cluster is not None


@pytest.mark.parametrize("cluster", ["8xA100-80GB", "8xH100"])
def test_plan_places_mixtral_8x7b_on_8_big_gpus(cluster, capsys):
    assert main(["plan", str(MIXTRAL_DEPLOY), "--preset", "mixtral-8x7b", "--cluster", cluster]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("fits")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("0 ")]
    assert len(rows) == 8  # every GPU of the node used once
    assert sum("shard" in " ".join(r) for r in rows) == 6 and sum("attention" in " ".join(r) for r in rows) == 2
    assert all(float(r[2]) <= 80 * 0.9 for r in rows)


def test_plan_refuses_mixtral_8x7b_on_2_a10g_and_says_why(capsys):
    assert main(["plan", str(MIXTRAL_DEPLOY), "--preset", "mixtral-8x7b", "--cluster", "2xA10G"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "needs 8 GPUs" in err and "cluster has 2 A10G" in err


def test_plan_refuses_a_shard_larger_than_a_gpu(tmp_path, capsys):
    # Enough A10Gs, but an attention replica with its cache pool (or 2 experts) exceeds one.
    assert main(["plan", str(MIXTRAL_DEPLOY), "--preset", "mixtral-8x7b", "--cluster", "8xA10G"]) == 2
    assert "offers 21.6 GB usable" in capsys.readouterr().err


def test_plan_memory_formulas_match_a_real_checkpoint(mixtral_dir):
    """The plan's weight arithmetic, checked against the bytes the demo checkpoint really holds."""
    args = ModelArgs.from_folder(mixtral_dir)
    sizes = {}
    for path in LocalFolder(mixtral_dir).files():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                sizes[name] = t.numel() * t.element_size()
    experts = sum(n for name, n in sizes.items() if ".experts." in name)
    assert experts == args.num_experts * expert_bytes(args, 4)
    assert sum(sizes.values()) - experts == attention_side_bytes(args, 4)
