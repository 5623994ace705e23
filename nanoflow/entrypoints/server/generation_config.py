"""`nanoflow serve --generation-config auto|vllm|PATH`, with vLLM's meaning: "auto" takes the sampling
defaults of the checkpoint's generation_config.json (temperature, top_p, top_k, min_p,
repetition_penalty, max_new_tokens as the default max_tokens) for requests that do not set them;
"vllm" ignores the file (the engine's own defaults); PATH names a folder holding the file, or the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoflow.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field; the keys vLLM reads.
_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
         "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_sampling_defaults(mode: str, model: str) -> dict[str, Any]:
    """The request defaults that `mode` gives for the checkpoint folder `model`; ValueError if bad."""
    if mode == "vllm":
        return {}
    where = Path(model if mode == "auto" else mode)
    path = where / "generation_config.json" if where.is_dir() else where
    if not path.is_file():
        if mode == "auto":
            return {}  # a checkpoint without one: nothing to apply, as in vLLM
        raise ValueError(f"--generation-config {mode}: no generation_config.json there (give auto, vllm, "
                         "a folder holding generation_config.json, or the file)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--generation-config: {path} is not readable JSON: {e}") from e
    defaults = {ours: data[theirs] for theirs, ours in _KEYS.items() if data.get(theirs) is not None}
    try:
        SamplingParams(**defaults)  # a bad default must fail at start-up, not on every request
    except ValueError as e:
        raise ValueError(f"--generation-config: {path}: {e}") from e
    return defaults
