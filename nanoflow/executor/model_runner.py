"""Model runner: owns the model and the KV-cache tensors; one call = one forward of the dense batch.

Its one input is a StepPlan (host lists, executor.step_plan). With tensor parallelism every rank has
a runner holding its shard of the model and KV cache: rank 0 (the engine's) broadcasts each step's
plan and samples; the others (executor.distributed) build the same batch from the plan and run the
same forward, meeting rank 0 in its collectives.
"""

from __future__ import annotations

import gc
import itertools
import logging
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nanoflow.config import PAGE_SIZE, EngineConfig, pages_for
from nanoflow.executor.cuda_graph import GraphRunner
from nanoflow.executor.sampler import SampledTensors, Sampler, SamplerOutput, SamplingMetadata
from nanoflow.executor.step_plan import SamplingRows, StepPlan
from nanoflow.forward_batch import ForwardBatch
from nanoflow.layers.parallel import ParallelState
from nanoflow.models.loader import build_model
from nanoflow.pipeline.cache import choose_pipeline
from nanoflow.pipeline.executor import GreenContexts, PipelineExecutor

log = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30  # default KV pool on the CPU when --num-kv-pages is not given
# The eager logits GEMM takes its rows in multiples of this (at most 7 rows computed for nothing a
# step): cuBLAS picks a kernel by the row count and a kernel's first use stalls (warm_logits), so an
# eighth of the row counts to warm.
LOGITS_ROW_MULTIPLE = 8


def freeze_heap(release: bool = True) -> None:
    """Exempts every object alive now (the imports' ~400k: torch, transformers, ...) from the
    garbage collector's full passes: each one scans the whole heap, 170-510 ms of the GPU idling
    mid-run on an H200 (a few per `nanoflow bench` run). Called as a runner starts on a GPU (on
    the CPU nothing idles, and the test suite's many engines would pay a full pass each), it first
    releases what an earlier call froze, so an earlier engine now garbage (cycles keep some) is
    collected here, at the latest; called again (release=False: the heap frozen at start stays
    frozen, not scanned again) once the graphs are captured, whose executors, nano-batch plans and
    pools a full pass would otherwise scan mid-run (a pipelined 512x1024 run on an H200: 10 full
    passes of up to 54 ms, 445 ms in all)."""
    if release:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


def fill_kv_pool(pool: torch.Tensor, seed: int) -> None:
    """Seeded values in every slot of the KV pool, never whatever the allocator held: a slot no step
    has written (the synthetic contexts of the tune and the benchmarks read such slots; serving never
    does) reads alike on every rank and in every run, and never as NaN. Zeros on the CPU; on a GPU
    standard normal values, as a served model's K/V toggle their bits: HBM and tensor-core power
    depend on the data, and on an H200 a decode step at the 700 W cap ran ~5% slower over random K/V
    than over zeros, pipelined steps differently again (benchmarks/power_step.py), so a tune over
    zeros chose schedules for a GPU with more power to spare than serving leaves it."""
    if pool.device.type != "cuda":
        pool.zero_()
        return
    gen = torch.Generator(pool.device).manual_seed(seed)
    # a few thousand pages at a time: an fp8 pool is filled through bfloat16 chunks (no fp8 normal_)
    for chunk in pool.flatten(0, 2).split(4096):
        if pool.element_size() == 1:
            chunk.copy_(torch.randn(chunk.shape, generator=gen, device=pool.device, dtype=torch.bfloat16))
        else:
            chunk.normal_(generator=gen)


def pipeline_key(config: EngineConfig, tp_size: int) -> dict[str, Any]:
    """What a tuned pipeline depends on: the GPU, the model's shape, the dtypes, TP size (and expert
    parallel), token budget."""
    a = config.arch
    gpu = torch.cuda.get_device_name(config.device) if config.device.type == "cuda" else "cpu"
    key = {"gpu": gpu, "architecture": a.architecture, "hidden_size": a.hidden_size,
           "intermediate_size": a.intermediate_size, "num_layers": a.num_layers, "num_heads": a.num_heads,
           "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "num_experts": a.num_experts,
           "dtype": str(config.dtype).removeprefix("torch."),
           "kv_cache_dtype": str(config.kv_cache_dtype).removeprefix("torch."), "tp": tp_size,
           "max_num_batched_tokens": config.max_num_batched_tokens}
    if config.expert_parallel:  # other MoE GEMM shapes; absent otherwise, so older cache keys still match
        key["expert_parallel"] = True
    return key


