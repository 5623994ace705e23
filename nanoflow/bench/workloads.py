"""Benchmark workloads: fixed INPUTxOUTPUT shapes or request lengths read from a trace CSV.

Prompts are random token ids (seeded), so any model works without a tokenizer; every request
generates exactly its output length (the engine is told to ignore EOS).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoflow.bench.cli_args import FIXED_SPEC

DEFAULT_NUM_REQUESTS = 1000


@dataclass
class Workload:
    name: str  # "512x512" or "trace-<file stem>": safe for file names
    kind: str  # "fixed" | "trace"
    source: str | None  # the trace file, if any
    requests: list[tuple[list[int], int]]  # (prompt token ids, output length)
    num_rows: int  # requests asked for (fixed) or trace rows read
    num_skipped_too_long: int = 0  # input + output > max_model_len
    num_skipped_invalid: int = 0  # empty prompt or zero output (the engine cannot run those)
    max_model_len: int | None = None
    vocab_size: int = 2  # prompts are drawn from [0, vocab_size)
    seed: int = 0

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p, _ in self.requests]

    @property
    def output_lens(self) -> list[int]:
        return [o for _, o in self.requests]

    def warmup_requests(self, n: int, max_tokens: int) -> list[tuple[list[int], int]]:
        """n requests shaped like the first n of this workload (output capped at max_tokens), with
        fresh random prompts: none of them shares a prefix with a timed request."""
        rng = np.random.default_rng([self.seed, 1])  # a stream apart from the timed prompts'
        return [(rng.integers(0, self.vocab_size, size=len(p)).tolist(), min(o, max_tokens))
                for p, o in self.requests[:n]]

    def summary(self) -> dict[str, Any]:
        ins, outs = self.input_lens, self.output_lens
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "num_rows": self.num_rows,
            "num_requests": len(self.requests),
            "num_skipped_too_long": self.num_skipped_too_long,
            "num_skipped_invalid": self.num_skipped_invalid,
            "max_model_len": self.max_model_len,
            "input_tokens": _stats(ins),
            "output_tokens": _stats(outs),
            "total_input_tokens": sum(ins),
            "total_output_tokens": sum(outs),
        }


def _stats(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "min": 0, "p50": 0, "p90": 0, "max": 0}
    a = np.asarray(xs)
    return {"mean": round(float(a.mean()), 2), "min": int(a.min()), "p50": int(np.percentile(a, 50)),
            "p90": int(np.percentile(a, 90)), "max": int(a.max())}


def parse_workload_spec(spec: str) -> tuple[str, Any]:
    """'512x512' -> ("fixed", (512, 512)); 'trace:FILE' -> ("trace", FILE). Raises ValueError."""
    spec = spec.strip()
    if spec.startswith("trace:"):
        path = spec.removeprefix("trace:")
        if not path:
            raise ValueError("--workload trace: needs a file, e.g. "
                             "trace:benchmarks/data/splitwise_azure_conv_2023.csv")
        return "trace", path
    m = FIXED_SPEC.match(spec)
    if m is None:
        raise ValueError(f"--workload must be INPUTxOUTPUT (e.g. 512x512) or trace:FILE, got {spec!r}")
    inp, out = int(m.group(1)), int(m.group(2))
    if inp < 1 or out < 1:
        raise ValueError(f"--workload {spec!r}: input and output lengths must be at least 1")
    return "fixed", (inp, out)


def read_trace(path: str, limit: int | None = None) -> list[tuple[int, int]]:
    """(ContextTokens, GeneratedTokens) of the first `limit` rows (all rows when None)."""
    if not os.path.isfile(path):
        raise ValueError(f"trace file {path!r} does not exist")
    rows: list[tuple[int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if not {"ContextTokens", "GeneratedTokens"} <= cols:
            raise ValueError(f"{path}: expected ContextTokens and GeneratedTokens columns, "
                             f"got {sorted(cols)}")
        for i, row in enumerate(reader):
            if limit is not None and len(rows) >= limit:
                break
            try:
                rows.append((int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: row {i + 2} has a non-integer length: {row}") from e
    return rows


def build_workload(
    spec: str, num_requests: int | None, vocab_size: int, max_model_len: int | None, seed: int = 0
) -> Workload:
    """The requests of `spec`, with seeded random prompts over [0, vocab_size); requests that do not
    fit max_model_len (input + output) are skipped and counted, as vLLM's benchmark does."""
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"--num-requests must be at least 1, got {num_requests}")
    kind, arg = parse_workload_spec(spec)
    if kind == "fixed":
        n = num_requests or DEFAULT_NUM_REQUESTS
        lengths = [arg] * n
        name, source = f"{arg[0]}x{arg[1]}", None
    else:
        lengths = read_trace(arg, num_requests or DEFAULT_NUM_REQUESTS)
        if not lengths:
            raise ValueError(f"trace file {arg!r} has no rows")
        stem = os.path.splitext(os.path.basename(arg))[0]
        name, source = f"trace-{stem}", arg
    rng = np.random.default_rng(seed)
    wl = Workload(name=name, kind=kind, source=source, requests=[], num_rows=len(lengths),
                  max_model_len=max_model_len, vocab_size=vocab_size, seed=seed)
    for inp, out in lengths:
        if inp < 1 or out < 1:
            wl.num_skipped_invalid += 1
        elif max_model_len is not None and inp + out > max_model_len:
            wl.num_skipped_too_long += 1
        else:
            wl.requests.append((rng.integers(0, vocab_size, size=inp).tolist(), out))
    if not wl.requests:
        raise ValueError(f"workload {spec!r} has no request that fits max_model_len={max_model_len} "
                         f"({wl.num_skipped_too_long} too long, {wl.num_skipped_invalid} empty)")
    return wl
