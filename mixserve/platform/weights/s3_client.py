"""boto3 for S3 checkpoints: one client per process, the default credential chain, and errors
turned into messages a user can act on.

Credentials are never configured here: boto3's default chain finds them (an IAM role or
instance profile in production, environment variables in tests). The standard endpoint
override (AWS_ENDPOINT_URL, or AWS_ENDPOINT_URL_S3) points at S3-compatible stores. Throttling
(503 SlowDown) and 5xx are retried by botocore's "standard" retry mode, with exponential
backoff and jitter: a well-kept implementation, so there is no retry loop of ours for them.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from mixserve.errors import CheckpointError

# Botocore's own retry (standard mode: 503 SlowDown, 5xx, throttling codes, connection errors),
# with backoff up to 20 s between attempts.
MAX_ATTEMPTS = 8
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without a trailing slash; "" for the bucket's root

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise CheckpointError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise CheckpointError(f"{uri!r} names no bucket (expected s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, name: str = "") -> str:
        path = self.key(name) if name else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"


def endpoint_from_env() -> str | None:
    """The endpoint override boto3 would use, captured where a deployment is built so that
    actors on other nodes reach the same store."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None, max_pool_connections: int = 32):
    """A shared, thread-safe boto3 S3 client for this process."""
    key = (endpoint_url, max_pool_connections)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                max_pool_connections=max_pool_connections,
                connect_timeout=10,
                read_timeout=60,
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
            _clients[key] = client
        return client


def list_prefix(client, location: S3Location) -> list[dict]:
    """The objects directly under the location's prefix (boto3's entries: Key, Size, ETag...),
    every page; a failure is a CheckpointError naming the location."""
    prefix = f"{location.prefix}/" if location.prefix else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/")
        return [obj for page in pages for obj in page.get("Contents", [])]
    except Exception as exc:  # noqa: BLE001 - every boto failure becomes a CheckpointError
        raise s3_error(exc, location.uri()) from None


def s3_error(exc: Exception, uri: str) -> CheckpointError:
    """A CheckpointError for a boto3/botocore failure on `uri`, without request ids or credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return CheckpointError(
            f"no AWS credentials found to read {uri}: attach an IAM role / instance profile, "
            "or set the standard AWS environment variables"
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return CheckpointError(f"bucket of {uri} does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return CheckpointError(f"{uri} does not exist")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return CheckpointError(f"access denied to {uri}: check the role's s3:GetObject / s3:ListBucket permissions")
        if code in ("PreconditionFailed", "412"):
            return CheckpointError(f"{uri} changed while it was being read (its ETag moved); start again")
        if code == "InvalidRange":
            return CheckpointError(f"{uri} is shorter than its header says (truncated)")
        return CheckpointError(f"S3 error reading {uri}: {code or status}")
    if isinstance(exc, BotoCoreError):
        return CheckpointError(f"cannot reach S3 for {uri}: {type(exc).__name__}")
    return CheckpointError(f"reading {uri} failed: {type(exc).__name__}: {exc}")
