"""Where a checkpoint's files and tensors come from.

The loader (mixserve.model.checkpoint) asks a `WeightsSource` for the names and shapes of all
tensors, then for exactly the tensors the module being filled holds, so an attention replica
never reads an expert's bytes and an expert shard reads only its own experts. `LocalFolder`
reads a folder with safetensors; mixserve.platform adds an object-store source (S3) behind the
same methods, so nothing below this line knows about networks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

from mixserve.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HF_INDEX = "model.safetensors.index.json"


@runtime_checkable
class WeightsSource(Protocol):
    def folder(self) -> Path:
        """A local folder holding the checkpoint's small files: config.json or params.json, and
        tokenizer.model when the checkpoint has one. The weights need not be in it."""
        ...

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint, name -> shape, read from the safetensors headers."""
        ...

    def read_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) for each listed name, in any order; raises CheckpointError if
        one cannot be read intact."""
        ...

    def describe(self) -> str:
        """Where the checkpoint is, for messages (never with credentials)."""
        ...

    def report(self) -> dict:
        """What reading the weights cost this process (bytes fetched, from where); {} if nothing to tell."""
        ...


def as_weights_source(checkpoint: str | Path | WeightsSource) -> WeightsSource:
    """A WeightsSource as it is, or a LocalFolder for a path."""
    if isinstance(checkpoint, (str, Path)):
        return LocalFolder(checkpoint)
    return checkpoint


def checkpoint_folder(checkpoint: str | Path | WeightsSource) -> Path:
    """The local folder with config.json and tokenizer.model of any checkpoint."""
    return as_weights_source(checkpoint).folder()


class LocalFolder:
    """A checkpoint folder on local disk: one safetensors file, or shards listed by
    model.safetensors.index.json, or Mistral's consolidated.safetensors. Refuses pickle-only
    folders: unpickling runs arbitrary code."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict[str, Path] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def folder(self) -> Path:
        return self.path

    def describe(self) -> str:
        return str(self.path)

    def report(self) -> dict:
        return {}  # read in place: nothing was fetched

    def files(self) -> list[Path]:
        folder = self.path
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        index = folder / HF_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
            files = sorted({folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
            return files
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files
        raise no_safetensors_error(str(folder), [p.name for p in folder.iterdir()])

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            files, shapes = {}, {}
            for path in self.files():
                with _open(path) as f:
                    for name in f.keys():
                        files[name] = path
                        shapes[name] = tuple(f.get_slice(name).get_shape())
            self._files, self._shapes = files, shapes
        return self._shapes

    def read_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        self.tensor_shapes()
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._files:
                raise CheckpointError(f"{self.path} has no tensor {name}")
            by_file.setdefault(self._files[name], []).append(name)
        for path, file_names in by_file.items():
            with _open(path) as f:
                for name in file_names:
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                        raise CheckpointError(f"{path.name}: tensor {name} is unreadable ({exc})") from None
                    yield name, tensor


def no_safetensors_error(where: str, file_names: list[str]) -> CheckpointError:
    """The error for a checkpoint without safetensors: pickles are named and refused (unpickling
    runs arbitrary code), anything else is just 'no weights'."""
    pickles = sorted(n for n in file_names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        return CheckpointError(
            f"{where} holds only pickle weights ({', '.join(pickles)}); mixserve never unpickles "
            "weights because that can run arbitrary code. Convert the checkpoint to safetensors."
        )
    return CheckpointError(f"{where} holds no .safetensors weights")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
