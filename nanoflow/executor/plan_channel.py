"""The plan channel: rank 0 hands each step's plan to the workers of its host through a shared-memory
ring, without waiting for them to read it (one writer, N readers).

Over gloo, `broadcast_object_list` is synchronous: rank 0 waits until every worker has received the
plan before it launches its own forward, and the workers idle between steps. Through the ring, rank 0
writes step i+1's pickled plan while step i runs and goes on at once; it waits only when the ring is
full, i.e. when a worker is `num_slots` messages behind.

Layout of the segment (a file in /dev/shm, mapped by every rank of the host; little-endian):

    0       magic, num_readers, num_slots, slot_size, writer pid               (u64 each)
    64      write_seq: messages written so far                                 (u64, own cache line)
    128+64r reader r: read_seq, pid, GPU idle ms (f64), idle steps measured    (own cache line each)
    H       num_slots slots of slot_size bytes: seq (u64), nbytes (u32), last (u32), payload

Message s lives in slot s % num_slots. The writer fills slot s only once every reader's read_seq
> s - num_slots (the slot's previous message is read), writes the payload, then publishes
write_seq = s + 1; a reader waits for write_seq > its read_seq, copies the payload, then publishes
read_seq + 1. A plan larger than a slot is sent as consecutive messages (chunks), the last one
flagged: any plan size works, and a chunk never waits for more than one free slot. Each side
checks that the other is alive while it waits (pid), so a dead rank is an error, not a hang.

The file is unlinked as soon as every reader has mapped it (`unlink`): the memory then lives exactly
as long as the processes that map it, and no crash leaves it behind. Files of dead writers that
never got that far are removed by the next `create` (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import secrets
import struct
import threading
import time
from pathlib import Path
from typing import Any

SHM_DIR = Path("/dev/shm")
PREFIX = "nanoflow-plans-"
_MAGIC = 0x6E616E6F666C6F77  # "nanoflow"
_WRITE_SEQ = 64
_READERS = 128
_SLOT_HEADER = struct.Struct("<QII")  # seq, nbytes, last
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
# Waiting: spin a little (a plan usually arrives within microseconds of the previous step's launch),
# then sleep with a growing pause capped at _MAX_SLEEP_S, so an idle engine's workers cost ~nothing.
_SPINS = 200
_MAX_SLEEP_S = 0.001
_LIVENESS_EVERY_S = 0.2  # how often a waiting side checks the other side's pid

# A full barrier around the payload: CPython's lock acquire/release are atomic read-modify-writes,
# which order our stores on weakly ordered CPUs too (on x86 stores are ordered anyway).
_FENCE_LOCK = threading.Lock()


def _fence() -> None:
    with _FENCE_LOCK:
        pass


def pid_alive(pid: int) -> bool:
    """Whether process pid (of this host) runs; a zombie (dead, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def remove_stale() -> None:
    """Removes ring files whose writer (the pid in the name) is dead: a rank 0 that died between
    creating its ring and unlinking it."""
    for path in SHM_DIR.glob(PREFIX + "*"):
        with contextlib.suppress(ValueError, IndexError, OSError):
            if not pid_alive(int(path.name[len(PREFIX):].split("-")[0])):
                path.unlink()


def _slots_offset(num_readers: int) -> int:
    """H in the layout: the readers' lines, rounded up to a page so that the slots start page-aligned."""
    header = _READERS + 64 * num_readers
    return header + -header % mmap.PAGESIZE


class PlanRing:
    """One end of the ring: the writer (`create`, rank 0) or reader r (`attach`, rank r + 1)."""

    def __init__(self, path: Path, buf: mmap.mmap, reader: int | None, timeout_s: float) -> None:
        self.path, self.buf, self.reader, self.timeout_s = path, buf, reader, timeout_s
        self.num_readers, self.num_slots, self.slot_size, self.writer_pid = (
            _U64.unpack_from(buf, 8 * i)[0] for i in range(1, 5))
        self._slots = _slots_offset(self.num_readers)
        self.seq = 0 if reader is None else self._get(self._reader_at(reader))
        self.unlinked = False

    # --- setup ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, num_readers: int, num_slots: int = 8, slot_size: int = 1 << 20,
               timeout_s: float = 600.0) -> PlanRing:
        """The writer's end: a new ring file (raises OSError where there is no /dev/shm)."""
        if num_readers < 1 or num_slots < 1 or slot_size <= _SLOT_HEADER.size:
            raise ValueError(f"bad ring shape: {num_readers} readers, {num_slots} slots of {slot_size} bytes")
        remove_stale()
        path = SHM_DIR / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        size = _slots_offset(num_readers) + num_slots * slot_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # zero-filled: every sequence number starts at 0
            buf = mmap.mmap(fd, size)
        except BaseException:
            path.unlink()
            raise
        finally:
            os.close(fd)
        for i, v in enumerate((_MAGIC, num_readers, num_slots, slot_size, os.getpid())):
            _U64.pack_into(buf, 8 * i, v)
        return cls(path, buf, None, timeout_s)

    @classmethod
    def attach(cls, path: str | Path, reader: int, timeout_s: float = 600.0) -> PlanRing:
        """Reader `reader`'s end of the ring the writer created at path."""
        fd = os.open(path, os.O_RDWR)
        try:
            buf = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if len(buf) < _READERS or _U64.unpack_from(buf, 0)[0] != _MAGIC:
            buf.close()
            raise ValueError(f"{path} is not a nanoflow plan ring")
        ring = cls(Path(path), buf, reader, timeout_s)
        if not 0 <= reader < ring.num_readers:
            ring.close()
            raise ValueError(f"reader {reader} of a ring with {ring.num_readers} readers")
        if not pid_alive(ring.writer_pid):  # e.g. another pid namespace: liveness checks would misfire
            ring.close()
            raise OSError(f"the ring's writer (pid {ring.writer_pid}) is not visible from this process")
        _U64.pack_into(buf, ring._reader_at(reader) + 8, os.getpid())
        return ring

    def unlink(self) -> None:
        """Removes the file once every reader has mapped it; the mappings stay valid."""
        if not self.unlinked:
            self.unlinked = True
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def close(self) -> None:
        if self.reader is None:
            self.unlink()
        with contextlib.suppress(BufferError, ValueError):
            self.buf.close()

    # --- messages ---------------------------------------------------------------------------------
    def send(self, obj: Any, timeout_s: float | None = None) -> None:
        """Writer: pickles obj into the ring and returns at once unless the ring is full. Raises
        RuntimeError naming a dead reader, or one that read nothing for timeout_s while the ring was full."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        cap = self.slot_size - _SLOT_HEADER.size
        limit = self.timeout_s if timeout_s is None else timeout_s
        for off in range(0, max(1, len(data)), cap):
            chunk = data[off:off + cap]
            self._wait_for_room(limit)
            at = self._slot_at(self.seq)
            self.buf[at + _SLOT_HEADER.size:at + _SLOT_HEADER.size + len(chunk)] = chunk
            _SLOT_HEADER.pack_into(self.buf, at, self.seq, len(chunk), off + cap >= len(data))
            _fence()
            self.seq += 1
            _U64.pack_into(self.buf, _WRITE_SEQ, self.seq)

    def recv(self) -> Any:
        """Reader: the next object, waiting for it as long as the writer lives (an engine may idle)."""
        parts = []
        while True:
            self._wait_for_message()
            _fence()
            at = self._slot_at(self.seq)
            seq, nbytes, last = _SLOT_HEADER.unpack_from(self.buf, at)
            if seq != self.seq:
                raise RuntimeError(f"plan ring {self.path.name}: slot holds message {seq}, expected {self.seq}")
            parts.append(self.buf[at + _SLOT_HEADER.size:at + _SLOT_HEADER.size + nbytes])
            _fence()
            self.seq += 1
            _U64.pack_into(self.buf, self._reader_at(self.reader), self.seq)
            if last:
                return pickle.loads(b"".join(parts))

    # --- per-reader statistics (written by each reader, read by the writer at any time) ------------
    def record_idle(self, ms: float) -> None:
        """Reader: adds one step's GPU idle time (end of its previous step to the start of this one)."""
        at = self._reader_at(self.reader)
        _F64.pack_into(self.buf, at + 16, self._get_f(at + 16) + ms)
        _U64.pack_into(self.buf, at + 24, self._get(at + 24) + 1)

    def reader_stats(self) -> list[dict[str, float]]:
        """Per reader: plans read, GPU idle ms summed over the steps measured, and their count."""
        rows = []
        for r in range(self.num_readers):
            at = self._reader_at(r)
            steps = self._get(at + 24)
            idle = self._get_f(at + 16)
            rows.append({"messages_read": self._get(at), "gpu_idle_ms": round(idle, 3), "idle_steps": steps,
                         "gpu_idle_per_step_ms": round(idle / steps, 4) if steps else 0.0})
        return rows

    # --- internals --------------------------------------------------------------------------------
    def _get(self, at: int) -> int:
        return _U64.unpack_from(self.buf, at)[0]

    def _get_f(self, at: int) -> float:
        return _F64.unpack_from(self.buf, at)[0]

    def _reader_at(self, r: int | None) -> int:
        assert r is not None, "only a reader has a reader slot"
        return _READERS + 64 * r

    def _slot_at(self, seq: int) -> int:
        return self._slots + (seq % self.num_slots) * self.slot_size

    def _wait_for_room(self, limit_s: float) -> None:
        """Until slot self.seq is read by every reader; limit_s counts from the first wait (one chunk)."""
        spins, pause, next_check, deadline = 0, 1e-5, 0.0, None
        while True:
            seqs = [self._get(self._reader_at(r)) for r in range(self.num_readers)]
            if self.seq - min(seqs) < self.num_slots:
                return
            spins += 1
            if spins < _SPINS:
                continue
            now = time.monotonic()
            deadline = now + limit_s if deadline is None else deadline
            lagging = [r for r, s in enumerate(seqs) if self.seq - s >= self.num_slots]
            if now >= next_check:
                next_check = now + _LIVENESS_EVERY_S
                for r in lagging:
                    pid = self._get(self._reader_at(r) + 8)
                    if pid and not pid_alive(pid):
                        raise RuntimeError(f"plan ring: reader {r} (tensor-parallel rank {r + 1}, pid {pid}) is "
                                           f"dead, {self.seq - seqs[r]} messages behind")
            if now >= deadline:
                r = lagging[0]
                raise RuntimeError(f"plan ring: reader {r} (tensor-parallel rank {r + 1}, pid "
                                   f"{self._get(self._reader_at(r) + 8)}) read nothing for "
                                   f"{limit_s:g} s while the ring was full")
            time.sleep(pause)
            pause = min(2 * pause, _MAX_SLEEP_S)

    def _wait_for_message(self) -> None:
        spins, pause, next_check = 0, 1e-5, time.monotonic() + _LIVENESS_EVERY_S
        while self._get(_WRITE_SEQ) <= self.seq:
            spins += 1
            if spins < _SPINS:
                continue
            time.sleep(pause)
            pause = min(2 * pause, _MAX_SLEEP_S)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + _LIVENESS_EVERY_S
                if not pid_alive(self.writer_pid):
                    raise RuntimeError(f"plan ring: the writer (tensor-parallel rank 0, pid {self.writer_pid}) "
                                       "died")
