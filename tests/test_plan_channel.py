"""The plan channel's shared-memory ring alone: one writer (this process), readers in spawned
processes; order, wraparound, plans bigger than a slot and than the ring, a full ring that blocks
until read, a dead or stuck reader named, a dead writer noticed, and no file left in /dev/shm."""

import multiprocessing
import os
import time

import pytest

from nanoflow.executor.plan_channel import PREFIX, SHM_DIR, PlanRing, pid_alive, remove_stale

CTX = multiprocessing.get_context("spawn")


def _messages() -> list:
    # Small plans, one exactly at a chunk boundary's size class, and some bigger than the whole ring.
    msgs: list = [{"step": i, "tokens": list(range(i % 7))} for i in range(40)]
    msgs[5] = bytes(range(256)) * 64  # 16 KiB: four 4 KiB slots
    msgs[17] = list(range(20_000))  # ~100 KB: many times the ring
    msgs[30] = None
    return msgs


def _read(path: str, reader: int, n: int, out, go=None) -> None:
    ring = PlanRing.attach(path, reader, timeout_s=30)
    out.put(("attached", os.getpid()))
    if go is not None:
        go.wait()
    out.put(("read", [ring.recv() for _ in range(n)]))
    ring.close()


def _start(ring: PlanRing, reader: int, n: int, go=None):
    out = CTX.Queue()
    p = CTX.Process(target=_read, args=(str(ring.path), reader, n, out, go), daemon=True)
    p.start()
    assert out.get(timeout=60)[0] == "attached"
    return p, out


def test_two_readers_get_every_message_in_order():
    ring = PlanRing.create(2, num_slots=4, slot_size=4096, timeout_s=30)
    try:
        msgs = _messages()
        readers = [_start(ring, r, len(msgs)) for r in range(2)]
        ring.unlink()  # every reader has mapped it
        assert not ring.path.exists()
        for m in msgs:  # wraps around the 4 slots many times; big ones are chunked
            ring.send(m)
        for p, out in readers:
            assert out.get(timeout=60) == ("read", msgs)
            p.join(timeout=30)
            assert p.exitcode == 0
        assert [s["messages_read"] for s in ring.reader_stats()] == [ring.seq, ring.seq]
    finally:
        ring.close()


def test_full_ring_blocks_until_read_and_a_stuck_reader_is_named():
    ring = PlanRing.create(1, num_slots=3, slot_size=4096, timeout_s=30)
    go = CTX.Event()
    p, out = _start(ring, 0, 5, go)
    try:
        t = time.monotonic()
        for i in range(3):
            ring.send(i)  # room for 3: never waits for the reader
        assert time.monotonic() - t < 1.0
        with pytest.raises(RuntimeError, match=rf"reader 0 \(tensor-parallel rank 1, pid {p.pid}\) read nothing"):
            ring.send(3, timeout_s=0.3)  # full: waits, then names the reader
        go.set()
        ring.send(3)  # the reader frees a slot
        ring.send(4)
        assert out.get(timeout=60) == ("read", [0, 1, 2, 3, 4])
        p.join(timeout=30)
    finally:
        ring.close()


def test_dead_reader_is_named_without_waiting_for_the_timeout():
    ring = PlanRing.create(2, num_slots=2, slot_size=4096, timeout_s=300)
    alive, out_alive = _start(ring, 0, 1000)
    dead, _ = _start(ring, 1, 0)  # reads nothing and exits
    dead.join(timeout=30)
    try:
        ring.send("a")
        ring.send("b")
        t = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"reader 1 \(tensor-parallel rank 2, pid {dead.pid}\) is dead"):
            ring.send("c")
        assert time.monotonic() - t < 5
    finally:
        alive.kill()
        alive.join()
        ring.close()


