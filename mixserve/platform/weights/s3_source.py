"""A checkpoint in S3 (or an S3-compatible store) as a WeightsSource: each actor fetches only
the byte ranges of its own tensors.

How a load goes:
  1. List the prefix once; fetch the small files (config.json, tokenizer.model, the shard
     index, mixserve's manifest) into a local folder, keyed by ETag.
  2. Read each safetensors header with a ranged GET (64 KiB first, the rest if the header is
     longer) and check it against the object's size: a truncated object is refused here.
  3. For the tensors the loader asks for: take them from the disk cache if there (re-hashed),
     else fetch them with parallel ranged GETs (adjacent tensors merged into one GET, large
     ones split into parts), every GET pinned to the listed ETag (`IfMatch`) so an object
     replaced mid-load fails instead of mixing versions. Each tensor is checked against the
     manifest when the checkpoint has one, then cached and handed to the loader.
Any failure raises CheckpointError: the actor's constructor fails and a half-loaded model
never serves.

An S3Checkpoint pickles to its settings only (bucket, prefix, cache, parallelism, endpoint), so
the app builder hands the same object to every actor and each builds its own client and state.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixserve.errors import CheckpointError
from mixserve.model.weights_source import HF_INDEX, no_safetensors_error
from mixserve.platform.weights.cache import TensorCache, sha256_hex, write_atomic
from mixserve.platform.weights.header import LENGTH_BYTES, TensorEntry, header_length, parse_header, tensor_from_bytes
from mixserve.platform.weights.manifest import MANIFEST_NAME, Manifest
from mixserve.platform.weights.s3_client import S3Location, endpoint_from_env, list_prefix, s3_client, s3_error

log = logging.getLogger(__name__)

SMALL_FILES = ("config.json", "params.json", "tokenizer.model", "generation_config.json", HF_INDEX, MANIFEST_NAME)
HEADER_PROBE_BYTES = 64 << 10  # one GET covers the header of most checkpoints
PROGRESS_EVERY_S = 10.0
# botocore retries failed requests; a body that breaks off mid-stream is ours to retry.
BODY_ATTEMPTS = 4


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


@dataclass
class _Tensor:
    file: str
    entry: TensorEntry
    buffer: bytearray | None = None
    received: int = 0


@dataclass
class _Job:
    file: str
    start: int
    end: int
    pieces: list[tuple[str, int, int]] = field(default_factory=list)  # (tensor, offset in tensor, offset in job)


@dataclass
class LoadReport:
    header_bytes: int = 0  # safetensors headers read
    tensor_bytes: int = 0  # tensor bytes fetched from the store
    cached_bytes: int = 0  # tensor bytes reused from the disk cache
    small_file_bytes: int = 0  # config.json, tokenizer.model, ...
    requests: int = 0  # GETs issued (botocore's retries not counted)
    tensors: int = 0
    seconds: float = 0.0


class S3Checkpoint:
    def __init__(
        self,
        uri: str,
        cache_dir: str | None = "~/.cache/mixserve/weights",
        max_workers: int = 16,
        part_bytes: int = 16 << 20,
        endpoint_url: str | None = None,
    ):
        self.uri = uri.rstrip("/")
        self.location = S3Location.parse(uri)
        self.cache_dir = cache_dir
        self.max_workers = max_workers
        self.part_bytes = part_bytes
        # Captured where the deployment is built, so actors on every node use the same store.
        self.endpoint_url = endpoint_url if endpoint_url is not None else endpoint_from_env()
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()  # fetch threads count their GETs
        self._objects: dict[str, S3Object] | None = None
        self._folder: Path | None = None
        self._entries: dict[str, _Tensor] | None = None
        self._manifest: Manifest | None = None
        self._report = LoadReport()

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("uri", "location", "cache_dir", "max_workers", "part_bytes", "endpoint_url")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def describe(self) -> str:
        return self.uri

    def report(self) -> dict:
        """Bytes this process fetched, from where, and how long it took."""
        return dict(self._report.__dict__)

    # ---- the small files ----------------------------------------------------------------------
    def _client(self):
        return s3_client(self.endpoint_url, max_pool_connections=max(10, self.max_workers))

    def objects(self) -> dict[str, S3Object]:
        """The objects directly under the prefix, by file name (listed once per process)."""
        with self._lock:
            if self._objects is None:
                self._objects = self._list()
            return self._objects

    def _list(self) -> dict[str, S3Object]:
        found = {obj["Key"].rpartition("/")[2]: S3Object(obj["Key"], int(obj["Size"]), obj["ETag"].strip('"'))
                 for obj in list_prefix(self._client(), self.location)}
        if not found:
            raise CheckpointError(f"no checkpoint at {self.uri} (nothing under that prefix)")
        return found

    def folder(self) -> Path:
        """Downloads config.json, tokenizer.model and the other small files once (re-downloaded
        only when their ETag changes) and returns the local folder holding them."""
        if self._folder is not None:
            return self._folder
        objects = self.objects()
        root = Path(self.cache_dir or "~/.cache/mixserve/weights").expanduser()
        folder = root / "files" / self.location.bucket / (self.location.prefix.replace("/", "__") or "_root")
        folder.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            obj = objects.get(name)
            if obj is None:
                (folder / name).unlink(missing_ok=True)  # a file removed upstream must not linger here
                continue
            stamp = folder / f".{name}.etag"
            want = f"{obj.etag}-{obj.size}"
            if (folder / name).is_file() and stamp.is_file() and stamp.read_text() == want:
                continue
            data = self._get(obj, None)
            self._report.small_file_bytes += len(data)
            # Actors on one node share this folder: each writes its own temporary file, and the
            # file and its stamp each appear whole (a rename), never half-written.
            write_atomic(folder / name, data)
            write_atomic(stamp, want.encode())
        if MANIFEST_NAME in objects:
            self._manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), self.location.uri(MANIFEST_NAME))
        self._folder = folder
        return folder

    # ---- headers --------------------------------------------------------------------------------
    def _weight_files(self) -> list[str]:
        import json

        objects = self.objects()
        folder = self.folder()
        if self._manifest is not None and self._manifest.files:  # what the upload wrote: never a leftover beside it
            names = sorted(self._manifest.files)
            missing = [n for n in names if n not in objects]
            if missing:
                raise CheckpointError(f"{self.location.uri(MANIFEST_NAME)} lists weight files that are missing: {', '.join(missing)}")
            return names
        if HF_INDEX in objects:
            try:
                names = sorted(set(json.loads((folder / HF_INDEX).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.location.uri(HF_INDEX)} is not a valid safetensors index: {exc}") from None
            missing = [n for n in names if n not in objects]
            if missing:
                raise CheckpointError(f"{self.location.uri(HF_INDEX)} names shard files that are missing: {', '.join(missing)}")
            return names
        names = sorted(n for n in objects if n.endswith(".safetensors"))
        if names:
            return names
        raise no_safetensors_error(self.uri, list(objects))

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._entries is None:
            files = self._weight_files()
            with futures.ThreadPoolExecutor(max_workers=min(self.max_workers, len(files))) as pool:
                headers = list(pool.map(self._read_header, files))
            entries: dict[str, _Tensor] = {}
            for file_name, table in zip(files, headers):
                expected_size = self._manifest.file_size(file_name) if self._manifest else None
                size = self.objects()[file_name].size
                if expected_size is not None and expected_size != size:
                    raise CheckpointError(
                        f"{self.location.uri(file_name)} is {size} bytes but the manifest says {expected_size} "
                        "(truncated or replaced object)"
                    )
                for name, entry in table.items():
                    entries[name] = _Tensor(file_name, entry)
            self._entries = entries
        return {name: t.entry.shape for name, t in self._entries.items()}

    def _read_header(self, file_name: str) -> dict[str, TensorEntry]:
        obj = self.objects()[file_name]
        where = self.location.uri(file_name)
        first = self._get(obj, (0, min(obj.size, HEADER_PROBE_BYTES)))
        n = header_length(first, where)
        if LENGTH_BYTES + n > obj.size:
            raise CheckpointError(f"{where} is truncated: its header alone needs {LENGTH_BYTES + n} bytes, it has {obj.size}")
        if LENGTH_BYTES + n > len(first):
            first += self._get(obj, (len(first), LENGTH_BYTES + n))
        self._report.header_bytes += LENGTH_BYTES + n
        return parse_header(bytes(first[LENGTH_BYTES:LENGTH_BYTES + n]), obj.size, where)

    # ---- tensors ------------------------------------------------------------------------------
    def read_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        self.tensor_shapes()
        started = time.monotonic()
        unknown = [n for n in names if n not in self._entries]
        if unknown:
            raise CheckpointError(f"{self.uri} has no tensors {', '.join(unknown[:5])}")
        cache = TensorCache(self.cache_dir) if self.cache_dir else None
        to_fetch: list[_Tensor] = []
        for name in names:
            tensor = self._entries[name]
            data = self._from_cache(cache, tensor) if cache else None
            if data is None:
                to_fetch.append(tensor)
                continue
            self._report.cached_bytes += len(data)
            self._report.tensors += 1
            yield name, tensor_from_bytes(tensor.entry, data)
        total = sum(t.entry.nbytes for t in to_fetch)
        if total:
            log.info("fetching %.1f MiB of weights from %s (%d tensors)", total / 2**20, self.uri, len(to_fetch))
        for tensor, data in self._fetch(to_fetch, total):
            digest = self._verify(tensor, data)
            if cache:
                obj = self.objects()[tensor.file]
                cache.put(self.location.bucket, obj.key, obj.etag, obj.size, tensor.entry.name, data, digest)
            self._report.tensors += 1
            yield tensor.entry.name, tensor_from_bytes(tensor.entry, data)
            data = None  # (held here, it would live on through the next tensor's fetch)
        self._report.seconds += time.monotonic() - started

    def _from_cache(self, cache: TensorCache, tensor: _Tensor) -> bytearray | None:
        obj = self.objects()[tensor.file]
        expected = self._manifest.tensor_digest(tensor.file, tensor.entry.name) if self._manifest else None
        return cache.get(self.location.bucket, obj.key, obj.etag, obj.size, tensor.entry.name, tensor.entry.nbytes, expected)

    def _verify(self, tensor: _Tensor, data: bytearray) -> str:
        digest = sha256_hex(data)
        expected = self._manifest.tensor_digest(tensor.file, tensor.entry.name) if self._manifest else None
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"tensor {tensor.entry.name} in {self.location.uri(tensor.file)} does not match the checkpoint's "
                "manifest (corrupt object); refusing to load it"
            )
        return digest

    def _plan(self, tensors: list[_Tensor]) -> list[_Job]:
        """GETs for `tensors`: neighbours in one object merged up to part_bytes; larger tensors split."""
        jobs: list[_Job] = []
        for tensor in sorted(tensors, key=lambda t: (t.file, t.entry.start)):
            entry = tensor.entry
            last = jobs[-1] if jobs else None
            if last and last.file == tensor.file and last.end == entry.start and last.end - last.start + entry.nbytes <= self.part_bytes:
                last.pieces.append((entry.name, 0, last.end - last.start))
                last.end = entry.end
                continue
            for offset in range(0, max(entry.nbytes, 1), self.part_bytes):
                end = min(entry.start + offset + self.part_bytes, entry.end)
                jobs.append(_Job(tensor.file, entry.start + offset, end, [(entry.name, offset, 0)]))
        return jobs

    def _fetch(self, tensors: list[_Tensor], total: int) -> Iterator[tuple[_Tensor, bytearray]]:
        """Runs the GETs on a bounded pool and yields each tensor once all its bytes are in.
        At most ~2 GETs per worker are in flight, so memory stays near the tensors being built."""
        if not tensors:
            return
        by_name = {t.entry.name: t for t in tensors}
        for t in tensors:  # (each buffer is made when its tensor's first bytes come: bytearray(n) commits n bytes)
            t.buffer, t.received = None, 0
        jobs = iter(self._plan(tensors))
        done_bytes, last_log, started = 0, time.monotonic(), time.monotonic()
        with futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="s3-fetch") as pool:
            pending: dict[futures.Future, _Job] = {}

            def submit_more() -> None:
                while len(pending) < 2 * self.max_workers:
                    job = next(jobs, None)
                    if job is None:
                        return
                    pending[pool.submit(self._get, self.objects()[job.file], (job.start, job.end))] = job

            submit_more()
            try:
                while pending:
                    finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                    for future in finished:
                        job = pending.pop(future)
                        data = future.result()
                        done_bytes += len(data)
                        for name, tensor_offset, job_offset in job.pieces:
                            t = by_name[name]
                            if t.buffer is None:
                                t.buffer = bytearray(t.entry.nbytes)
                            n = min(t.entry.nbytes - tensor_offset, len(data) - job_offset)
                            t.buffer[tensor_offset:tensor_offset + n] = data[job_offset:job_offset + n]
                            t.received += n
                            if t.received == t.entry.nbytes:
                                buffer, t.buffer = t.buffer, None
                                yield t, buffer
                                buffer = None  # the caller's now: this frame must not keep it alive
                    submit_more()
                    now = time.monotonic()
                    if now - last_log >= PROGRESS_EVERY_S:
                        rate = done_bytes / (now - started) / 2**20
                        log.info("weights from %s: %.0f / %.0f MiB (%.0f MiB/s)", self.uri, done_bytes / 2**20, total / 2**20, rate)
                        last_log = now
            finally:
                for future in pending:
                    future.cancel()
        self._report.tensor_bytes += done_bytes

    def _get(self, obj: S3Object, byte_range: tuple[int, int] | None) -> bytearray:
        """One GET (of [start, end) when given), pinned to the listed ETag; the body is read
        again if it breaks off, and its length is checked."""
        from botocore.exceptions import ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        uri = f"s3://{self.location.bucket}/{obj.key}"
        kwargs = {"Bucket": self.location.bucket, "Key": obj.key, "IfMatch": f'"{obj.etag}"'}
        expected = obj.size
        if byte_range is not None:
            start, end = byte_range
            if end <= start:
                return bytearray()
            kwargs["Range"] = f"bytes={start}-{end - 1}"
            expected = end - start
        for attempt in range(BODY_ATTEMPTS):
            with self._count_lock:
                self._report.requests += 1
            try:
                response = self._client().get_object(**kwargs)
                data = bytearray(response["Body"].read())
            except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError):
                data = None
            except Exception as exc:  # noqa: BLE001 - every boto failure becomes a CheckpointError
                raise s3_error(exc, uri) from None
            if data is not None and len(data) == expected:
                return data
            if attempt + 1 < BODY_ATTEMPTS:
                time.sleep(0.2 * 2**attempt)
        raise CheckpointError(f"{uri}: the store kept returning short reads (expected {expected} bytes); is it truncated?")
