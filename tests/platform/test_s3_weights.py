"""Weights from S3, against a real S3-protocol server (moto_server) on loopback: upload,
ranged fetches of only the tensors asked for, the disk cache, corrupt and truncated objects,
throttling and access errors."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import boto3
import pytest
import torch
from safetensors import safe_open

from mixserve import LLM, SamplingParams
from mixserve.errors import CheckpointError
from mixserve.expert_shards.shard import ExpertShard
from mixserve.model.weights_source import LocalFolder
from mixserve.platform.cli import main
from mixserve.platform.weights import S3Checkpoint
from mixserve.platform.weights.manifest import MANIFEST_NAME
from tests.platform.faulty_proxy import ACCESS_DENIED, SLOW_DOWN, FaultyProxy

BUCKET = "mixserve-tests"


def s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


@pytest.fixture(scope="module")
def uploaded(moto_s3, mixtral_dir):
    """The session's tiny Mixtral uploaded by `mixserve upload` (8 MiB parts: multipart happens)."""
    client = s3(moto_s3)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/tiny-mixtral"
    assert main(["upload", str(mixtral_dir), uri, "--part-mib", "8", "--workers", "4"]) == 0
    return uri


def local_tensor_bytes(folder) -> dict[str, bytes]:
    out = {}
    for path in LocalFolder(folder).files():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


def damaged_copy(endpoint: str, folder, prefix: str, damage) -> str:
    """Uploads `folder` to s3://BUCKET/prefix, then replaces its first weights file by damage(bytes)."""
    uri = f"s3://{BUCKET}/{prefix}"
    assert main(["upload", str(folder), uri]) == 0
    path = LocalFolder(folder).files()[0]
    s3(endpoint).put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=damage(bytearray(path.read_bytes())))
    return uri


def test_upload_stores_every_file_and_a_manifest_of_tensor_hashes(moto_s3, uploaded, mixtral_dir):
    client = s3(moto_s3)
    keys = {o["Key"].split("/", 1)[1] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="tiny-mixtral/")["Contents"]}
    local = {p.name for p in mixtral_dir.iterdir()}
    assert local <= keys and MANIFEST_NAME in keys
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"tiny-mixtral/{MANIFEST_NAME}")["Body"].read())
    hashes = {name: digest for f in manifest["files"].values() for name, digest in f["tensors"].items()}
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in local_tensor_bytes(mixtral_dir).items()}
    assert hashes == expected
    # The largest file went up in several parts (its ETag says how many) and was verified.
    etags = [o["ETag"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="tiny-mixtral/")["Contents"]]
    assert any("-" in etag for etag in etags)


