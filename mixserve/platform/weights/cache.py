"""A local disk cache of fetched tensors, keyed by the object's ETag and size.

Each entry is one tensor's bytes plus their SHA-256, under
<root>/<bucket>/<hash of key>/<etag>-<size>/. A new object version has a new ETag, so stale
bytes are never served; both files are written to a temporary name and renamed (atomic on
POSIX), so a crash leaves no half entry; and every reuse re-hashes the bytes, so a damaged disk
is caught and the tensor fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class TensorCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def _entry(self, bucket: str, key: str, etag: str, size: int, tensor: str) -> Path:
        safe_etag = re.sub(r"[^A-Za-z0-9_-]", "", etag) or "noetag"
        key_hash = hashlib.sha256(key.encode()).hexdigest()[:24]
        safe_tensor = re.sub(r"[^A-Za-z0-9_.-]", "_", tensor)
        return self.root / _safe_name(bucket) / key_hash / f"{safe_etag}-{size}" / safe_tensor

    def get(self, bucket: str, key: str, etag: str, size: int, tensor: str, nbytes: int,
            expected_digest: str | None = None) -> bytearray | None:
        """The cached bytes if present, of the right length and matching their recorded hash
        (and `expected_digest`, the manifest's, when given)."""
        path = self._entry(bucket, key, etag, size, tensor)
        digest_path = path.with_name(path.name + ".sha256")
        try:
            if path.stat().st_size != nbytes:
                return None
            expected = digest_path.read_text().strip()
            if expected_digest is not None and expected != expected_digest:
                return None
            data = bytearray(nbytes)
            with open(path, "rb") as f:
                if f.readinto(data) != nbytes:
                    return None
        except OSError:
            return None
        if sha256_hex(data) != expected:
            log.warning("cached tensor %s of %s failed its hash check; fetching it again", tensor, key)
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, bucket: str, key: str, etag: str, size: int, tensor: str, data: bytes | bytearray, digest: str) -> None:
        """Stores one tensor; a full or read-only disk only costs the cache, never the load."""
        path = self._entry(bucket, key, etag, size, tensor)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
            write_atomic(path.with_name(path.name + ".sha256"), digest.encode())
        except OSError as exc:
            log.warning("could not cache tensor %s: %s", tensor, exc)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_atomic(path: Path, data: bytes | bytearray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
