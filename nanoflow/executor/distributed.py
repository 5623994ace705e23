"""Tensor parallelism's processes: start the ranks, join their process groups, run the worker loop.

Rank 0 is the engine's own process: it schedules, samples and processes outputs. Ranks 1..N-1 each
hold a ModelRunner with their shard of the weights and of the KV cache; per step they receive the
plan that rank 0 broadcasts and run the same forward, meeting rank 0 in its collectives. Only rank 0
has the sampled tokens: the plan carries what is known on the host, and rank 0 broadcasts the
tokens still in flight on the device, so the engine's asynchronous scheduling is kept.

Two ways to start the ranks:
- the engine spawns ranks 1..N-1 (torch.multiprocessing, one per GPU of this host; gloo on the CPU);
- torchrun (env://, also across hosts) starts every rank with the same program: on ranks other than
  0, creating the engine runs the worker loop instead, and exits the process once rank 0 shuts down.

Plans reach the workers of rank 0's host through the plan channel (nanoflow.executor.plan_channel:
a shared-memory ring rank 0 writes without waiting for the readers); across hosts (torchrun with
LOCAL_WORLD_SIZE != WORLD_SIZE), where a rank cannot map the ring, or with NANOFLOW_PLAN_CHANNEL=gloo,
through the gloo control group's synchronous broadcast.

A worker that dies makes rank 0 fail loudly: it checks its spawned workers before each step, names
a dead one when a collective fails, the ring's writer names a dead reader it waits for, and every
collective has a timeout (NANOFLOW_TP_TIMEOUT_S). With `--all-reduce symm-mem`, whose device-side
waits have no timeout, a watchdog thread ends rank 0's process when a spawned worker dies mid-run.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing.connection
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoflow.config import EngineConfig
from nanoflow.executor.model_runner import ModelRunner, pipeline_key
from nanoflow.executor.plan_channel import PlanRing
from nanoflow.executor.symm_all_reduce import open_symm_all_reduce
from nanoflow.layers.parallel import ParallelState
from nanoflow.model_arch import ModelArch
from nanoflow.pipeline.cache import choose_pipeline
from nanoflow.pipeline.timeline import hold_gpu

log = logging.getLogger(__name__)

# Collectives inside a step; a hung or dead peer turns into an error after this long.
TIMEOUT_S = float(os.environ.get("NANOFLOW_TP_TIMEOUT_S", 600))
# Workers wait for rank 0's next step on the control group for as long as the engine idles.
_IDLE_TIMEOUT = datetime.timedelta(days=3650)
_SHUTDOWN_TIMEOUT = datetime.timedelta(seconds=30)
# NVLink multicast (NVLS) can take a shared host's GPUs out of service: off in rank 0 and, through
# the environment they inherit (and set again in each), in every spawned worker.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    os.environ.update(NO_MULTICAST)


def check_tensor_parallel(arch: ModelArch, size: int, device: torch.device, expert_parallel: bool = False) -> None:
    """Raises ValueError for a size the model or the machine cannot be split into, before any
    process starts. expert_parallel: the experts are split whole, their intermediate size not at all."""
    par = ParallelState(0, size, expert_parallel=expert_parallel)
    par.split(arch.num_heads, "num_attention_heads")
    par.split(arch.num_kv_heads, "num_key_value_heads")
    if expert_parallel:
        par.split(arch.num_experts, "num_local_experts")
    else:
        par.split(arch.intermediate_size, "intermediate_size")
    if size > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"with tensor_parallel_size > 1 use device='cuda', not {str(device)!r}: rank r runs "
                             "on cuda:r (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        if local > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size ({local} on this host) exceeds the {torch.cuda.device_count()} "
                             "visible GPU(s)")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class TensorParallelGroup:
    """Rank 0's handle on the other ranks: liveness checks and shutdown."""

    def __init__(self, par: ParallelState, processes: list[Any], owns_group: bool, config: EngineConfig) -> None:
        self.par, self.processes, self.owns_group = par, processes, owns_group
        self.config = config  # rank 0's: on its own GPU
        self._closed = False

    @classmethod
    def start(cls, config: EngineConfig, worker: Callable[..., None] | None = None) -> TensorParallelGroup:
        """Starts (or, under torchrun, joins) the ranks. On a torchrun rank other than 0 this runs the
        worker loop and then exits the process. worker: what each spawned rank runs (default
        _worker_main; tests start ones that fail)."""
        size = config.tensor_parallel_size
        disable_multicast()  # before any process group exists or any worker is spawned
        if launched_by_torchrun():
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if world != size:
                raise ValueError(f"torchrun started {world} processes but tensor_parallel_size is {size}")
            one_host = os.environ.get("LOCAL_WORLD_SIZE") == str(world)
            par, owns, config = _join(rank, size, "env://", config, one_host)
            if rank != 0:
                run_worker(config, par, owns)
                raise SystemExit(0)
            return cls(par, [], owns, config)
        if dist.is_initialized():
            raise ValueError("a torch.distributed process group already exists in this process (another "
                             "tensor-parallel engine?): shut that engine down first")
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        init_method = f"tcp://{addr}:{os.environ.get('MASTER_PORT') or _free_port(addr)}"
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // size)  # CPU ranks compute at once: share the cores
        processes, ready = [], []
        for rank in range(1, size):
            receive, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker or _worker_main, name=f"nanoflow-tp{rank}", daemon=True,
                            args=(rank, size, init_method, config, threads, send))
            p.start()
            send.close()
            processes.append(p)
            ready.append(receive)
        group = cls(ParallelState(0, size), processes, True, config)
        try:
            _await_workers(processes, ready)
            group.par, group.owns_group, group.config = _join(0, size, init_method, config, True)
        except BaseException as e:
            try:
                group.check_workers(e)
            finally:
                group.abort()
            raise
        if group.par.fast_all_reduce is not None:
            # a symmetric-memory all-reduce waits for its peers on the device with no timeout (NCCL's
            # watchdog does not see it): a worker that dies mid-step would leave rank 0 stuck in a
            # device wait for good, so its death ends this process, loudly
            threading.Thread(target=group.watch_workers, name="nanoflow-tp-watch", daemon=True).start()
        return group

    def watch_workers(self, on_death: Callable[[str], None] | None = None) -> None:
        """Waits for a spawned worker to exit; unless the group is shutting down by then, reports it
        through on_death (default: log and end the process with exit code 70)."""
        if not self.processes:  # torchrun started the ranks: nothing of theirs to wait on here
            return
        ready = multiprocessing.connection.wait([p.sentinel for p in self.processes])
        if self._closed:
            return
        for p in self.processes:  # a sentinel fires as the worker exits, a moment before it can be reaped
            if p.sentinel in ready:
                p.join(5.0)
        dead = [f"rank {r} (pid {p.pid}, exit code {p.exitcode})" for r, p in enumerate(self.processes, start=1)
                if not p.is_alive()]
        message = (f"tensor-parallel worker {', '.join(dead)} died during a step with --all-reduce symm-mem; "
                   "rank 0 cannot leave a device wait on it, so the process exits")
        (on_death or _exit_loudly)(message)

    def check_workers(self, cause: BaseException | None = None) -> None:
        """Raises RuntimeError naming a spawned worker that is no longer running. With a cause (a
        failed collective), first gives a dying worker a moment to be reaped."""
        if cause is not None and self.processes:
            multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout=2.0)
        for rank, p in enumerate(self.processes, start=1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel worker rank {rank} (pid {p.pid}) died with exit code "
                                   f"{p.exitcode}; its error, if any, is printed above") from cause

    def worker_gpu_idle(self) -> list[dict[str, float]] | None:
        """Per worker (rank 1, 2, ...): plans read and, on GPUs, its GPU's idle time between steps as it
        measured it (CUDA events, like rank 0's StepStats). None without the plan channel."""
        plans = self.par.plans
        return None if plans is None or self._closed else plans.reader_stats()

    def shutdown(self) -> None:
        """Stops the workers and leaves the process groups; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.par.plans is not None:  # a stuck worker must not hold the shutdown for long
                self.par.plans.send(None, timeout_s=_SHUTDOWN_TIMEOUT.total_seconds())
            else:
                self.par.broadcast_object(None)  # the workers' loop ends
            dist.monitored_barrier(group=self.par.control_group, timeout=_SHUTDOWN_TIMEOUT)
        except Exception as e:  # a worker already gone or stuck: the spawned ones are killed below
            log.warning("tensor-parallel shutdown: %s", e)
        else:
            # every rank is past the barrier and leaves now, together: tearing a communicator down
            # waits for its peers, so rank 0 must not wait for the workers to exit first
            self._leave()
        for p in self.processes:
            p.join(timeout=_SHUTDOWN_TIMEOUT.total_seconds())
        self.abort()

    def abort(self) -> None:
        """Kills the spawned workers at once and leaves the process groups (a failed start)."""
        self._closed = True
        for p in self.processes:
            if p.is_alive():
                p.kill()
            p.join()
        if self.par.plans is not None:
            self.par.plans.close()
        self._leave()

    def _leave(self) -> None:
        if self.owns_group and dist.is_initialized():
            _leave_group()
        self.owns_group = False


def _exit_loudly(message: str) -> None:
    log.critical(message)
    logging.shutdown()
    os._exit(70)


def _leave_group() -> None:
    """Destroys the default process group, waiting at most _SHUTDOWN_TIMEOUT: a communicator that
    cannot finish (a peer gone, or work CUDA graphs still hold) must not hang the shutdown; what is
    left is freed when the process exits."""
    t = threading.Thread(target=dist.destroy_process_group, name="nanoflow-leave-group", daemon=True)
    t.start()
    t.join(_SHUTDOWN_TIMEOUT.total_seconds())
    if t.is_alive():
        log.warning("tensor-parallel shutdown: the process group did not close within %.0f s; left to the "
                    "process exit", _SHUTDOWN_TIMEOUT.total_seconds())


def run_worker(config: EngineConfig, par: ParallelState, owns_group: bool) -> None:
    """A rank other than 0: builds its shard, then runs each step rank 0 broadcasts, until told to stop."""
    torch.manual_seed(config.seed)
    runner = ModelRunner(config, par)
    idle = _IdleMeter(par.plans) if config.device.type == "cuda" and par.plans is not None else None
    with torch.inference_mode():
        while (plan := par.broadcast_object(None)) is not None:
            batch = runner.build(plan)
            if idle is not None:
                idle.start()
            if plan.eager:  # rank 0 is timing its ops (pipeline.timeline): hold as it holds
                hold_gpu(runner.device)
            runner.forward(batch, plan.eager, plan.sequential)
            if idle is not None:
                idle.end()
    runner.release_graphs()
    dist.monitored_barrier(group=par.control_group, timeout=_SHUTDOWN_TIMEOUT)
    if par.plans is not None:
        par.plans.close()
    if owns_group:
        _leave_group()


class _IdleMeter:
    """A worker's GPU idle time per step, from the end of its previous forward to the start of this
    one (recorded where rank 0 records its own: after the batch upload), into its ring slot for rank
    0 to read. Events are read only once complete (query), so measuring never waits for the GPU."""

    def __init__(self, ring: PlanRing) -> None:
        self.ring = ring
        self.last_end: torch.cuda.Event | None = None
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if self.last_end is not None:
            self.pending.append((self.last_end, start))

    def end(self) -> None:
        self.last_end = torch.cuda.Event(enable_timing=True)
        self.last_end.record()
        while self.pending and self.pending[0][1].query():
            prev_end, start = self.pending.pop(0)
            self.ring.record_idle(max(0.0, prev_end.elapsed_time(start)))


def nccl_max_ctas(config: EngineConfig, size: int) -> int | None:
    """The NCCL CTA cap of the engine's communicator: --nccl-max-ctas if given, else the one the
    pipeline it runs was tuned with (`nanoflow tune -tp` measures caps), else None (NCCL's own)."""
    if config.args.nccl_max_ctas is not None:
        return config.args.nccl_max_ctas
    pipeline = choose_pipeline(config.args.pipeline, pipeline_key(config, size), quiet=True)
    return pipeline.nccl_max_ctas if pipeline is not None else None


def _await_workers(processes: list[Any], ready: list[multiprocessing.connection.Connection]) -> None:
    """Waits until every spawned worker is about to join the process group, or raises as soon as one
    exits first: rank 0 would otherwise wait out the rendezvous (TIMEOUT_S) for a rank that never comes."""
    pending = dict(zip(ready, processes, strict=True))
    while pending:
        woke = multiprocessing.connection.wait([*pending, *(p.sentinel for p in pending.values())], timeout=TIMEOUT_S)
        if not woke:
            raise RuntimeError(f"a tensor-parallel worker gave no sign of joining within {TIMEOUT_S:.0f} s "
                               "(NANOFLOW_TP_TIMEOUT_S)")
        for obj in woke:
            if obj in pending:
                try:
                    obj.recv()
                except EOFError:  # its end closed: the worker is gone
                    raise RuntimeError("a tensor-parallel worker exited before joining the process group") from None
                obj.close()
                del pending[obj]
            else:
                raise RuntimeError("a tensor-parallel worker exited before joining the process group")


def _join(rank: int, size: int, init_method: str, config: EngineConfig, one_host: bool,
          before_rendezvous: Callable[[], None] | None = None) -> tuple[ParallelState, bool, EngineConfig]:
    """Joins the default process group (NCCL on GPUs, gloo on the CPU), a gloo control group and,
    on one host, the plan channel; returns the rank's parallel state, whether it created the default
    group, and its configuration (on its own GPU). before_rendezvous: called once this rank has its
    device, right before it waits for the others."""
    if config.device.type == "cuda":
        config = config.for_device(torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))))
        torch.cuda.set_device(config.device)
    cap = nccl_max_ctas(config, size)
    if cap is not None:  # read by NCCL when the communicator is made
        os.environ["NCCL_MAX_CTAS"] = str(cap)
    owns = not dist.is_initialized()
    if before_rendezvous is not None:
        before_rendezvous()
    if owns:
        backend = "nccl" if config.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    elif dist.get_world_size() != size:
        raise ValueError(f"the existing process group has {dist.get_world_size()} ranks, but tensor_parallel_size "
                         f"is {size}")
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    par = _open_plan_channel(ParallelState(rank, size, control, expert_parallel=config.expert_parallel), one_host)
    if config.args.all_reduce == "symm-mem" and config.device.type == "cuda":
        # the largest all-reduce of a step: the token budget's hidden states
        comm = open_symm_all_reduce(config.max_num_batched_tokens * config.arch.hidden_size, config.dtype,
                                    config.device, par.min)
        par = dataclasses.replace(par, fast_all_reduce=comm)
    return par, owns, config