def test_reader_notices_a_dead_writer(tmp_path):
    ring = PlanRing.create(1, num_slots=2, slot_size=4096)
    reader = PlanRing.attach(ring.path, 0)
    ring.unlink()
    try:
        ring.send("x")
        assert reader.recv() == "x"
        gone = CTX.Process(target=time.sleep, args=(0,))
        gone.start()
        gone.join()
        assert not pid_alive(gone.pid)
        reader.writer_pid = gone.pid  # as if rank 0 had died
        with pytest.raises(RuntimeError, match=rf"the writer \(tensor-parallel rank 0, pid {gone.pid}\) died"):
            reader.recv()
    finally:
        reader.close()
        ring.close()


def test_stale_files_of_dead_writers_are_removed():
    gone = CTX.Process(target=time.sleep, args=(0,))
    gone.start()
    gone.join()
    stale = SHM_DIR / f"{PREFIX}{gone.pid}-dead"
    stale.write_bytes(b"x")
    live = SHM_DIR / f"{PREFIX}{os.getpid()}-live"
    live.write_bytes(b"x")
    try:
        remove_stale()
        assert not stale.exists() and live.exists()
    finally:
        live.unlink()
        stale.unlink(missing_ok=True)


def test_bad_rings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="bad ring shape"):
        PlanRing.create(0)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="is not a nanoflow plan ring"):
        PlanRing.attach(junk, 0)
    ring = PlanRing.create(1, num_slots=1, slot_size=64)
    try:
        with pytest.raises(ValueError, match="reader 1 of a ring with 1 readers"):
            PlanRing.attach(ring.path, 1)
    finally:
        ring.close()
    assert not ring.path.exists()


def _open(rank: int, init_method: str, one_host: bool, broken_attach: bool, out) -> None:
    import torch.distributed as dist

    from nanoflow.executor import distributed
    from nanoflow.layers.parallel import ParallelState

    if broken_attach and rank == 1:
        def refuse(*args, **kwargs):
            raise OSError("no such segment on this host")
        distributed.PlanRing.attach = refuse  # as a rank on another host would fail
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    par = distributed._open_plan_channel(ParallelState(rank, 2, dist.new_group(backend="gloo")), one_host)
    got = [par.broadcast_object(f"plan {i}" if rank == 0 else None) for i in range(3)]
    par.broadcast_object(None)
    if par.plans is not None:
        par.plans.close()
    dist.destroy_process_group()
    out.put((rank, par.plans is not None, got))


@pytest.mark.parametrize(("one_host", "broken_attach"), [(False, False), (True, True)])
def test_channel_setup_falls_back_to_gloo(one_host, broken_attach):
    """Two gloo ranks (the ring path itself runs in tests/test_tensor_parallel.py): several hosts
    (torchrun's LOCAL_WORLD_SIZE != WORLD_SIZE), or one rank that cannot map the ring, give every rank
    the gloo broadcast; the plans arrive in order and no ring file is left."""
    from nanoflow.executor.distributed import _free_port

    before = set(SHM_DIR.glob(PREFIX + "*"))
    init = f"tcp://127.0.0.1:{_free_port('127.0.0.1')}"
    out = CTX.Queue()
    procs = [CTX.Process(target=_open, args=(r, init, one_host, broken_attach, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [(r, False, ["plan 0", "plan 1", "plan 2"]) for r in range(2)]
    assert set(SHM_DIR.glob(PREFIX + "*")) <= before


class _FakeEvent:
    """torch.cuda.Event on a CPU: a recorded clock, always complete."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def elapsed_time(self, later: "_FakeEvent") -> float:
        return (later.t - self.t) * 1e3


def test_worker_idle_time_lands_in_its_reader_slot(monkeypatch):
    import torch

    from nanoflow.executor.distributed import _IdleMeter

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    ring = PlanRing.create(2, num_slots=2, slot_size=4096)
    reader = PlanRing.attach(ring.path, 1)
    try:
        meter = _IdleMeter(reader)
        for _ in range(3):  # three steps: two gaps between them
            meter.start()
            meter.end()
            time.sleep(0.01)
        (first, second) = ring.reader_stats()
        assert first["idle_steps"] == 0 and second["idle_steps"] == 2
        assert 15 <= second["gpu_idle_ms"] < 1000 and second["gpu_idle_per_step_ms"] >= 7.5
    finally:
        reader.close()
        ring.close()
