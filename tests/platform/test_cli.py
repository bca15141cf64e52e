"""The mixserve command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixserve.model.args import ModelArgs
from mixserve.model.presets import PRESETS


def mixserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mixserve.platform.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-mistral"])
def test_init_checkpoint_writes_a_loadable_hf_layout_with_the_tokenizer(tmp_path, name):
    target = tmp_path / name
    result = mixserve("init-checkpoint", str(target), "--preset", name, "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in target.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert ModelArgs.from_folder(target) == PRESETS[name]
    gen = mixserve("generate", str(target), "--prompt", "Hello", "--max-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    assert len(out["token_ids"]) <= 5 and out["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["init-checkpoint", "{tmp}/x", "--preset", "nope"], "unknown preset"),
        (["init-checkpoint", "{tmp}/x", "--preset", "mixtral-8x7b"], "config-only"),
        (["init-checkpoint", "{tmp}/x"], "--preset"),
        (["generate", "{tmp}/missing", "--prompt", "hi"], "neither config.json"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, argv, needle):
    result = mixserve(*[a.format(tmp=tmp_path) for a in argv])
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_generate_rejects_bad_sampling_values(mixtral_dir):
    for flags, needle in ((["--max-tokens", "0"], "max_tokens"), (["--top-p", "2"], "top_p")):
        result = mixserve("generate", str(mixtral_dir), "--prompt", "hi", *flags)
        assert result.returncode == 2 and needle in result.stderr


def test_init_checkpoint_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = mixserve("init-checkpoint", str(tmp_path), "--preset", "tiny-mistral")
    assert result.returncode == 2 and "--force" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    from mixserve.platform.tenants import KeyRing, hash_key, load_tenants

    path = tmp_path / "tenants.yaml"
    first = mixserve("keys", "add", "acme", "--tenants", str(path))
    second = mixserve("keys", "add", "acme", "--tenants", str(path))
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    key1, key2 = first.stdout.strip(), second.stdout.strip()
    assert key1.startswith("msk-") and key1 != key2
    stored = path.read_text()
    assert key1 not in stored and key2 not in stored and hash_key(key1) in stored
    ring = KeyRing(load_tenants(path))
    assert ring.lookup(key1).name == ring.lookup(key2).name == "acme" and ring.lookup("msk-other") is None
    bad = mixserve("keys", "add", "bad name!", "--tenants", str(path))
    assert bad.returncode == 2 and "invalid tenant name" in bad.stderr


def test_serve_detach_without_a_cluster_to_outlive_us_is_refused(tmp_path):
    result = mixserve("serve", str(tmp_path / "any.yaml"), "--detach")
    assert result.returncode == 2 and "--detach needs --address" in result.stderr
