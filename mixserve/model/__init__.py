"""The Mistral / Mixtral model in pure PyTorch: no Ray, HTTP or boto3 below this line."""

from mixserve.model.args import ModelArgs
from mixserve.model.cache import RollingKVCache, SequenceChunk, StepMetadata, build_step_metadata
from mixserve.model.factory import create_model, load_model
from mixserve.model.transformer import MicroBatch, Transformer
from mixserve.model.weights_source import LocalFolder, WeightsSource, as_weights_source, checkpoint_folder

__all__ = [
    "LocalFolder",
    "ModelArgs",
    "RollingKVCache",
    "SequenceChunk",
    "StepMetadata",
    "MicroBatch",
    "Transformer",
    "WeightsSource",
    "as_weights_source",
    "checkpoint_folder",
    "build_step_metadata",
    "create_model",
    "load_model",
]
