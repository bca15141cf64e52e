"""mixserve: serve Mistral 7B and Mixtral 8x7B on Ray with attention and experts split apart.

The public single-process API is `LLM` and `SamplingParams`; they are imported lazily so
that `import mixserve.model` (pure PyTorch) does not pull in the engine.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mixserve.llm import LLM
    from mixserve.replicas.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from mixserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from mixserve.replicas.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'mixserve' has no attribute {name!r}")
