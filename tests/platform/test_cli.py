"""The mixserve command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixserve.model.args import ModelArgs
from mixserve.model.presets import PRESETS


def mixserve(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mixserve.platform.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
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


def test_init_checkpoint_never_replaces_the_folder_it_runs_in(tmp_path):
    here = tmp_path / "work"
    here.mkdir()
    (here / "keep.txt").write_text("precious")
    for target in (".", "..", str(tmp_path)):
        result = mixserve("init-checkpoint", target, "--preset", "tiny-mistral", "--force", cwd=here)
        assert result.returncode == 2 and "current folder" in result.stderr, result.stderr
    assert (here / "keep.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_serve_refuses_a_checkpoint_that_does_not_fit_before_starting_anything(tmp_path, mixtral_dir):
    import shutil

    wrong = tmp_path / "wrong-shapes"
    shutil.copytree(mixtral_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(mixtral_dir / "config.json", empty / "config.json")
    for folder, needle in ((wrong, "expected"), (empty, "safetensors")):
        path = tmp_path / f"{folder.name}.yaml"
        path.write_text(f"model: {{name: x, source: {folder}}}\nexperts: {{shards: 0}}\n")
        result = mixserve("serve", str(path))
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    twice = tmp_path / "tenants-twice.yaml"
    (tmp_path / "tenants.yaml").write_text("tenants:\n  - {name: acme, key_sha256: [" + "a" * 64 + "]}\n")
    twice.write_text(f"model: {{name: x, source: {mixtral_dir}}}\ntenants_file: {tmp_path / 'tenants.yaml'}\n"
                     "tenants:\n  - {name: acme, key_sha256: [" + "b" * 64 + "]}\n")
    result = mixserve("serve", str(twice))
    assert result.returncode == 2 and "defined twice" in result.stderr, result.stderr


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
