"""`mixserve upload DIR s3://bucket/prefix`: stage a local checkpoint in S3, verified.

boto3's transfer manager does the multipart, parallel upload (a well-kept implementation of
part sizing, retries and concurrency). Around it: one local pass over each file computes the
ETag S3 will report (MD5 for a single part; MD5 of the part MD5s plus "-N" for multipart) and
each tensor's SHA-256; after the upload each object's size and ETag are compared with those,
and the manifest of tensor hashes is written last, so that loaders can check every tensor
they fetch. A store whose ETags are not MD5-based (SSE-KMS) is checked by size only, with a
warning.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mixserve.errors import CheckpointError
from mixserve.model.weights_source import HF_INDEX, LocalFolder
from mixserve.platform.weights.header import LENGTH_BYTES, header_length, parse_header
from mixserve.platform.weights.manifest import MANIFEST_NAME, Manifest
from mixserve.platform.weights.s3_client import S3Location, endpoint_from_env, list_prefix, s3_client, s3_error
from mixserve.platform.weights.s3_source import SMALL_FILES

MIN_PART_BYTES = 8 << 20  # S3's floor is 5 MiB per part; 8 MiB is also boto3's default
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")


@dataclass
class FileDigest:
    size: int
    etag: str  # what S3 will report for this file uploaded with `part_bytes` parts
    tensors: dict[str, str]  # safetensors files: tensor name -> sha256


@dataclass
class UploadResult:
    files: int
    bytes: int
    seconds: float
    etag_checked: bool


def digest_file(path: Path, part_bytes: int, safetensors: bool) -> FileDigest:
    """One read of `path`: its expected S3 ETag and, for safetensors, each tensor's SHA-256."""
    size = path.stat().st_size
    entries = []
    if safetensors:
        with open(path, "rb") as f:
            n = header_length(f.read(LENGTH_BYTES), str(path))
            entries = sorted(parse_header(f.read(n), size, str(path)).values(), key=lambda e: e.start)
    hashers = {e.name: hashlib.sha256() for e in entries}
    part_md5s = []
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            part_md5s.append(hashlib.md5(chunk, usedforsecurity=False).digest())
            end = offset + len(chunk)
            for e in entries:
                lo, hi = max(e.start, offset), min(e.end, end)
                if lo < hi:
                    hashers[e.name].update(memoryview(chunk)[lo - offset:hi - offset])
            offset = end
    if size < part_bytes:  # one PUT: the ETag is the file's MD5, i.e. its only part's
        etag = (part_md5s[0] if part_md5s else hashlib.md5(b"", usedforsecurity=False).digest()).hex()
    else:
        etag = f"{hashlib.md5(b''.join(part_md5s), usedforsecurity=False).hexdigest()}-{len(part_md5s)}"
    return FileDigest(size, etag, {name: h.hexdigest() for name, h in hashers.items()})


class _Progress:
    """A one-line progress bar on stderr (a carriage-return line on terminals, every 10 s otherwise)."""

    def __init__(self, total: int, out: TextIO):
        self.total, self.out, self.done = total, out, 0
        self.started = self.last = time.monotonic()
        self.tty = out.isatty()
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:  # boto3 calls this from its worker threads
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= (0.5 if self.tty else 10.0):
                self.last = now
                self.show(end="\r" if self.tty else "\n")

    def show(self, end: str = "\n") -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        print(
            f"upload [{'#' * filled}{'.' * (width - filled)}] {self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB "
            f"({self.done / elapsed / 2**20:.1f} MiB/s)",
            end=end, file=self.out, flush=True,
        )


def upload_checkpoint(
    folder: str | Path, uri: str, workers: int = 8, part_bytes: int = 64 << 20, out: TextIO = sys.stderr
) -> UploadResult:
    """Uploads the checkpoint in `folder` to `uri` (s3://bucket/prefix) and verifies it."""
    from boto3.s3.transfer import TransferConfig

    part_bytes = max(part_bytes, MIN_PART_BYTES)
    location = S3Location.parse(uri)
    local = LocalFolder(folder)
    weights = local.files()  # refuses pickle-only and empty folders
    small = [local.path / name for name in SMALL_FILES if name != MANIFEST_NAME and (local.path / name).is_file()]
    if not any(p.name in ("config.json", "params.json") for p in small):
        raise CheckpointError(f"{folder} has neither config.json nor params.json")
    client = s3_client(endpoint_from_env(), max_pool_connections=max(10, workers))
    try:
        client.head_bucket(Bucket=location.bucket)
    except Exception as exc:  # noqa: BLE001 - a missing bucket or no access is a clear error, before any work
        raise s3_error(exc, location.uri()) from None

    _refuse_leftovers(client, location, {p.name for p in [*weights, *small]})
    started = time.monotonic()
    digests = {p: digest_file(p, part_bytes, safetensors=p in weights) for p in [*weights, *small]}
    total = sum(d.size for d in digests.values())
    progress = _Progress(total, out)
    config = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes, max_concurrency=workers)
    etag_checked = True
    for path, digest in digests.items():
        key = location.key(path.name)
        try:
            client.upload_file(str(path), location.bucket, key, Config=config, Callback=progress)
            head = client.head_object(Bucket=location.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise s3_error(exc, location.uri(path.name)) from None
        if int(head["ContentLength"]) != digest.size:
            raise CheckpointError(f"{location.uri(path.name)}: uploaded {head['ContentLength']} bytes, expected {digest.size}")
        etag = head["ETag"].strip('"')
        if _MD5_ETAG.match(etag):
            if etag != digest.etag:
                raise CheckpointError(f"{location.uri(path.name)} does not match the local file after upload (ETag)")
        else:
            etag_checked = False
    manifest = Manifest(
        files={p.name: {"size": d.size, "tensors": d.tensors} for p, d in digests.items() if p in weights},
        others={p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in small},
    )
    try:
        client.put_object(Bucket=location.bucket, Key=location.key(MANIFEST_NAME), Body=manifest.to_json().encode())
    except Exception as exc:  # noqa: BLE001
        raise s3_error(exc, location.uri(MANIFEST_NAME)) from None
    progress.show()
    if not etag_checked:
        print("note: the store's ETags are not MD5-based (SSE-KMS?); sizes were verified, not contents", file=out)
    return UploadResult(len(digests) + 1, total, time.monotonic() - started, etag_checked)


def _refuse_leftovers(client, location: S3Location, names: set[str]) -> None:
    """Refuses a prefix holding weight files or an index this checkpoint does not have: a loader
    could follow a stale index to an older checkpoint's shards. (Never deletes: they may be
    someone's data.) Overwriting the same files, a re-upload, is fine."""
    present = [obj["Key"].rpartition("/")[2] for obj in list_prefix(client, location)]
    stale = sorted(n for n in present if (n.endswith(".safetensors") or n == HF_INDEX) and n not in names)
    if stale:
        raise CheckpointError(f"{location.uri()} already holds {', '.join(stale[:5])}, which this checkpoint does not have: "
                              "upload to an empty prefix, or delete them first")