def test_upload_refuses_bad_input_with_exit_code_2(moto_s3, mixtral_dir, tmp_path, capsys):
    assert main(["upload", str(mixtral_dir), "gs://bucket/x"]) == 2
    assert "s3://" in capsys.readouterr().err
    assert main(["upload", str(mixtral_dir), "s3://no-such-bucket-here/x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "model.bin").write_bytes(b"pickle")
    assert main(["upload", str(tmp_path), f"s3://{BUCKET}/bad"]) == 2
    assert "pickle" in capsys.readouterr().err


def test_model_from_s3_generates_what_the_local_folder_does(uploaded, mixtral_dir, tmp_path):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompt = [1, 415, 2936, 9060, 285]
    source = S3Checkpoint(uploaded, cache_dir=str(tmp_path / "cache"))
    remote = LLM(source, max_model_len=128).generate([prompt], params)[0]
    local = LLM(mixtral_dir, max_model_len=128).generate([prompt], params)[0]
    assert remote.token_ids == local.token_ids
    report = source.report()
    assert report["tensor_bytes"] == sum(len(b) for b in local_tensor_bytes(mixtral_dir).values())
    assert report["cached_bytes"] == 0


def test_an_expert_shard_fetches_only_its_experts_bytes(uploaded, mixtral_dir):
    source = S3Checkpoint(uploaded, cache_dir=None)
    shard = ExpertShard(0, source, [1, 6])
    tensors = local_tensor_bytes(mixtral_dir)
    own = sum(len(b) for name, b in tensors.items() if any(f".experts.{e}." in name for e in (1, 6)))
    assert source.report()["tensor_bytes"] == own
    assert own < sum(len(b) for b in tensors.values()) / 3
    assert shard.experts == (1, 6)


def test_the_disk_cache_is_reused_and_a_damaged_entry_is_fetched_again(uploaded, mixtral_dir, tmp_path):
    cache = tmp_path / "cache"
    total = sum(len(b) for b in local_tensor_bytes(mixtral_dir).values())
    first = S3Checkpoint(uploaded, cache_dir=str(cache))
    dict(first.read_tensors(list(first.tensor_shapes())))
    second = S3Checkpoint(uploaded, cache_dir=str(cache))
    tensors = dict(second.read_tensors(list(second.tensor_shapes())))
    assert second.report()["tensor_bytes"] == 0 and second.report()["cached_bytes"] == total

    name = "model.layers.0.self_attn.q_proj.weight"
    entry = next(p for p in cache.rglob(name) if p.is_file())
    damaged = bytearray(entry.read_bytes())
    damaged[5] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    third = S3Checkpoint(uploaded, cache_dir=str(cache))
    again = dict(third.read_tensors([name]))
    assert third.report()["tensor_bytes"] == len(damaged)
    assert again[name].equal(tensors[name])


def test_a_truncated_object_is_refused(moto_s3, mixtral_dir):
    uri = damaged_copy(moto_s3, mixtral_dir, "truncated", lambda data: bytes(data[:-1000]))
    with pytest.raises(CheckpointError, match="truncated"):
        LLM(S3Checkpoint(uri, cache_dir=None), max_model_len=64)


def flip_byte(data: bytearray, at: int) -> bytes:
    data[at] ^= 0xFF
    return bytes(data)


def test_a_corrupt_tensor_is_refused_by_the_manifest(moto_s3, mixtral_dir):
    # Same size, one byte inside the last tensor flipped: only the manifest's hashes can tell.
    uri = damaged_copy(moto_s3, mixtral_dir, "corrupt", lambda data: flip_byte(data, len(data) - 100))
    with pytest.raises(CheckpointError, match="manifest"):
        LLM(S3Checkpoint(uri, cache_dir=None), max_model_len=64)


def overwrite(data: bytearray, at: int, new: bytes) -> bytes:
    data[at:at + len(new)] = new
    return bytes(data)


def test_a_corrupt_header_is_refused(moto_s3, mixtral_dir):
    uri = damaged_copy(moto_s3, mixtral_dir, "badheader", lambda data: overwrite(data, 8, b"not json at!"))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        S3Checkpoint(uri, cache_dir=None).tensor_shapes()


def test_throttling_is_retried(moto_s3, uploaded, mixtral_dir):
    throttled = {"left": 4}

    def slow_down_ranged_gets(method: str, path: str):
        if method == "GET" and "tiny-mixtral/model" in path and throttled["left"] > 0:
            throttled["left"] -= 1
            return 503, SLOW_DOWN
        return None

    with FaultyProxy(moto_s3, slow_down_ranged_gets) as proxy:
        source = S3Checkpoint(uploaded, cache_dir=None, endpoint_url=proxy.endpoint)
        tensors = dict(source.read_tensors(list(source.tensor_shapes())))
    assert proxy.injected == 4
    assert len(tensors) == len(local_tensor_bytes(mixtral_dir))


def test_access_denied_missing_bucket_and_missing_prefix_are_clear(moto_s3, uploaded):
    with FaultyProxy(moto_s3, lambda method, path: (403, ACCESS_DENIED)) as proxy:
        with pytest.raises(CheckpointError, match="access denied"):
            S3Checkpoint(uploaded, cache_dir=None, endpoint_url=proxy.endpoint).folder()
    with pytest.raises(CheckpointError, match="does not exist"):
        S3Checkpoint("s3://no-such-bucket-anywhere/x", cache_dir=None).folder()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        S3Checkpoint(f"s3://{BUCKET}/nothing-here", cache_dir=None).folder()


def test_a_fetch_holds_only_the_tensor_it_is_filling(uploaded, mixtral_dir):
    """Buffers are made as each tensor's bytes come, and let go once it is handed over: a loader
    of a 90 GB checkpoint must not commit 90 GB of buffers before its first GET returns."""
    sizes = {name: len(b) for name, b in local_tensor_bytes(mixtral_dir).items()}
    source = S3Checkpoint(uploaded, cache_dir=None, max_workers=1, part_bytes=1 << 20)
    source.tensor_shapes()  # (headers and listing first: not what is measured)
    tracemalloc.start()
    try:
        for _, tensor in source.read_tensors(list(sizes)):
            del tensor  # the caller keeps nothing (a loader copies each tensor into its model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = max(sizes.values()) + (4 << 20)  # the largest tensor, plus the GETs in flight
    assert sum(sizes.values()) > 1.5 * bound  # (so that holding every buffer would fail)
    assert peak < bound, (peak, bound)


def test_actors_on_one_node_share_the_small_files_cache_safely(uploaded, mixtral_dir, tmp_path):
    """Several processes of a node (here threads) fetch config.json and the tokenizer into the
    same folder at once: each sees whole files."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(_) -> bytes:
        return (S3Checkpoint(uploaded, cache_dir=str(tmp_path)).folder() / "config.json").read_bytes()

    expected = (mixtral_dir / "config.json").read_bytes()
    for _ in range(3):
        for stale in tmp_path.rglob("*"):  # every round fetches afresh
            if stale.is_file():
                stale.unlink()
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(fetch, range(8))) == [expected] * 8


def test_a_stale_index_beside_a_new_upload_is_never_followed(moto_s3, uploaded, mixtral_dir, capsys):
    """An older sharded checkpoint's index and shards left under the prefix: the upload refuses
    the prefix, and a loader follows the manifest of what was uploaded, not the leftovers."""
    client, prefix = s3(moto_s3), "stale-index"
    leftovers = {"model-00001-of-00002.safetensors": b"old shard",
                 "model.safetensors.index.json": json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}).encode()}
    for name, body in leftovers.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    assert main(["upload", str(mixtral_dir), f"s3://{BUCKET}/{prefix}"]) == 2
    assert "model.safetensors.index.json" in capsys.readouterr().err
    # Uploaded anyway beside them (as an older mixserve, or another tool, would): loads right.
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/model.safetensors.index.json")
    assert main(["upload", str(mixtral_dir), f"s3://{BUCKET}/{prefix}"]) == 2  # the old shard is still there
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/model-00001-of-00002.safetensors")
    assert main(["upload", str(mixtral_dir), f"s3://{BUCKET}/{prefix}"]) == 0
    for name, body in leftovers.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    source = S3Checkpoint(f"s3://{BUCKET}/{prefix}", cache_dir=None)
    expected = local_tensor_bytes(mixtral_dir)
    got = {name: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for name, t in source.read_tensors(list(expected))}
    assert got == expected