def _open_plan_channel(par: ParallelState, one_host: bool) -> ParallelState:
    """Collective on the control group: rank 0 creates the ring and sends its path over gloo, the
    others map it; unless every rank succeeded, all keep the gloo broadcast. Once all have mapped it,
    rank 0 unlinks the file: the memory goes when the last rank exits, however it exits."""
    ring = None
    if par.rank == 0:
        path = None
        if one_host and os.environ.get("NANOFLOW_PLAN_CHANNEL", "shm") != "gloo":
            try:
                ring = PlanRing.create(par.size - 1, timeout_s=TIMEOUT_S)
                path = str(ring.path)
            except (OSError, ValueError) as e:
                log.warning("plan channel: no shared-memory ring (%s); plans go over gloo", e)
        par.broadcast_object(path)
    else:
        path = par.broadcast_object(None)
        if path is not None:
            try:
                ring = PlanRing.attach(path, par.rank - 1, timeout_s=TIMEOUT_S)
            except (OSError, ValueError) as e:  # e.g. another host: torchrun set LOCAL_WORLD_SIZE oddly
                log.warning("plan channel: rank %d cannot map %s (%s); plans go over gloo", par.rank, path, e)
    if path is None:
        return par
    if not par.min(int(ring is not None)):
        if ring is not None:
            ring.close()
        return par
    if par.rank == 0:
        ring.unlink()
    return dataclasses.replace(par, plans=ring)


def _worker_main(rank: int, size: int, init_method: str, config: EngineConfig, num_threads: int,
                 ready: multiprocessing.connection.Connection) -> None:
    # Ctrl-C reaches the whole process group: let rank 0 alone handle it (and then stop the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    disable_multicast()  # inherited from rank 0 already; set again before NCCL reads it
    torch.set_num_threads(num_threads)

    def joining() -> None:  # rank 0 waits for this (or this process's exit) before its rendezvous
        ready.send(rank)
        ready.close()

    par, owns, config = _join(rank, size, init_method, config, True, before_rendezvous=joining)
    run_worker(config, par, owns)


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
