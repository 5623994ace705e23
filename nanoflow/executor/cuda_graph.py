"""CUDA graphs of the whole model forward, one per token-count bucket and kind (decode-only, mixed).

An iteration launches ~15 kernels per layer; below a few hundred tokens the GPU would wait on Python
launching them. With the fixed dense token budget every full iteration has the same token count,
so one graph serves all of them, and smaller ones replay the next bucket up. Each graph reads
static input and metadata buffers; a batch is copied into them and padded: padding tokens write no
K/V (slot -1), the decode kernel reads the decode count from the device, and the prefill kernel's
spare tiles are idle (-1). Every Triton-path forward of a batch that fits a bucket is a replay,
MoE models' included (the fused MoE path has no host synchronisation). A bucket a pipeline schedule
covers has a pipelined graph beside its sequential one (all layers, all streams, one graph).

A batch replays the bucket that ran fastest at capture, among those it fits, not always the
smallest: cuBLAS's choice of GEMM kernel is not monotonic in the row count (on the H100 one
Llama-3-8B layer's GEMMs take 447 us at 448 rows but 330 us at 512), so padding further can pay.

Tensor parallelism: each rank captures its shard's forward, NCCL all-reduces inside. A replay's
collectives pair with the other ranks' replays of the same graph, so every rank must replay the same
key for the same step, and capture the same keys in the same order:
- the tables every choice reads (keys, capacities, pipeline schedules) are checked identical on every
  rank before anything is captured (`ParallelState.check_same`);
- the replay times are reduced to their maximum over the ranks after capture (a step runs at its
  slowest rank's pace), so `select` reads the same table on every rank; given the same plan (the
  workers build their batch from rank 0's), `select` and `run`'s eager fallback then decide alike;
- a warm-up or capture that fails on one rank fails on every rank: after each, the ranks agree on
  success over the gloo control group before anyone waits on the device (`_together`), so no rank
  waits in a collective its peer will never join.
Warm-up runs each key's collectives eagerly before its capture (NCCL must have run them once).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from tqdm import tqdm

from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.op import Walk
from nanoflow.layers.parallel import ParallelState
from nanoflow.pipeline.executor import PipelineExecutor

log = logging.getLogger(__name__)

# Prefill tiles a mixed graph holds beyond its tokens' own query blocks: one partial block per
# prefill chunk, so batches of up to this many chunks fit (the dense budget rarely has more than a few).
SPARE_TILES = 32
# Above this many tokens the launches are hidden behind the kernels, and the padding rows'
# GEMM work is what a bucket costs: take a graph only if that work is at most 1/16 of the batch's.
SMALL_BATCH = 512
PAD_LIMIT = 1 / 16


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two and steps up to SMALL_BATCH, then a grid of 1/16 of each octave (every 32 tokens
    to 1,024, every 64 to 2,048, ...), so that every batch has a graph within PAD_LIMIT of its size.
    A coarser grid (every 256) left steps of 513-722 and 769-963 tokens without one: eager, so without
    their pipeline (5-8% of a one-H200 bench run, 29% of a 70B TP2 run; docs/pipeline_history.md)."""
    sizes = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, SMALL_BATCH}
    s = SMALL_BATCH
    while s < max_tokens:
        s += (1 << (s.bit_length() - 1)) // 16  # 512 < s <= 1,024: 32; <= 2,048: 64; ...
        sizes.add(s)
    return sorted({x for x in sizes if x < max_tokens} | {max_tokens})


def bucket_ends(sizes: Sequence[int], step: int) -> list[int]:
    """The graph sizes at which a tuned pipeline's buckets end (`nanoflow tune`): every size up to
    SMALL_BATCH, above it the multiples of `step` and the largest. A schedule's split is a row count,
    so a bucket must not hold graphs much smaller than its top (a 257-512 bucket split at 256 gave
    a 310-token step nano-batches of 256 and 54: 0.94x in an H200 trace bench); above SMALL_BATCH the
    graphs come every 1/16 of an octave, and a bucket of several (544-768 split at 288) stays
    balanced enough at each of them."""
    top = max(sizes, default=0)
    return sorted(s for s in set(sizes) if s <= SMALL_BATCH or s % step == 0 or s == top)


