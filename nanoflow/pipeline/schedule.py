"""A pipeline: for ranges of iteration sizes, how each layer's ops run over nano-batches.

A `Schedule` holds named partitions of the iteration's token rows (each a list of bounds, e.g.
{"attn": [0, 768, 2048], "dense": [0, 2048]}) and, for every layer alike, the order in which the
(op, nano-batch) pairs are issued, each on a stream and with an SM cap. Different ops may use
different partitions (NanoFlow splits attention finer than the GEMMs). The executor derives the
waits between streams from the rows each op reads and writes, so a schedule only says what runs
where, in which order. The bounds are for an iteration of max_tokens; a smaller one (down to
min_tokens) cuts its last nano-batch of each partition short.

A `Pipeline` is what `nanoflow tune` writes (JSON) and the engine loads: schedules for token
ranges, the key it was tuned for, and the step times it predicted. Sizes no schedule covers run
sequentially. The sequential schedule is the one-partition, one-stream schedule of the layer's ops.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

WHOLE = "whole"  # the partition of the sequential schedule: one nano-batch, all rows


@dataclass(frozen=True)
class Step:
    op: str
    part: int = 0  # which nano-batch of the partition
    partition: str = WHOLE
    stream: int = 0  # 0: the stream the forward runs on
    num_ctas: int | None = None  # SM cap for the op's kernel (None: the whole GPU)
    # a capped GEMM: cuBLAS with its grid sized for num_ctas SMs (kernels.linear.cublas_sms), not
    # the persistent Triton GEMM on num_ctas CTAs
    cublas: bool = False


@dataclass(frozen=True)
class Schedule:
    min_tokens: int
    max_tokens: int
    partitions: dict[str, tuple[int, ...]]
    steps: tuple[Step, ...]  # one layer's issue order; every layer runs the same
    predicted_ms: float | None = None  # the search's estimate of a whole step at max_tokens
    # NanoFlow's execution units: per stream, the SMs of a CUDA green context it runs on, a partition
    # the GPU enforces (pipeline.executor); empty: plain streams, whose kernels share every SM
    units: tuple[int, ...] = ()

    @property
    def num_streams(self) -> int:
        return 1 + max(s.stream for s in self.steps)

    def on_one_stream(self) -> Schedule:
        """The same steps in the same issue order, all on the forward's stream: the same kernels
        with the same caps, one after another, so the same results without any concurrency (on the
        whole GPU: an execution unit confines a kernel's programs, not what they compute)."""
        return replace(self, steps=tuple(replace(s, stream=0) for s in self.steps), units=())

    def bounds(self, partition: str, num_tokens: int) -> list[int]:
        """The partition's bounds for an iteration of num_tokens (min_tokens <= num_tokens <= max_tokens)."""
        return [*self.partitions[partition][:-1], num_tokens]

    def check(self, op_names: Sequence[str]) -> None:
        """Raises ValueError unless every (op, nano-batch of its partition) is issued exactly once
        and the partitions fit [min_tokens, max_tokens]."""
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"schedule token range [{self.min_tokens}, {self.max_tokens}] is empty")
        for name, b in self.partitions.items():
            if b[0] != 0 or b[-1] != self.max_tokens or any(x >= y for x, y in itertools.pairwise(b)):
                raise ValueError(f"partition {name!r} must rise strictly from 0 to {self.max_tokens}: {list(b)}")
            if len(b) > 2 and b[-2] >= self.min_tokens:
                raise ValueError(f"partition {name!r}: its last nano-batch would be empty at {self.min_tokens} "
                                 f"tokens (bound {b[-2]})")
        if self.units and (len(self.units) != self.num_streams or min(self.units) < 1):
            raise ValueError(f"execution units {list(self.units)}: one positive SM count per stream "
                             f"({self.num_streams} streams)")
        unknown = {s.op for s in self.steps} - set(op_names)
        if unknown:
            raise ValueError(f"schedule names ops the model does not have: {sorted(unknown)} (has {list(op_names)})")
        for s in self.steps:
            if s.partition not in self.partitions or not 0 <= s.part < len(self.partitions[s.partition]) - 1:
                raise ValueError(f"step {s} names no nano-batch of the schedule's partitions")
            if s.cublas and (s.op not in GEMM_OPS or s.num_ctas is None):
                raise ValueError(f"step {s}: cublas applies to a capped GEMM ({sorted(GEMM_OPS)} with num_ctas)")
        partition_of: dict[str, set[str]] = {}
        for s in self.steps:
            partition_of.setdefault(s.op, set()).add(s.partition)
        for op in op_names:
            if len(partition_of.get(op, ())) != 1:
                got = sorted(partition_of.get(op, ()))
                raise ValueError(f"op {op!r} must run over exactly one partition, got {got}")
        issued = sorted((s.op, s.part) for s in self.steps)
        want = sorted((op, i) for op in op_names
                      for i in range(len(self.partitions[next(iter(partition_of[op]))]) - 1))
        if issued != want:
            raise ValueError(f"each op must be issued once per nano-batch: missing {sorted(set(want) - set(issued))}, "
                             f"repeated {sorted({x for x in issued if issued.count(x) > 1})}")