class ModelRunner:
    def __init__(self, config: EngineConfig, par: ParallelState | None = None) -> None:
        if config.device.type == "cuda":  # where a collector pause idles the GPU
            freeze_heap()
        self.config = config
        self.device = config.device
        self.arch = config.arch
        self.kv_dtype = config.kv_cache_dtype  # the model dtype, or fp8 (kernels widen on load)
        self.par = par or ParallelState()
        if self.par.expert_parallel != config.expert_parallel:  # the model's split must be the config's
            raise ValueError(f"ParallelState.expert_parallel={self.par.expert_parallel} but the configuration's "
                             f"expert_parallel={config.expert_parallel}")
        self.model = build_model(config.model, config.arch, config.dtype, self.device, config.max_model_len,
                                 self.par, enforce_eager=config.enforce_eager,
                                 dummy=config.args.load_format == "dummy", seed=config.seed)
        self.num_pages = self.par.min(self._decide_num_pages())  # the same pool (page ids) on every rank
        kv_heads = self.arch.num_kv_heads // self.par.size
        shape = (self.arch.num_layers, 2, self.num_pages, kv_heads, PAGE_SIZE, self.arch.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        fill_kv_pool(self.kv_cache, config.seed)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.arch.num_layers)]
        self.model.bind_kv_caches(self.kv_caches)
        self.sampler = Sampler(self.device, config.seed)
        pipeline = choose_pipeline(config.args.pipeline, pipeline_key(config, self.par.size))
        # one executor per schedule of the pipeline (none: every step runs the sequential schedule);
        # their execution units, one green context per SM count, shared
        green = GreenContexts(self.device)
        self.executors = [PipelineExecutor(s, self.model.layer_ops, self.device, green=green)
                          for s in (pipeline.schedules if pipeline else ())]
        # Tensor parallel: a step's schedule decides how many collectives it issues, and in which
        # order; every rank reads its own pipeline cache, so check that they all read the same.
        self.par.check_same("the pipeline schedules", [ex.schedule for ex in self.executors])
        self.graphs: GraphRunner | None = None
        if self._use_graphs:
            self.graphs = GraphRunner(self.model, config.cuda_graph_max_tokens, config.max_num_seqs,
                                      pages_for(config.max_model_len), self.device, self.executor_for, self.par,
                                      config.arch.padding_row_cost(), config.cuda_graph_sizes)
            self.graphs.capture()
            self.warm_logits(min(config.max_num_seqs, config.max_num_batched_tokens))
        if config.device.type == "cuda":
            freeze_heap(release=False)

    @torch.inference_mode()
    def warm_logits(self, max_rows: int) -> None:
        """Runs the logits GEMM once at every row count a step can sample up to max_rows (multiples
        of LOGITS_ROW_MULTIPLE). It runs eagerly after each step's graph, and cuBLAS picks its
        kernel by the row count: on an H200 the first use of a kernel held the host inside the GEMM
        ~80 ms, until the GPU had drained its queue (we take it for CUDA's lazy module loading), in
        every other step of a decode-heavy ramp-up, where the rows grow a few a step, and the GPU
        then idled while the host built the next step (benchmarks/host_stall_check.py). Here the
        GPU is idle, so each first use costs only its load."""
        m = LOGITS_ROW_MULTIPLE
        hidden = torch.zeros(max_rows + m, self.arch.hidden_size, dtype=self.config.dtype, device=self.device)
        for rows in range(m, max_rows + m, m):
            self.model.compute_logits(hidden[:rows])
        del hidden
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the logits' blocks: the KV pool sized the margin for one step's

    def release_graphs(self) -> None:
        """Frees the CUDA graphs and waits for the GPU. Tensor parallel: before the NCCL group is
        destroyed, on every rank (GraphRunner.release says why)."""
        if self.graphs is not None:
            self.graphs.release()
        self.graphs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def _use_graphs(self) -> bool:
        # MoE is captured too: its fast path groups tokens by expert on the device (no host sync).
        # Tensor parallel too: every rank captures its forward with the NCCL all-reduces inside, and
        # all replay the same graph for a step (GraphRunner: same tables, same replay times).
        return bool(self.config.cuda_graph_max_tokens)

    def executor_for(self, num_tokens: int) -> PipelineExecutor | None:
        """The pipeline schedule that runs an iteration of num_tokens tokens (None: sequential)."""
        return next((ex for ex in self.executors
                     if ex.schedule.min_tokens <= num_tokens <= ex.schedule.max_tokens), None)

    @property
    def page_bytes(self) -> int:
        kv_heads = self.arch.num_kv_heads // self.par.size
        return self.arch.num_layers * 2 * kv_heads * PAGE_SIZE * self.arch.head_dim * self.kv_dtype.itemsize

    def _decide_num_pages(self) -> int:
        if self.config.args.num_kv_pages is not None:
            return self.config.args.num_kv_pages
        if self.device.type != "cuda":
            return max(_CPU_KV_BYTES // self.page_bytes, pages_for(self.config.max_model_len))
        if self.par.size > 1:
            # NCCL makes its communicator's buffers at the first collective: they count as used
            self.par.all_reduce(torch.zeros(1, device=self.device))
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        forward, activations = self._profile_activation_bytes()
        # CUDA graphs are captured after the pool exists, into a memory pool of their own: keep room
        # for one more forward's activations (the largest graph's; the others share its memory).
        graph_reserve = forward if self._use_graphs else 0
        budget = total * self.config.args.gpu_memory_utilization - (total - free) - activations - graph_reserve
        pages = int(budget // self.page_bytes)
        if pages < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"activations need {activations / 2**30:.1f} GiB; raise gpu_memory_utilization or lower "
                "max_num_batched_tokens")
        log.info("KV cache: %d pages (%.1f GiB, %d tokens, %s)", pages, pages * self.page_bytes / 2**30,
                 pages * PAGE_SIZE, str(self.kv_dtype).removeprefix("torch."))
        return pages

    def _profile_activation_bytes(self) -> tuple[int, int]:
        """(forward, all): the peak extra memory of one forward at the full token budget (one long
        prefill, the worst case for the layers), and the larger of that and the peak of the logits
        and sampling of the most rows a step can sample, every row with every filter, penalty and
        logprob (SamplingMetadata.worst_case). Each with a 10% margin."""
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len)
        pages = pages_for(n)
        kv_heads = self.arch.num_kv_heads // self.par.size
        # the cache's own dtype: the eager path's widened K/V copies are part of the peak
        kv = torch.empty((2, pages, kv_heads, PAGE_SIZE, self.arch.head_dim), dtype=self.kv_dtype,
                         device=self.device)
        self.model.bind_kv_caches([(kv[0], kv[1])] * self.arch.num_layers)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        batch = self.build(StepPlan.synthetic([], [(0, n)], self.arch.vocab_size))
        rows = min(self.config.max_num_seqs, n)
        with torch.inference_mode():
            hidden = self.model(batch)[-rows:]
            torch.cuda.synchronize(self.device)
            forward = torch.cuda.max_memory_allocated(self.device) - base
            logits = self.model.compute_logits(hidden)
            # a sampler of its own: the engine's generator draws nothing before the first request
            Sampler(self.device, 0)(logits, SamplingMetadata.worst_case(rows, logits.shape[1], self.device))
            del hidden, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del kv
        self.model.bind_kv_caches([])  # the pool's caches are bound once they exist
        torch.cuda.empty_cache()
        return int(forward * 1.1), int(peak * 1.1)

    # --- per iteration ---------------------------------------------------------------------------
    def build(self, plan: StepPlan, prev: InFlight | None = None) -> ForwardBatch:
        """Flat device tensors for a plan. The in-flight tokens come from prev's sampled tokens on
        the device; only rank 0 has those, and it broadcasts them to the other ranks (prev=None)."""
        batch = self.model.prepare(self._build_batch(plan))
        if plan.fill_at:
            idx, rows = self.upload(np.asarray(plan.fill_at, dtype=np.int64),
                                    np.asarray(plan.fill_from, dtype=np.int64))
            if prev is not None:
                tokens = prev.sampled.tokens[rows]
            else:
                tokens = torch.empty(len(plan.fill_at), dtype=torch.int64, device=self.device)
            batch.input_ids[idx] = self.par.broadcast(tokens)
        return batch

    def forward(self, batch: ForwardBatch, eager: bool = False, sequential: bool = False) -> torch.Tensor | None:
        """The model forward and the logits of the rows that sample (None when none does). eager:
        no graph, the pipeline's schedule for the batch's size run op by op (StepPlan.eager);
        sequential: the sequential schedule, pipeline or not (StepPlan.sequential)."""
        key = self.graphs.select(batch, pipelined=not sequential) if self.graphs is not None and not eager else None
        hidden = self.graphs.run(batch, key) if key is not None else None
        if hidden is None:
            # beside captured graphs, a step that fits none runs sequentially: pipelines are tuned as
            # graph replays, and launched eagerly a second stream's kernels and events cost host time
            # the GPU then waits for (an H200, ping-pong, ~600-token steps: 8.8 ms idle of 59.6).
            # Without graphs (--enforce-eager, --cuda-graph-max-tokens 0, the CPU) they run eagerly.
            ex = self.executor_for(batch.num_tokens) if (self.graphs is None or eager) and not sequential else None
            walk = partial(ex.run, parts=ex.split(batch, self.model.prepare)) if ex else None
            hidden = self.model(batch, walk)
        n = batch.logits_indices.shape[0]
        if n == 0:
            return None
        rows = F.pad(batch.logits_indices, (0, -n % LOGITS_ROW_MULTIPLE))  # padded with token 0's row
        return self.model.compute_logits(hidden[rows])[:n]

    def _build_batch(self, plan: StepPlan) -> ForwardBatch:
        # numpy for the per-token index arithmetic: Python loops over ~2k tokens cost milliseconds.
        token_ids, tables = plan.token_ids, plan.tables
        qlens = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        # a multiple of 16 pages, so the row stride Triton sees keeps one specialisation
        width = -(-max(len(t) for t in tables) // 16) * 16
        table = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        seq_of_token = np.repeat(np.arange(len(token_ids)), qlens)
        qstart = np.zeros(len(token_ids) + 1, dtype=np.int32)
        np.cumsum(qlens, out=qstart[1:])
        positions = np.asarray(plan.starts, dtype=np.int64)[seq_of_token] + np.arange(qstart[-1]) - qstart[seq_of_token]
        slots = table[seq_of_token, positions // PAGE_SIZE].astype(np.int64) * PAGE_SIZE + positions % PAGE_SIZE
        flat_ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(qstart[-1]))

        seq_lens = np.asarray(plan.seq_lens, dtype=np.int32)
        ids, pos, slot, logit_idx = self.upload(flat_ids, positions, slots,
                                                np.asarray(plan.sample_at, dtype=np.int64))
        qs, lens, pt = self.upload(qstart, seq_lens, table)
        return ForwardBatch(
            input_ids=ids,
            positions=pos,
            slot_mapping=slot,
            query_start_loc=qs,
            seq_lens=lens,
            page_tables=pt,
            logits_indices=logit_idx,
            num_decodes=plan.num_decodes,
            seq_lens_cpu=list(plan.seq_lens),
            query_lens_cpu=qlens.tolist(),
            decode_rows=plan.num_decodes,
        )

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Host arrays of one dtype -> device tensors, in one copy from pinned memory. A copy from
        pageable memory would make the CPU wait for the GPU work queued before it, which would
        undo the overlap of scheduling with the previous step."""
        # Every array starts 16-byte aligned: Triton specialises kernels on pointer alignment, so
        # offsets that vary with the batch size would compile new kernel variants mid-run (~1 s each).
        align = max(1, 16 // arrays[0].itemsize)
        offsets, off = [], 0
        for a in arrays:
            offsets.append(off)
            off += -(-a.size // align) * align
        flat = np.zeros(off, dtype=arrays[0].dtype)
        for a, o in zip(arrays, offsets, strict=True):
            flat[o : o + a.size] = a.reshape(-1)
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        return [dev[o : o + a.size].view(a.shape) for a, o in zip(arrays, offsets, strict=True)]

    def _upload_params(self, params: list, *names: str) -> list[torch.Tensor]:
        """One fp32 device tensor per SamplingParams field, in one copy."""
        return self.upload(*(np.asarray([getattr(p, k) for p in params], dtype=np.float32) for k in names))

    def sampling_metadata(self, rows: SamplingRows) -> SamplingMetadata:
        """The sampling rows' settings as device tensors."""
        params = rows.params
        dev, V = self.device, self.arch.vocab_size
        temperature, top_p, min_p = self._upload_params(params, "temperature", "top_p", "min_p")
        meta = SamplingMetadata(
            temperature=temperature,
            top_p=top_p,
            top_k=self.upload(np.asarray([p.top_k if p.top_k > 0 else V for p in params], dtype=np.int64))[0],
            min_p=min_p,
            generators=rows.generators,
            all_greedy=all(p.greedy for p in params),
            any_top_p_k_min_p=any(p.top_p < 1 or p.top_k > 0 or p.min_p > 0 for p in params),
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
            banned=rows.banned or None,
        )
        if rows.output_token_ids is not None:
            counts = torch.zeros(len(params), V, dtype=torch.int32, device=dev)
            seen = torch.zeros(len(params), V, dtype=torch.bool, device=dev)
            for row, (out_ids, all_ids) in enumerate(zip(rows.output_token_ids, rows.all_token_ids, strict=True)):
                out = torch.tensor(out_ids, dtype=torch.int64, device=dev)
                counts[row].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))
                seen[row, torch.tensor(all_ids, dtype=torch.int64, device=dev)] = True
            meta.output_counts, meta.seen_mask = counts, seen
            meta.presence, meta.frequency, meta.repetition = self._upload_params(
                params, "presence_penalty", "frequency_penalty", "repetition_penalty")
        return meta

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev: InFlight | None = None) -> InFlight:
        """Queues one forward and the sampling on the device and returns without waiting for them."""
        on_gpu = self.device.type == "cuda"
        start = torch.cuda.Event(enable_timing=True) if on_gpu else None
        # Tensor parallel: the other ranks run the same step. On one host the plan goes into the plan
        # channel's ring and this returns at once (the workers read it while our forward runs).
        if self.par.size > 1:
            self.par.broadcast_object(plan.for_workers())
        batch = self.build(plan, prev)
        if start is not None:
            start.record()
        if self.graphs is not None:
            self.graphs.last_launch_ms = 0.0
        logits = self.forward(batch)
        sampled = self.sampler(logits, self.sampling_metadata(plan.sampling)) if plan.sampling else None
        return InFlight(sampled, start, on_gpu, self.graphs.last_launch_ms if self.graphs is not None else 0.0)


class InFlight:
    """A launched step: its sampled tokens are copied to pinned host memory behind the GPU work,
    and read (waiting only then) when the engine processes the step."""

    def __init__(self, sampled: SampledTensors | None, start: torch.cuda.Event | None, on_gpu: bool,
                 graph_launch_ms: float = 0.0) -> None:
        self.sampled, self.start = sampled, start
        self.graph_launch_ms = graph_launch_ms  # host ms in its graph's launch (0: no graph)
        self.end: torch.cuda.Event | None = None
        self.host: list[torch.Tensor] = []
        if sampled is not None:
            for t in sampled.tensors():
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=on_gpu)
                self.host.append(h.copy_(t, non_blocking=on_gpu))
        if on_gpu:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()

    def result(self) -> SamplerOutput:
        if self.end is not None:
            self.end.synchronize()
        if self.sampled is None:
            return SamplerOutput([], None)
        return SampledTensors.to_output(self.host, self.sampled.num_logprobs)
