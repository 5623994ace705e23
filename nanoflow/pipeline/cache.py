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
                for other, theirs in near_misses(key):
                    log.warning("pipeline: %s was tuned for this GPU, model and TP size but %s (this engine: %s); "
                                "tune with this engine's settings, or run with that file's",
                                other, _fields(theirs), _fields({f: key.get(f) for f in theirs}))
            return None
        pipeline = Pipeline.load(path)
        if not quiet:
            log.info("pipeline: %s (%d schedules)", path, len(pipeline.schedules))
        return pipeline
    if not Path(spec).is_file():
        raise ValueError(f"pipeline must be 'auto', 'off' or a pipeline JSON file; {spec!r} is none of them")
    return Pipeline.load(spec)


# fields of a key that a user sets per run (the tune's --dtype, --kv-cache-dtype, the token budget):
# a cached file that differs from the engine's key only in these was most likely meant for it
RUN_FIELDS = ("dtype", "kv_cache_dtype", "max_num_batched_tokens")


def near_misses(key: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Cached pipelines whose key differs from `key` only in RUN_FIELDS, each with its values of the
    fields that differ: e.g. `nanoflow tune` run in float16 (the checkpoint's dtype) and the engine
    in bfloat16 (`nanoflow bench`'s)."""
    found = []
    for path in sorted(cache_dir().glob("*.json")) if cache_dir().is_dir() else []:
        try:
            other = json.loads(path.read_text()).get("key", {})
        except (OSError, ValueError, AttributeError):  # a file being written, or not a pipeline
            continue
        differ = sorted(f for f in set(key) | set(other) if key.get(f) != other.get(f))
        if differ and set(differ) <= set(RUN_FIELDS):
            found.append((path, {f: other.get(f) for f in differ}))
    return found


def _fields(values: dict[str, Any]) -> str:
    return ", ".join(f"{f} {v}" for f, v in values.items())