def sequential_schedule(op_names: Sequence[str], max_tokens: int, min_tokens: int = 1) -> Schedule:
    return Schedule(min_tokens, max_tokens, {WHOLE: (0, max_tokens)}, tuple(Step(op) for op in op_names))


@dataclass(frozen=True)
class Pipeline:
    schedules: tuple[Schedule, ...]
    key: dict[str, Any] = field(default_factory=dict)  # what it was tuned for (GPU, model shape, ...)
    source: str = ""  # where it came from (a path, "tuned", "built-in")
    # tensor parallel: the NCCL CTA cap the tune chose (NCCL_MAX_CTAS, set before the communicator is
    # made: engine-wide, not per schedule); None: NCCL's own
    nccl_max_ctas: int | None = None

    def for_tokens(self, num_tokens: int) -> Schedule | None:
        return next((s for s in self.schedules if s.min_tokens <= num_tokens <= s.max_tokens), None)

    def check(self, op_names: Sequence[str]) -> None:
        for s in self.schedules:
            s.check(op_names)
        ranges = sorted((s.min_tokens, s.max_tokens) for s in self.schedules)
        for (_, hi), (lo, _) in itertools.pairwise(ranges):
            if lo <= hi:
                raise ValueError(f"pipeline schedules overlap in token ranges: {ranges}")

    def to_json(self) -> dict[str, Any]:
        cap = {} if self.nccl_max_ctas is None else {"nccl_max_ctas": self.nccl_max_ctas}
        return {"version": 1, "key": self.key, **cap, "schedules": [
            {**{k: v for k, v in asdict(s).items() if k != "units" or v},
             "partitions": {k: list(v) for k, v in s.partitions.items()},
             "steps": [{k: v for k, v in asdict(st).items() if v != Step.__dataclass_fields__[k].default}
                       for st in s.steps]} for s in self.schedules]}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "") -> Pipeline:
        if data.get("version") != 1:
            raise ValueError(f"unknown pipeline format version {data.get('version')!r} (expected 1)")
        schedules = tuple(
            Schedule(int(s["min_tokens"]), int(s["max_tokens"]),
                     {k: tuple(int(x) for x in v) for k, v in s["partitions"].items()},
                     tuple(Step(**st) for st in s["steps"]), s.get("predicted_ms"),
                     tuple(int(n) for n in s.get("units", ())))
            for s in data["schedules"])
        cap = data.get("nccl_max_ctas")
        return cls(schedules, dict(data.get("key", {})), source, None if cap is None else int(cap))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Pipeline:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read pipeline {str(path)!r}: {e}") from e
        return cls.from_json(data, str(path))


