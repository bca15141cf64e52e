"""The Mistral / Mixtral model in pure PyTorch: no Ray, HTTP or boto3 below this line."""

from mixserve.model.args import ModelArgs
from mixserve.model.cache import RollingKVCache, SequenceChunk, StepMetadata, build_step_metadata
from mixserve.model.factory import create_model, load_model
from mixserve.model.transformer import MicroBatch, Transformer

__all__ = [
    "ModelArgs",
    "RollingKVCache",
    "SequenceChunk",
    "StepMetadata",
    "MicroBatch",
    "Transformer",
    "build_step_metadata",
    "create_model",
    "load_model",
]
