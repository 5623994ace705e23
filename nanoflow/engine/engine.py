"""The engine loop: scheduler step (CPU) -> model runner (one forward + sampling) -> output processor."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from nanoflow.config import PAGE_SIZE, EngineConfig, pages_for
from nanoflow.engine.output_processor import OutputProcessor
from nanoflow.engine.request import Logprob, Request, RequestOutput, Sequence
from nanoflow.engine.scheduler import Scheduler
from nanoflow.engine.stats import StepShape, StepStats
from nanoflow.engine.step_planner import plan_step, sampled_seqs
from nanoflow.engine.tokenizer import load_tokenizer
from nanoflow.engine_args import EngineArgs
from nanoflow.executor.distributed import TensorParallelGroup, check_tensor_parallel
from nanoflow.executor.model_runner import InFlight, ModelRunner
from nanoflow.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step on the device, as the engine keeps it until it is processed (one step later)."""

    inflight: InFlight
    seqs: list[Sequence]  # the sequences that sample in it, in sampling-row order
    shape: StepShape | None  # what it computed (only while the statistics keep a timeline)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.arch = config.arch
        self.max_model_len = config.max_model_len
        check_tensor_parallel(self.arch, config.tensor_parallel_size, config.device, config.expert_parallel)
        args = config.args
        self.tokenizer: PreTrainedTokenizerBase | None = load_tokenizer(args.model, args.tokenizer,
                                                                        args.skip_tokenizer_init)
        self.eos_token_ids = _eos_token_ids(args.model, config.hf_config, self.tokenizer)
        torch.manual_seed(config.seed)
        # Tensor parallel: this process is rank 0; the other ranks run nanoflow.executor.distributed.
        self.tp: TensorParallelGroup | None = None
        if config.tensor_parallel_size > 1:
            self.tp = TensorParallelGroup.start(config)
            weakref.finalize(self, self.tp.shutdown)  # also at interpreter exit
        try:
            self.runner = ModelRunner(self.tp.config if self.tp else config, self.tp.par if self.tp else None)
        except BaseException as e:
            if self.tp is not None:
                try:
                    if isinstance(e, RuntimeError):  # a failed collective: name a worker that died
                        self.tp.check_workers(e)
                finally:
                    self.tp.abort()
            raise
        self.scheduler = Scheduler(self.runner.num_pages, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, args.admission_output_tokens)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._pending: LaunchedStep | None = None
        self.stats = StepStats()
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()

    @classmethod
    def from_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(EngineConfig.from_args(args))

    # --- requests in and out ---------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None, params: SamplingParams
    ) -> None:
        """Queues a request; raises ValueError (and queues nothing) when it can never run."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either a prompt or prompt_token_ids is required")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (the engine runs with skip_tokenizer_init)")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        self._check_prompt(ids)
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(next(self._seq_ids), request_id, i, ids, params, max_tokens, next(self._arrivals), gen)
            self.output_processor.start(seq)
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, prompt, ids, params, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.arch.vocab_size}), got {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room for output within "
                             f"max_model_len={self.max_model_len}")
        pages = pages_for(len(ids) + 1)
        if pages > self.runner.num_pages:
            raise ValueError(f"the prompt has {len(ids)} tokens and needs {pages} KV pages, but the whole cache "
                             f"holds {self.runner.num_pages} pages ({self.runner.num_pages * PAGE_SIZE} tokens)")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request wherever it is and frees its KV pages at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self.output_processor.request_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- one iteration ---------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Launches one dense-batch iteration and, while the GPU runs it, processes the previous
        one (NanoFlow's asynchronous scheduling: a sequence that stopped is retired one step late).
        Returns the outputs of requests that made progress in the processed step (only those that
        finished with finished_only, which spares offline runs a copy of every output per step)."""
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        if self.tp is not None:
            self.tp.check_workers()
        if self._pending is not None and any(s.params.has_penalties for s in self._pending.seqs):
            # Penalties need every sampled token on the CPU before the next step is prepared.
            outputs, self._pending = self._process(self._pending, finished_only), None
        sched = self.scheduler.schedule()
        for seq in sched.capped:
            req = self.requests[seq.request_id]
            if req.finished:
                del self.requests[seq.request_id]
                outputs.append(self.output_processor.request_output(req))
        launched = None
        if not sched.empty:
            prev, sampled = self._pending, sampled_seqs(sched)
            plan = plan_step(sched, sampled, prev.seqs if prev else [], self.eos_token_ids)
            try:
                inflight = self.runner.launch(plan, prev.inflight if prev else None)
            except RuntimeError as e:
                if self.tp is not None:
                    self.tp.check_workers(e)  # a failed collective: name a worker that died
                raise
            shape = None
            if self.stats.keep_timeline:  # an O(decodes) sum per step: only when someone reads it
                shape = StepShape(sched.num_tokens, len(sched.decodes),
                                  sum(s.seq.num_computed_tokens for s in sched.decodes),
                                  len(self.scheduler.running), len(self.scheduler.waiting),
                                  (time.perf_counter() - t0) * 1e3, inflight.graph_launch_ms)
            launched = LaunchedStep(inflight, sampled, shape)
            self.scheduler.step_done(sched)
            for seq in launched.seqs:
                seq.num_inflight += 1
        if self._pending is not None:
            outputs += self._process(self._pending, finished_only)
        self._pending = launched
        return outputs

    def _process(self, step: LaunchedStep, finished_only: bool) -> list[RequestOutput]:
        t0 = time.perf_counter()
        result = step.inflight.result()
        self.stats.record(step.inflight, step.shape, (time.perf_counter() - t0) * 1e3)
        touched: dict[str, Request] = {}
        for row, seq in enumerate(step.seqs):
            seq.num_inflight -= 1
            if seq.is_finished:  # stopped or aborted while this step ran: its token is dropped
                continue
            lp = None
            if result.logprobs is not None and seq.params.logprobs is not None:
                chosen, rank, top = result.logprobs[row]
                lp = {tok: Logprob(val, i + 1) for i, (tok, val) in enumerate(top[: seq.params.logprobs])}
                lp.setdefault(result.token_ids[row], Logprob(chosen, rank))
            self.output_processor.append(seq, result.token_ids[row], lp)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for rid, req in touched.items():
            if req.finished:
                del self.requests[rid]
            elif finished_only:
                continue
            outputs.append(self.output_processor.request_output(req))
        return outputs

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (if any); idempotent. The engine cannot step afterwards."""
        if self.tp is not None:
            self.runner.release_graphs()  # before the NCCL group goes (see release_graphs)
            self.tp.shutdown()

    # --- introspection (metrics, tests) ----------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return self.scheduler.page_pool.num_free

    @property
    def num_pages(self) -> int:
        return self.runner.num_pages


def _eos_token_ids(path: str, hf_config, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """EOS ids as transformers' generate uses them: generation_config.json first, then config.json."""
    ids: set[int] = set()
    gen_path = os.path.join(path, "generation_config.json")
    sources = []
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    sources.append(getattr(hf_config, "eos_token_id", None))
    for src in sources:
        if src is not None:
            ids.update([src] if isinstance(src, int) else src)
            break
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
