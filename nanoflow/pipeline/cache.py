"""Where tuned pipelines live, and which one an engine takes (`--pipeline auto|off|PATH`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from nanoflow.pipeline.schedule import Pipeline

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("NANOFLOW_CACHE", Path.home() / ".cache" / "nanoflow")) / "pipelines"


def cache_path(key: dict[str, Any]) -> Path:
    """One file per key: readable name, hashed remainder (the model shape has many fields)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{key.get('gpu', 'cpu')}_{key.get('architecture', 'model')}_tp{key.get('tp', 1)}_{digest}"
    return cache_dir() / ("".join(c if c.isalnum() or c in "._-" else "-" for c in name) + ".json")


def describe_key(key: dict[str, Any]) -> str:
    """The fields of a key that differ between runs of one model, e.g. "bfloat16, KV float8_e4m3fn,
    TP 2, budget 2048": a tune and an engine that disagree on one of them miss each other's file."""
    return (f"{key.get('dtype')}, KV {key.get('kv_cache_dtype')}, TP {key.get('tp', 1)}, "
            f"budget {key.get('max_num_batched_tokens')}")


def choose_pipeline(spec: str, key: dict[str, Any], quiet: bool = False) -> Pipeline | None:
    """spec: "off" (sequential), "auto" (the tuned pipeline for this key if cached, else sequential)
    or a path to a pipeline JSON. Returns None for sequential. quiet: no log lines (a second look)."""
    if spec == "off":
        return None
    if spec == "auto":
        path = cache_path(key)
        if not path.is_file():
            if not quiet:
                log.info("pipeline: none tuned for this GPU, model, dtype, TP size and token budget (%s); running "
                         "the sequential schedule (`nanoflow tune` finds one and caches it at %s)",
                         describe_key(key), path)
            return None
        pipeline = Pipeline.load(path)
        if not quiet:
            log.info("pipeline: %s (%d schedules)", path, len(pipeline.schedules))
        return pipeline
    if not Path(spec).is_file():
        raise ValueError(f"pipeline must be 'auto', 'off' or a pipeline JSON file; {spec!r} is none of them")
    return Pipeline.load(spec)