def capture_sizes(max_tokens: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The token sizes a GraphRunner captures: `sizes` (EngineConfig.cuda_graph_sizes, ending at
    max_tokens), else token_buckets(max_tokens); none without graphs (max_tokens 0)."""
    if not max_tokens:
        return []
    return sorted(sizes) if sizes is not None else token_buckets(max_tokens)


# (bucket, mixed, pipelined): the graph's token count, whether it runs prefill attention (else it
# is decode-only) and whether it runs the bucket's pipeline schedule (else the sequential one).
Key = tuple[int, bool, bool]


class GraphRunner:
    def __init__(self, model: nn.Module, max_tokens: int, max_seqs: int, max_pages: int, device: torch.device,
                 executor_for: Callable[[int], PipelineExecutor | None] = lambda n: None,
                 par: ParallelState | None = None, padding_row_cost: float = 1.0,
                 buckets: Sequence[int] | None = None) -> None:
        """executor_for(bucket): the pipeline schedule for a bucket, captured beside its sequential
        graph (None: the sequential graph only). par: this rank's (tensor parallel: every rank captures
        together and agrees on the replay times). padding_row_cost: a padding row's work as a fraction
        of a real token's (ModelArch.padding_row_cost: MoE pads cheaply, so its larger batches take
        graphs that pad more). buckets: the sizes to capture, max_tokens among them (None:
        token_buckets(max_tokens))."""
        self.model, self.device, self.executor_for = model, device, executor_for
        self.padding_row_cost = padding_row_cost
        self.par = par or ParallelState()
        self.buckets = capture_sizes(max_tokens, buckets)
        if self.buckets[-1] != max_tokens:
            raise ValueError(f"CUDA graph sizes {self.buckets} must end at the largest, {max_tokens} tokens")
        self.max_seqs = min(max_seqs, max_tokens)
        self.max_pages = max_pages
        # per key: the static batch it reads, its tensors' shapes, the captured graph (on the CPU,
        # where nothing is captured: None) and its output
        self.static: dict[Key, ForwardBatch] = {}
        self.capacity: dict[Key, dict[str, torch.Size]] = {}
        self.graphs: dict[Key, torch.cuda.CUDAGraph | None] = {}
        self.outputs: dict[Key, torch.Tensor] = {}
        # pipelined graphs: their executor, static nano-batches per partition, and the fewest tokens
        # a batch needs so that none of its nano-batches is empty
        self.executors: dict[Key, PipelineExecutor] = {}
        self.parts: dict[Key, dict[str, list[ForwardBatch]]] = {}
        self.walks: dict[Key, Walk] = {}
        self.min_tokens: dict[Key, int] = {}
        # ms per replay measured at capture, with nothing to attend to: the part of a step's time
        # that depends on the bucket (on the CPU, where nothing is timed: the bucket size). What
        # select reads: the slowest rank's time; local_replay_ms: this rank's own measurement.
        self.replay_ms: dict[Key, float] = {}
        self.local_replay_ms: dict[Key, float] = {}
        self.num_replays = 0
        # host ms the last graph launch took: a launch that waited for the GPU (its work queue full)
        # would leave the host late for the next step (the step timeline's host_graph_launch_ms)
        self.last_launch_ms = 0.0

    def _static_batch(self, num_tokens: int, mixed: bool, token_offset: int = 0) -> ForwardBatch:
        tiles = self.model.prefill_tile_capacity(num_tokens, SPARE_TILES) if mixed else 0
        return ForwardBatch.capacity(num_tokens, min(num_tokens, self.max_seqs), self.max_pages, tiles,
                                     self.device).replace(token_offset=token_offset)

    def _keys(self) -> list[Key]:
        """A mixed graph per bucket and a decode-only one per bucket of at most max_seqs tokens (the
        most decodes a batch can have); each also pipelined where a schedule covers the bucket.
        Largest first, so the smaller graphs reuse its memory in the shared pool."""
        return [(b, mixed, piped) for b in reversed(self.buckets) for mixed in (True, False)
                for piped in (True, False)
                if (mixed or b <= self.max_seqs) and (not piped or self.executor_for(b) is not None)]

    def _prepare(self, key: Key) -> None:
        """The key's static batch (as made, a capacity batch computes nothing and writes no live
        page), its capacity and, pipelined, its executor, static nano-batches and walk over them."""
        bucket, mixed, piped = key
        batch = self.static[key] = self._static_batch(bucket, mixed)
        # tensors a capacity batch leaves empty (the logits rows) are not inputs of the graph
        self.capacity[key] = {name: shape for name, shape in batch.shapes().items() if shape.numel()}
        self.min_tokens[key] = 1
        if not piped:
            return
        ex = self.executors[key] = self.executor_for(bucket)
        self.min_tokens[key] = ex.schedule.min_tokens
        self.parts[key] = {name: [self._static_batch(b - a, mixed, a)
                                  for a, b in itertools.pairwise(ex.schedule.bounds(name, bucket))]
                           for name in ex.schedule.partitions}
        self.walks[key] = partial(ex.run, parts=self.parts[key])

    def _tables(self, keys: list[Key]) -> list[tuple]:
        """Everything select and run decide from besides the batch and the replay times."""
        return [(key, sorted(self.capacity[key].items()), self.min_tokens[key],
                 repr(self.executors[key].schedule) if key in self.executors else None,
                 {name: [sorted(p.shapes().items()) for p in ps] for name, ps in self.parts.get(key, {}).items()})
                for key in keys]

    @torch.inference_mode()
    def capture(self) -> None:
        on_gpu = self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if on_gpu else None
        keys = self._keys()
        for key in keys:
            self._prepare(key)
        self.par.check_same("the CUDA graph tables (buckets, capacities, pipeline schedules)", self._tables(keys))
        measured = []
        for key in tqdm(keys, desc="CUDA graphs", disable=not on_gpu or self.par.rank != 0, leave=False):
            self._together(key, "warm-up", partial(self._warm_up, key))
            self._together(key, "capture", partial(self._capture_one, key, pool))
            # every rank replays it as often, so the replays' collectives pair up
            measured.append(self._replay_time(key))
        self.local_replay_ms = dict(zip(keys, measured, strict=True))
        # a step runs at its slowest rank's pace (every all-reduce waits for it)
        self.replay_ms = dict(zip(keys, self.par.max_each(measured), strict=True))
        log.info("captured %d CUDA graphs (token buckets %s; %d pipelined)", len(self.graphs), self.buckets,
                 len(self.executors))

    def release(self) -> None:
        """Destroys every captured graph now, whoever else still holds this runner or a graph: NCCL
        counts each graph that captured one of its collectives and tears its communicator down only
        once all of them are gone (a destroy_process_group that hung on 2 H200s)."""
        for graph in self.graphs.values():
            if graph is not None:
                graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def _together(self, key: Key, what: str, step: Callable[[], None]) -> None:
        """Runs one step of the capture and, under tensor parallelism, agrees with the other ranks on
        its success before going on: a rank that failed raises its own error, the others a
        RuntimeError instead of waiting on the device for collectives the failed rank never issues."""
        try:
            step()
            error = None
        except Exception as e:  # re-raised below, once the other ranks know
            error = e
        if self.par.min(int(error is None)):
            return
        if error is not None:
            raise error
        raise RuntimeError(f"CUDA graph {what} of {key} failed on another tensor-parallel rank (its error is "
                           f"logged there); rank {self.par.rank} stops too")

    def _warm_up(self, key: Key) -> None:
        """Two eager forwards, not waited for: Triton compiles, cuBLAS picks, NCCL runs the collectives
        once, all outside the capture."""
        if self.device.type == "cuda":
            for _ in range(2):
                self.model(self.static[key], self.walks.get(key))

    def _capture_one(self, key: Key, pool: tuple[int, int] | None) -> None:
        if self.device.type != "cuda":  # the CPU: nothing to capture; run replays the forward
            self.graphs[key] = None
            return
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[key] = self.model(self.static[key], self.walks.get(key))
        self.graphs[key] = graph

    def _replay_time(self, key: Key, reps: int = 3) -> float:
        """ms per replay of the key's graph (on the CPU: the bucket size)."""
        graph = self.graphs[key]
        if graph is None:
            return float(key[0])
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    def select(self, batch: ForwardBatch, pipelined: bool = True) -> Key | None:
        """The graph that runs this batch: a pipelined one if any fits (pipelined=False: none), else
        the fastest sequential one it fits; None: run it eagerly."""
        n, mixed, shapes = batch.num_tokens, batch.num_prefills > 0, batch.shapes()
        fits = [key for key in self.graphs if key[1] == mixed and key[0] >= n >= self.min_tokens[key]
                and (pipelined or not key[2])
                and pads_acceptably(key[0], n, self.padding_row_cost) and _fits(shapes, self.capacity[key])]
        piped = [key for key in fits if key[2]]
        return min(piped or fits, key=self.replay_ms.__getitem__) if fits else None

    def run(self, batch: ForwardBatch, key: Key) -> torch.Tensor | None:
        """The graph's output rows of this batch; None if a nano-batch of it does not fit the graph's
        (run it eagerly then)."""
        static = self.static[key]
        pairs = self.nano_batches(batch, key)
        if pairs is None:
            return None
        for p, s in pairs:
            p.copy_into(s)
        batch.copy_into(static)
        self.num_replays += 1
        graph = self.graphs[key]
        if graph is None:  # the CPU: run the forward the graph would replay, on the same buffers
            return self.model(static, self.walks.get(key))[: batch.num_tokens]
        t = time.perf_counter()
        graph.replay()
        self.last_launch_ms = (time.perf_counter() - t) * 1e3
        return self.outputs[key][: batch.num_tokens]

    def nano_batches(self, batch: ForwardBatch, key: Key) -> list[tuple[ForwardBatch, ForwardBatch]] | None:
        """A pipelined key's nano-batches of the batch, each beside the static one it is copied into
        (none for a sequential key); None if one does not fit. Decided from the batch's shapes and the
        key's schedule alone, so every tensor-parallel rank decides alike."""
        if key not in self.executors:
            return []
        live = self.executors[key].split(batch, self.model.prepare)
        pairs = [(p, s) for name, ps in live.items() for p, s in zip(ps, self.parts[key][name], strict=True)]
        return pairs if all(_fits(p.shapes(), s.shapes()) for p, s in pairs) else None


def pads_acceptably(bucket: int, num_tokens: int, padding_row_cost: float) -> bool:
    """Whether a batch of num_tokens may replay a graph of bucket tokens: small batches always
    (launches are what they cost), larger ones if the padding rows add at most PAD_LIMIT of work."""
    return bucket <= SMALL_BATCH or (bucket - num_tokens) * padding_row_cost <= PAD_LIMIT * num_tokens


def _fits(shapes: dict[str, torch.Size], capacity: dict[str, torch.Size]) -> bool:
    """Whether every tensor of a batch fits its static counterpart."""
    return all(all(a <= b for a, b in zip(shapes[name], cap, strict=True)) for name, cap in capacity.items())
