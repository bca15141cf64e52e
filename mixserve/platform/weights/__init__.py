"""Where model weights come from: a local folder, or S3 by ranged GETs (see s3_source)."""

from __future__ import annotations

from pathlib import Path

from mixserve.model.weights_source import LocalFolder, WeightsSource
from mixserve.platform.weights.s3_source import S3Checkpoint

__all__ = ["S3Checkpoint", "open_weights"]


def open_weights(source: str, cache_dir: str | None = "~/.cache/mixserve/weights", download_workers: int = 16) -> WeightsSource:
    """A WeightsSource for a config's `model.source`: s3://bucket/prefix or a local folder."""
    if source.startswith("s3://"):
        return S3Checkpoint(source, cache_dir=cache_dir, max_workers=download_workers)
    return LocalFolder(Path(source).resolve())
