"""nanoflow: a throughput-first LLM serving engine.

The public names load on first use (a PEP 562 module `__getattr__`): importing the package, which
every `nanoflow` command does before argparse runs, costs no torch or transformers import, so
`nanoflow --help` and argument errors answer at once; `from nanoflow import LLM` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanoflow.engine.request import CompletionOutput, RequestOutput
    from nanoflow.entrypoints.llm import LLM
    from nanoflow.sampling_params import SamplingParams

# Each public name and the module that defines it.
_EXPORTS = {"LLM": "nanoflow.entrypoints.llm", "SamplingParams": "nanoflow.sampling_params",
            "RequestOutput": "nanoflow.engine.request", "CompletionOutput": "nanoflow.engine.request"}

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nanoflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