def _around_attention(op_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """A layer's ops before its attention (norm, qkv, rope) and after it (o, norm, FFN, all-reduces)."""
    at = op_names.index("decode_attention")
    return list(op_names[:at]), [op for op in op_names[at:] if op not in ("decode_attention", "prefill_attention")]


# the dense GEMMs of a layer (models/llama.py's op names): the ops a schedule may confine to a share
# of the SMs (layers/linear.py runs a capped one as a persistent Triton GEMM; a step marked cublas,
# as cuBLAS sized for the cap: pipeline.executor)
GEMM_OPS = frozenset({"qkv", "o", "gate_up", "down"})


def cap_gemms(steps: Sequence[Step], ctas: int | None, cublas: bool) -> tuple[Step, ...]:
    """The steps with every GEMM capped at ctas SMs: cuBLAS with its grid sized for them where
    cublas (kernels.linear.cublas_sms), else the persistent Triton GEMM on ctas CTAs; None: as they are."""
    if ctas is None:
        return tuple(steps)
    return tuple(replace(s, num_ctas=ctas, cublas=cublas) if s.op in GEMM_OPS else s for s in steps)


# what decode attention may run beside in overlap_schedule (its docstring says what each is)
OVERLAP_ORDERS = ("qkv", "mlp")


def overlap_schedule(op_names: Sequence[str], max_tokens: int, split: int, min_tokens: int,
                     decode_ctas: int | None, attention_parts: Sequence[int] | None = None,
                     gemm_ctas: int | None = None, beside: str = "qkv", cublas: bool = False) -> Schedule:
    """Two nano-batches, decode attention on stream 1 (capped at decode_ctas, issued first so the
    GEMMs fill the remaining SMs) beside the other nano-batch's work on stream 0. `beside` is what
    that work is:
    - "qkv", NanoFlow's one-GPU order: while nano-batch 0 runs its decode attention, nano-batch 1
      runs its norm, qkv and rope; then the roles swap (nano-batch 1's decode attention beside
      nano-batch 0's o and MLP).
    - "mlp": both nano-batches write their K/V first; nano-batch 1 runs its attention, then nano-batch
      0's decode attention runs beside nano-batch 1's o and MLP. Rows are ordered decodes first, so
      at a split past the decodes nano-batch 0 holds all of them, and "qkv" leaves them only a
      nano-batch's qkv GEMM to hide behind, "mlp" its o + gate_up + down (~4x the work).
    `attention_parts` splits the attention ops finer (bounds inside [0, max_tokens]); every other op
    runs over [0, split) and [split, max_tokens). gemm_ctas caps the GEMMs issued while a capped
    decode attention may still run, so their tiles fit the SMs left to them instead of a grid sized
    for the whole GPU (the persistent Triton GEMM, or cuBLAS sized for them where cublas); None
    leaves them to cuBLAS on the whole GPU."""
    if beside not in OVERLAP_ORDERS:
        raise ValueError(f"overlap_schedule: beside must be one of {OVERLAP_ORDERS}, got {beside!r}")
    dense = (0, split, max_tokens)
    attn = tuple(attention_parts) if attention_parts else dense
    partitions = {"dense": dense, "attn": attn}
    before, after = _around_attention(op_names)

    def dense_steps(ops: Sequence[str], part: int, beside_decode: bool) -> list[Step]:
        steps = [Step(op, part, "dense", 0) for op in ops]
        return list(cap_gemms(steps, gemm_ctas, cublas)) if beside_decode else steps

    def attention(part: int, op: str) -> list[Step]:
        """The attention nano-batches inside this dense nano-batch, decode on stream 1 (capped)."""
        inside = [a for a in range(len(attn) - 1) if attn[a] >= dense[part] and attn[a + 1] <= dense[part + 1]]
        if op == "decode_attention":
            return [Step(op, a, "attn", 1, decode_ctas) for a in inside]
        return [Step(op, a, "attn", 0) for a in inside]

    steps: list[Step] = []
    if beside == "qkv":
        for part in (0, 1):
            steps += dense_steps(before, part, beside_decode=part == 1)
            for a, b in zip(attention(part, "decode_attention"), attention(part, "prefill_attention"), strict=True):
                steps += [a, b]
        for part in (0, 1):
            steps += dense_steps(after, part, beside_decode=part == 0)
    else:
        # every K/V write of the layer precedes every attention read: a prefill chunk cut by the
        # split attends to keys that nano-batch 0 writes
        steps += dense_steps(before, 0, False) + dense_steps(before, 1, False)
        steps += attention(1, "decode_attention") + attention(1, "prefill_attention")
        steps += attention(0, "decode_attention")
        steps += dense_steps(after, 1, beside_decode=True)
        steps += attention(0, "prefill_attention") + dense_steps(after, 0, False)
    return Schedule(min_tokens, max_tokens, partitions, tuple(steps))


# the tensor-parallel all-reduces of a layer (models/llama.py's op names)
NETWORK_OPS = frozenset({"attn_all_reduce", "ffn_all_reduce"})


def network_overlap_schedule(op_names: Sequence[str], max_tokens: int, split: int, min_tokens: int,
                             gemm_ctas: int | None = None, cublas: bool = False) -> Schedule:
    """Two nano-batches under tensor parallelism (issue 13): each all-reduce runs on stream 1, so
    nano-batch 0's all-reduce overlaps nano-batch 1's ops up to its own all-reduce on stream 0, and
    nano-batch 1's overlaps nano-batch 0's next segment (across layers too). Every collective is on
    one stream, in the same order on every rank. Attention runs on stream 0 over the dense
    nano-batches, uncapped. gemm_ctas: every GEMM capped (cap_gemms), leaving the all-reduce's SMs."""
    dense = (0, split, max_tokens)
    steps: list[Step] = []
    segment: list[str] = []
    for op in op_names:
        if op not in NETWORK_OPS:
            segment.append(op)
            continue
        for part in (0, 1):
            steps += [Step(name, part, "dense") for name in segment]
            steps.append(Step(op, part, "dense", 1))
        segment = []
    for part in (0, 1):  # ops after the last all-reduce (none in a tensor-parallel layer)
        steps += [Step(name, part, "dense") for name in segment]
    return Schedule(min_tokens, max_tokens, {"dense": dense}, cap_gemms(steps, gemm_ctas, cublas))


def tp_overlap_schedule(op_names: Sequence[str], max_tokens: int, split: int, min_tokens: int,
                        decode_ctas: int | None) -> Schedule:
    """Two nano-batches under tensor parallelism with all three resources busy at once: the "mlp"
    order of overlap_schedule (nano-batch 0's decode attention on stream 1, capped, beside nano-batch
    1's o and FFN on stream 0) with every all-reduce on stream 2, one after the other in issue order
    (the same on every rank). Nano-batch 0's prefill attention is issued between nano-batch 1's o and
    its post-attention norm, so stream 0 has work while nano-batch 1's first all-reduce runs;
    nano-batch 1's before-ops lead each layer, covering nano-batch 0's last all-reduce of the layer
    before. A hand-made schedule (the search models two streams)."""
    before, after = _around_attention(op_names)
    first_reduce = next(i for i, op in enumerate(after) if op in NETWORK_OPS)

    def ops(names: Sequence[str], part: int) -> list[Step]:
        return [Step(op, part, "dense", 2 if op in NETWORK_OPS else 0) for op in names]

    steps = ops(before, 1) + ops(before, 0)
    steps += [Step("decode_attention", 1, "dense", 1, decode_ctas), Step("prefill_attention", 1, "dense", 0),
              Step("decode_attention", 0, "dense", 1, decode_ctas)]
    steps += ops(after[: first_reduce + 1], 1) + [Step("prefill_attention", 0, "dense", 0)]
    steps += ops(after[first_reduce + 1 :], 1) + ops(after, 0)
    return Schedule(min_tokens, max_tokens, {"dense": (0, split, max_tokens)}, tuple(steps))


def unit_sms(stream1_sms: int, num_sms: int) -> tuple[int, int]:
    """Execution units (Schedule.units) for two streams: stream 1 on stream1_sms SMs, stream 0 on the
    rest, each rounded down to a multiple of 8 (the granularity Hopper's green contexts take)."""
    first = stream1_sms // 8 * 8
    return (num_sms - first) // 8 * 8, first


def pingpong_schedule(op_names: Sequence[str], max_tokens: int, split: int, min_tokens: int,
                      decode_ctas: int | None, gemm_ctas: int | None = None, cublas: bool = False) -> Schedule:
    """Two nano-batches, each on a stream of its own for the whole layer (and so across layers):
    nano-batch 0 on stream 0, nano-batch 1 on stream 1, each with its decode attention capped at
    decode_ctas. Nothing orders the two but the K/V cache (nano-batch 1's attention reads keys
    nano-batch 0 writes in the same layer), so while one runs its decode attention the other runs
    its GEMMs, and either may run ahead into its next layer. Rows are decodes first: a split inside
    the decodes gives each nano-batch some of them, and the one holding the prefill tokens the
    larger share of the GEMMs. Hand-made (the search models one stream-1 op at a time).

    Under tensor parallelism every all-reduce runs on stream 2, one after another in issue order,
    the same on every rank (collectives of one communicator issued from two streams could run in
    different orders on different ranks and deadlock), and the issue order takes the nano-batches
    in turns a segment at a time (a segment: the ops up to and including an all-reduce), so the
    network stream alternates between them: nano-batch 0's all-reduce runs while nano-batch 1
    computes its segment, and the other way round. gemm_ctas: every GEMM capped (cap_gemms), e.g.
    at the SMs the other nano-batch's decode attention leaves, so that any two kernels of the two
    streams fit the GPU side by side, as NanoFlow's execution units do."""
    def step(op: str, part: int) -> Step:
        return Step(op, part, "dense", 2 if op in NETWORK_OPS else part,
                    decode_ctas if op == "decode_attention" else None)

    segments: list[list[str]] = [[]]  # one GPU: one segment, each nano-batch's whole layer in turn
    for op in op_names:
        segments[-1].append(op)
        if op in NETWORK_OPS:
            segments.append([])
    steps = [step(op, part) for seg in segments for part in (0, 1) for op in seg]
    return Schedule(min_tokens, max_tokens, {"dense": (0, split, max_tokens)}, cap_gemms(steps, gemm_ctas, cublas))
