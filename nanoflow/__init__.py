"""nanoflow: a throughput-first LLM serving engine."""

from nanoflow.engine.request import CompletionOutput, RequestOutput
from nanoflow.entrypoints.llm import LLM
from nanoflow.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
