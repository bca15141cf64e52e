"""The checkpoint manifest `mixserve upload` writes next to the weights: each file's size and
each tensor's SHA-256. A loader that finds it checks every tensor it fetches, so bytes damaged
anywhere between the upload and the GPU are refused rather than served."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mixserve.errors import CheckpointError

MANIFEST_NAME = "mixserve-manifest.json"
FORMAT = "mixserve-manifest/1"


@dataclass
class Manifest:
    files: dict[str, dict] = field(default_factory=dict)  # file name -> {"size": int, "tensors": {name: sha256}}
    others: dict[str, str] = field(default_factory=dict)  # small files (config.json...) -> sha256

    def tensor_digest(self, file_name: str, tensor: str) -> str | None:
        return self.files.get(file_name, {}).get("tensors", {}).get(tensor)

    def file_size(self, file_name: str) -> int | None:
        return self.files.get(file_name, {}).get("size")

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "files": self.files, "others": self.others}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls(files=dict(data["files"]), others=dict(data.get("others", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{where} is not a valid mixserve manifest: {exc}") from None
